"""Merged models served beside the adapters.

A folder `lorakit merge` wrote holds a whole classifier: the adapter is in its weights, its
head is its own. The server loads it as a model of its own (`lorakit.recipes.merged_predictor`,
as `lorakit predict` does), so it never touches the base the adapters share, and serves it under
a name like an adapter's: the same /v1/predict answer, listed with kind "merged".

    check_merged_files   what a merged folder must be before a weight is read: a classifier
                         (not a causal LM), labels within --max-labels, and within
                         --max-merged-bytes both its files on disk and the model its
                         config.json describes; weights in model.safetensors
    load_merged          the checked folder loaded and probed once: its predictor and labels
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from lorakit.models.classic import TextClassifier, is_classic
from lorakit.recipes import MERGE_RECORD, Predictor, merged_predictor

from .admission import MAX_CONFIG_BYTES, AdapterLimits
from .errors import AdapterLoadError, AdapterOverLimitError

WEIGHTS = "model.safetensors"  # both kinds: lorakit merge writes no other weights file


def check_merged_files(folder: Path, limits: AdapterLimits) -> list[str]:
    """Refuses a merged folder the server cannot serve or that is over `limits`, reading no
    weight; returns its labels (from config.json)."""
    record = _read_json(folder / MERGE_RECORD, folder)
    if record.get("task") == "causal-lm":
        raise AdapterLoadError(
            f"merged model {folder} is a causal LM; the server classifies texts: serve a merged "
            "classifier, or load this one with transformers' AutoModelForCausalLM"
        )
    if not (folder / WEIGHTS).is_file():
        raise AdapterLoadError(
            f"merged model {folder} has no {WEIGHTS}; the server reads merged weights from "
            "safetensors only (write the folder again with lorakit merge)"
        )
    config = _read_json(folder / "config.json", folder)
    labels = _labels(config, folder)
    limits.check_labels(len(labels), f"merged model {folder}")
    on_disk = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    _check_bytes(f"merged model {folder} has files of", on_disk, limits)
    described = _described_bytes(folder, config)
    _check_bytes(f"the model that config.json of {folder} describes has", described, limits)
    return labels


def load_merged(
    folder: Path, limits: AdapterLimits, labels: list[str] | None = None
) -> tuple[Predictor, list[str]]:
    """(the merged classifier in `folder`, checked, loaded and probed once; its labels).
    `labels` rename its classes (the same number of them)."""
    own_labels = check_merged_files(folder, limits)
    if labels is not None and len(labels) != len(own_labels):
        raise AdapterLoadError(
            f"merged model {folder} predicts {len(own_labels)} classes but {len(labels)} labels "
            f"were given ({labels})"
        )
    try:
        predictor = merged_predictor(folder)
        classes = predictor.predict_proba(["probe"]).shape[1]
    except Exception as e:  # a damaged or foreign folder: its loader's reason, on one line
        raise AdapterLoadError(f"merged model {folder} does not load: {_first_line(e)}") from None
    if classes != len(own_labels):
        raise AdapterLoadError(
            f"merged model {folder} predicts {classes} classes but its config.json names "
            f"{len(own_labels)} labels"
        )
    return predictor, list(labels or predictor.labels)


def _read_json(path: Path, folder: Path) -> dict:
    size = path.stat().st_size if path.is_file() else 0
    if not 0 < size <= MAX_CONFIG_BYTES:
        raise AdapterLoadError(
            f"merged model {folder}: {path.name} is missing, empty or over "
            f"{MAX_CONFIG_BYTES:,} bytes; give a folder lorakit merge wrote"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        data = None
    if not isinstance(data, dict):
        raise AdapterLoadError(f"merged model {folder}: {path.name} is not a JSON object")
    return data


def _labels(config: dict, folder: Path) -> list[str]:
    """Class names in label order: the classic model's `labels`, a transformers `id2label`."""
    if is_classic(folder):
        labels = config.get("labels")
        if isinstance(labels, list) and labels:
            return [str(label) for label in labels]
    else:
        id2label = config.get("id2label")
        if isinstance(id2label, dict) and id2label:
            try:
                return [str(id2label[str(i)]) for i in range(len(id2label))]
            except KeyError:
                pass
    raise AdapterLoadError(
        f"merged model {folder}: config.json names no labels (id2label, or labels for the "
        "classic model); give a folder lorakit merge wrote from a classification run"
    )


def _described_bytes(folder: Path, config: dict) -> int:
    """Bytes of the parameters config.json describes, counted on the meta device (nothing is
    allocated): a small weights file must not stand for a huge model that loading would make."""
    try:
        with torch.device("meta"):
            if is_classic(folder):
                sizes = [config[k] for k in ("vocab_size", "dim", "num_classes", "hidden")]
                if not all(isinstance(s, int) and s > 0 for s in sizes):
                    raise ValueError("vocab_size, dim, num_classes and hidden must be positive")
                model = TextClassifier(*sizes)
            else:
                described = AutoConfig.from_pretrained(str(folder))  # never runs a folder's code
                model = AutoModelForSequenceClassification.from_config(described)
    except Exception as e:
        raise AdapterLoadError(
            f"merged model {folder}: config.json describes no classifier lorakit serves "
            f"({_first_line(e)})"
        ) from None
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _check_bytes(what: str, size: int, limits: AdapterLimits) -> None:
    if size > limits.max_merged_bytes:
        raise AdapterOverLimitError(
            f"{what} {size:,} bytes; this server takes at most {limits.max_merged_bytes:,} "
            "(lorakit serve --max-merged-bytes)"
        )


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
