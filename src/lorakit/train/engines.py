"""Two LoRA engines behind one config section: lorakit's own (default) and PEFT.

Both write PEFT's adapter format (``adapter_config.json`` + ``adapter_model.safetensors``), so
either engine's adapter loads in the other.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from lorakit import lora
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


def save(model: torch.nn.Module, directory: str | Path, base_name: str | None = None) -> int:
    """Save the adapter alone (whichever engine added it); return its size in bytes."""
    directory = Path(directory)
    if hasattr(model, "peft_config"):
        # PEFT would add the whole (tied) embedding matrix when lm_head or an embedding is a
        # target; lorakit never resizes the vocabulary, so the base has it already
        model.save_pretrained(directory, save_embedding_layers=False)
    else:
        lora.save_adapter(model, directory, base_model_name_or_path=base_name)
    return folder_bytes(directory)


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
