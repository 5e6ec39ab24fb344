"""The Python API behind every CLI command; a notebook makes the same calls.

```python
import lorakit.api as lk
summary = lk.train("classic", overrides=["train.epochs=3"])   # a recipe name or a .toml path
lk.evaluate("runs/classic-...", split="test")                 # {"accuracy", "loss", ...}
lk.predict("runs/classic-...", ["A lacklustre movie."])       # [{"label", "probabilities"}]
lk.Predictor("runs/classic-...").predict(texts)               # loaded once, for many calls
lk.list_recipes()                                             # {name: description}
lk.sweep("classic", {"r": [2, 8]})                            # {"succeeded", ..., "sweep_dir"}
lk.merge("runs/classic-...", "merged/")                       # a standalone model folder
lk.merge_adapters(["runs/a", "runs/b"], "ab/", weights=[0.5, 0.5], method="ties", density=0.5)
lk.export("runs/instruct-...", "lora.gguf", format="gguf")    # for llama.cpp (or gguf-merged)
lk.generate("runs/instruct-...", "Is this movie review positive or negative? ...", temperature=0)
```
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lorakit.config import Config, ConfigError, DataConfig, load_config
from lorakit.launch import DEFAULT_RECIPE, dry_run, resolve_config, resume_point, train
from lorakit.recipes import (
    describe,
    is_merged_model,
    merged_predictor,
    read_merge_record,
    recipe_class,
    recipe_names,
    recipe_of_run,
)
from lorakit.rundir import read_run_summary

__all__ = [
    "DEFAULT_RECIPE",
    "ConfigError",
    "Predictor",
    "dry_run",
    "evaluate",
    "export",
    "generate",
    "inspect",
    "list_recipes",
    "load_predictor",
    "merge",
    "merge_adapters",
    "predict",
    "read_texts",
    "report",
    "resolve_config",
    "resume_point",
    "sweep",
    "train",
    "training_errors",
    "user_errors",
]


def _finished_run(run_dir: str | Path) -> tuple[Path, Config, dict[str, Any]]:
    """A finished run's folder, config and summary (a damaged summary.json: one clean error
    before any work)."""
    run_dir = Path(run_dir)
    if (run_dir / "config.toml").is_file() and not (run_dir / "summary.json").exists():
        raise ConfigError(_unfinished(run_dir))
    for name in ("config.toml", "summary.json", "adapter"):
        if not (run_dir / name).exists():
            raise ConfigError(
                f"{run_dir} is not a finished run directory (no {name}); give the folder "
                "`lorakit train` wrote, e.g. runs/classic-20250101-120000"
            )
    summary = read_run_summary(run_dir)
    return run_dir, load_config(run_dir / "config.toml"), summary


def _unfinished(run_dir: Path) -> str:
    """What to do with a run that started and has no summary.json: resume it, or train again."""
    from lorakit.train.checkpoint import latest_checkpoint

    stopped = f"{run_dir} is a run that did not finish (no summary.json)"
    if latest_checkpoint(run_dir / "checkpoints") is not None:
        return (f"{stopped}; if it is not still training, continue it with "
                f"`lorakit train --resume {run_dir}`")  # fmt: skip
    return (f"{stopped} and holds no checkpoint to resume from; train it again with "
            f"`lorakit train {run_dir / 'config.toml'} --out NEW_DIR`")  # fmt: skip


def load_predictor(run_dir: str | Path):
    """The run's model with its adapter (or a folder ``lorakit merge`` wrote), ready for
    ``predict_proba(texts)``."""
    if is_merged_model(run_dir):
        return merged_predictor(run_dir)
    run_dir, config, _ = _finished_run(run_dir)
    return recipe_class(config).load_predictor(run_dir)


def _evaluated(run_dir: str | Path) -> tuple[DataConfig, float | None]:
    """The data settings a run (or a merged folder) is evaluated with, and its recorded test
    accuracy."""
    if is_merged_model(run_dir):
        record = read_merge_record(run_dir)
        return DataConfig.model_validate(record.get("data", {})), record.get("test_accuracy")
    _, config, summary = _finished_run(run_dir)
    return config.data, summary.get("test_accuracy")


class Predictor:
    """A finished run's model, loaded once, for as many texts and calls as needed::

    predictor = Predictor("runs/sentiment-...")
    predictor.predict(["A moving film."])   # [{"label", "probability", "probabilities"}]
    """

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.model = load_predictor(run_dir)
        self.labels: list[str] = list(self.model.labels)

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """(texts, labels) of probabilities, in the order of ``labels``."""
        if not texts:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        return self.model.predict_proba(list(texts))

    def predict(self, texts: Sequence[str]) -> list[dict[str, Any]]:
        """For each text: the predicted ``label``, its ``probability`` and all ``probabilities``."""
        results = []
        for row in self.predict_proba(texts):
            best = int(np.argmax(row))
            results.append({
                "label": self.labels[best],
                "probability": float(row[best]),
                "probabilities": {name: float(p) for name, p in zip(self.labels, row, strict=True)},
            })  # fmt: skip
        return results


def predict(run_dir: str | Path, texts: Sequence[str]) -> list[dict[str, Any]]:
    """For each text: the predicted ``label``, its ``probability`` and all ``probabilities``
    (loads the run each call; ``Predictor`` loads it once)."""
    return Predictor(run_dir).predict(texts)


def evaluate(run_dir: str | Path, data: str | None = None, split: str = "test") -> dict[str, Any]:
    """Accuracy and loss of a finished run (or a merged folder) on a split of its data (or of
    ``data``); for a causal-LM run its perplexity, loss and task figures (``remeasure``).
    ``recorded_test_...`` are the figures the run recorded in summary.json."""
    from lorakit.data import DataError, load_dataset
    from lorakit.data.errors import first_few
    from lorakit.data.files import COLUMN_FIX

    if not is_merged_model(run_dir):
        run_dir, _, summary = _finished_run(run_dir)
        if summary.get("task") == "causal-lm":
            figures = recipe_of_run(run_dir).remeasure(run_dir, data=data, split=split)
            recorded = {f"recorded_{k}": v for k, v in summary.items()
                        if k.startswith("test_") and k[5:] in figures}  # fmt: skip
            return figures | recorded
    run_data, recorded = _evaluated(run_dir)
    text, label = run_data.text_column, run_data.label_column
    try:
        dsd = load_dataset(
            data or run_data.source, text_column=text, label_column=label, training=False
        )
    except DataError as error:  # eval takes no --set: the other file must use the run's columns
        if data is None or COLUMN_FIX not in str(error):
            raise
        fix = f"the run reads the columns {text!r} and {label!r}: rename the file's columns"
        raise DataError(str(error).replace(COLUMN_FIX, fix)) from None
    if split not in dsd:
        raise ConfigError(f"split: {split!r} does not exist; choose one of {', '.join(dsd)}")
    if len(dsd[split]) == 0:
        sizes = ", ".join(f"{name}={len(part)}" for name, part in dsd.items())
        raise ConfigError(
            f"split: the {split} split of {data or run_data.source} is empty ({sizes}); "
            "choose another --split, or give more rows or a 'split' column"
        )
    predictor = load_predictor(run_dir)
    dataset = dsd[split]
    names = dataset.features["label"].names
    unknown = sorted(set(names) - set(predictor.labels))
    if unknown:
        raise ConfigError(
            f"data: labels {first_few(unknown)} are not among the model's labels {predictor.labels}"
        )
    truth = np.array([predictor.labels.index(names[i]) for i in dataset["label"]])
    probabilities = predictor.predict_proba(dataset["text"])
    predictions = probabilities.argmax(axis=1)
    picked = probabilities[np.arange(len(truth)), truth]
    return {
        "split": split,
        "dataset": data or run_data.source,
        "examples": len(truth),
        "accuracy": float((predictions == truth).mean()),
        "loss": float(-np.log(np.clip(picked, 1e-12, 1.0)).mean()),
        "recorded_test_accuracy": recorded,
    }


def read_texts(path: str | Path) -> list[str]:
    """The non-blank lines of a text file, one text each, read as data files are read (any
    encoding lorakit detects, BOM dropped)."""
    from lorakit.data.text_io import decode, read_bytes, warn_replaced

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--file: {str(path)!r} does not exist")
    text, replaced = decode(read_bytes(path))
    warn_replaced(str(path), replaced)
    # a line ends at \n (or \r\n, \r), not at U+2028 or U+0085 as splitlines() has it
    return [line for line in re.split(r"\r\n?|\n", text) if line.strip()]


def user_errors() -> tuple[type[BaseException], ...]:
    """The errors that are the user's to fix: each is one line naming the fix (no traceback)."""
    from lorakit.data import DataError
    from lorakit.lora import LoraError
    from lorakit.models.classic import EmbeddingsError
    from lorakit.network import OfflineError
    from lorakit.report.runfiles import ReportError

    return ConfigError, DataError, EmbeddingsError, LoraError, OfflineError, ReportError


