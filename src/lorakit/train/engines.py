"""Two LoRA engines behind one config section: lorakit's own (default) and PEFT.

Both write PEFT's adapter format (``adapter_config.json`` + ``adapter_model.safetensors``), so
either engine's adapter loads in the other. A classifier's adapter folder also holds
``labels.json``: ``id2label`` and ``label2id`` as a transformers ``config.json`` has them (PEFT
warns of keys it does not know in ``adapter_config.json``, so they are not there).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError

from lorakit import lora
from lorakit.atomic import write_atomically
from lorakit.config import LoraSection


def apply_lora(
    model: torch.nn.Module,
    section: LoraSection,
    *,
    base_name: str | None = None,
    task_type: str | None = None,
) -> torch.nn.Module:
    """``model`` with LoRA added (base frozen) by the engine ``section.engine`` names."""
    config = section.lora_config(task_type=task_type, base_model_name_or_path=base_name)
    if section.engine == "peft":
        return _peft_model(model, config)
    return lora.inject(model, config)


def _peft_model(model: torch.nn.Module, config: lora.LoraConfig) -> torch.nn.Module:
    """PEFT's ``get_peft_model`` with the same ``LoraConfig`` fields; lorakit's checks name what
    PEFT would get wrong or not explain."""
    import peft

    if config.target_modules is None:
        lora.find_targets(model, config)  # PEFT would pick its own defaults; lorakit has none
    # PEFT wraps nested modules_to_save twice and writes a file no engine reads back:
    # lorakit's check refuses that first, with the same message for both engines
    lora.modules_to_save_names(model, config)
    try:
        with _peft_quietly():
            return peft.get_peft_model(model, peft.LoraConfig(**config.to_dict()))
    except ValueError as err:
        # PEFT's message does not say which layers could be targeted; lorakit's does
        lora.find_targets(model, config)
        raise lora.LoraError(f"PEFT refused lora.target_modules: {err}") from None


LABELS_NAME = "labels.json"


def save(
    model: torch.nn.Module,
    directory: str | Path,
    base_name: str | None = None,
    *,
    base_path: str | None = None,
    labels: list[str] | None = None,
) -> int:
    """Save the adapter alone (whichever engine added it), and ``labels`` beside it; return its
    size in bytes. ``base_name``: the base's public name (``base_model_name_or_path``);
    ``base_path``: the folder it was read from (lorakit's engine records it in the header)."""
    directory = Path(directory)
    if hasattr(model, "peft_config"):
        if base_name:  # PEFT records the folder the model was read from
            for config in model.peft_config.values():
                config.base_model_name_or_path = base_name
        try:
            # PEFT would add the whole (tied) embedding matrix when lm_head or an embedding is
            # a target; lorakit never resizes the vocabulary, so the base has it already
            model.save_pretrained(directory, save_embedding_layers=False)
        except (OSError, SafetensorError) as err:  # a full disk: one line, as lorakit's own
            raise lora.AdapterFileError(
                f"could not write the adapter to {directory} ({err}); free space (or fix the "
                "folder's permissions) and save it again"
            ) from None
    else:
        # a PiSSA / OLoRA adapter is saved as plain LoRA, so it loads on the untouched base
        lora.save_adapter(
            model, directory, base_model_name_or_path=base_name, base_model_path=base_path,
            convert_to_lora=True,
        )  # fmt: skip
    if labels is not None:
        write_labels(directory, labels)
    return folder_bytes(directory)


def write_labels(directory: str | Path, labels: list[str]) -> Path:
    """``labels.json``: what ``AutoModelForSequenceClassification.from_pretrained(base,
    id2label=..., label2id=...)`` takes (JSON keys are strings: ``int()`` the id2label keys)."""
    fields = {
        "id2label": {str(i): label for i, label in enumerate(labels)},
        "label2id": {label: i for i, label in enumerate(labels)},
    }
    return write_atomically(Path(directory) / LABELS_NAME, json.dumps(fields, indent=2) + "\n")


def load(model: torch.nn.Module, directory: str | Path, engine: str = "lorakit") -> torch.nn.Module:
    """``model`` (a fresh base) with the adapter in ``directory`` loaded, for inference."""
    if engine == "peft":
        import peft

        with _peft_quietly():
            return peft.PeftModel.from_pretrained(model, str(directory))
    return lora.load_adapter(model, directory)


@contextmanager
def _peft_quietly() -> Iterator[None]:
    """PEFT asks transformers models for ``is_gradient_checkpointing``, which transformers 5
    deprecates with a FutureWarning on every call: PEFT's to fix, not the user's."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
        )
        yield


def folder_bytes(directory: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(directory).rglob("*") if f.is_file())


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters."""
    count = lora.trainable_parameters(model)
    return count.trainable, count.total