def training_errors() -> tuple[type[BaseException], ...]:
    """The errors of a training run that stopped (a damaged checkpoint, a failed process)."""
    from lorakit.train.checkpoint import CheckpointError
    from lorakit.train.distributed import DistributedError

    return CheckpointError, DistributedError


def list_recipes() -> dict[str, str]:
    """Built-in recipe names and their one-line descriptions."""
    return {name: describe(name) for name in recipe_names()}


def generate(
    run_dir: str | Path,
    prompt: str,
    *,
    max_new_tokens: int = 50,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    raw: bool = False,
    stream: bool = False,
    on_text=None,
    echo_prompt: bool = False,
) -> str:
    """Answer ``prompt`` (a run on a chat template: the prompt is the user's turn) or continue it
    with a causal-LM run's base model + adapter, or a merged folder; return the new text.

    ``raw=True`` continues the text as given, without the chat template. ``temperature=0``
    decodes greedily; ``stream=True`` hands each piece of text to ``on_text`` (stdout by default)
    as it is decoded, after the prompt itself when ``echo_prompt`` and the text continues it."""
    from lorakit.generate import generate as continue_text
    from lorakit.recipes.causal_lm import chat_prompting, load_generator

    if is_merged_model(run_dir):
        task = read_merge_record(run_dir).get("task")
    else:
        run_dir, _, summary = _finished_run(run_dir)
        task = summary.get("task")
    if task != "causal-lm":
        raise ConfigError(
            f"{run_dir} is a {task or 'classification'} model; `generate` needs a causal-LM run "
            "(recipes causal-lm, instruct, summarize) or its merged folder; use `lorakit predict` "
            "here"
        )
    problems = []
    if max_new_tokens < 1:
        problems.append(f"max_new_tokens: must be at least 1 (got {max_new_tokens})")
    if temperature < 0:
        problems.append(f"temperature: must be >= 0, 0 meaning greedy (got {temperature})")
    if not 0 < top_p <= 1:
        problems.append(f"top_p: must be in (0, 1] (got {top_p})")
    if problems:
        raise ConfigError(problems)
    chat, system_prompt = chat_prompting(run_dir)
    model, tokenizer = load_generator(run_dir)
    return continue_text(
        model, tokenizer, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
        top_p=top_p, seed=seed, stream=stream, on_text=on_text, chat=chat,
        system_prompt=system_prompt, raw=raw, echo_prompt=echo_prompt,
    )  # fmt: skip


def sweep(
    recipe_or_config: str | Path | None,
    grid: Mapping[str, Iterable[Any]] | Iterable[str],
    out: str | Path | None = None,
    overrides: Iterable[str] = (),
    seeds: int = 1,
) -> dict[str, Any]:
    """Train every combination of ``grid`` ({key: values}, or ``KEY=V1,V2`` strings as on the
    command line), each with ``seeds`` seeds (the config's seed + 0, 1, ...); return the sweep's
    record (``sweep.json``: ``succeeded``, ``failed``, ...) with its ``sweep_dir``, which holds
    the table, plots and report (``lorakit.sweep``)."""
    from lorakit.sweep import parse_grid
    from lorakit.sweep import sweep as run_sweep

    if not isinstance(grid, Mapping):
        grid = parse_grid(grid)
    folder = run_sweep(recipe_or_config, grid, out=out, overrides=overrides, seeds=seeds)
    record = json.loads((folder / "sweep.json").read_text(encoding="utf-8"))
    return {**record, "sweep_dir": str(folder)}


def inspect(target: str | Path) -> str:
    """What a model folder, ``minilm``, a hub id, an adapter folder or a run directory holds:
    module names LoRA can target and parameter counts, or the adapter's config and size."""
    from lorakit.inspect import inspect as describe_target

    return describe_target(target)


def merge(run_dir: str | Path, out_dir: str | Path, *, force: bool = False) -> Path:
    """Write a standalone model with the run's adapter merged in; return ``out_dir``
    (``lorakit.merge``; a non-empty ``out_dir`` is refused unless ``force``)."""
    from lorakit.merge import merge as merge_run

    return merge_run(run_dir, out_dir, force=force)


def merge_adapters(
    adapters: Sequence[str | Path],
    out_dir: str | Path,
    *,
    weights: Sequence[float],
    method: str = "svd",
    density: float | None = None,
    **options: Any,
) -> Path:
    """One adapter combined from the adapters of runs (or adapter folders) of one base model,
    written to ``out_dir`` as an adapter folder (``lorakit.lora.add_weighted_adapter_files``;
    ``method``: its combination type, ``options``: svd_rank, majority_sign_method, ...)."""
    from lorakit.lora import CONFIG_NAME, add_weighted_adapter_files

    folders = [Path(a) / "adapter" if (Path(a) / "adapter" / CONFIG_NAME).is_file() else Path(a)
               for a in adapters]  # fmt: skip
    return add_weighted_adapter_files(
        folders, list(weights), out_dir, method, density=density, **options
    )


def export(
    run_dir: str | Path,
    out: str | Path,
    *,
    format: str = "gguf",
    outtype: str | None = None,
    force: bool = False,
) -> Path:
    """Write a causal-LM run as one GGUF file for llama.cpp: its LoRA adapter (``gguf``) or the
    merged model (``gguf-merged``) in ``outtype``; return ``out`` (``lorakit.export``)."""
    from lorakit.export import export as export_run

    return export_run(run_dir, out, format=format, outtype=outtype, force=force)


def report(run_dir: str | Path) -> Path:
    """Write ``report.html`` (self-contained, plots embedded) into a run directory or a sweep
    folder; return its path."""
    from lorakit.report.html import write_report

    return write_report(run_dir)
