"""lorakit: LoRA fine-tuning that is small, fast, correct and easy to see into.

`lorakit.lora` is the engine (pure PyTorch, PEFT's file format); the pipelines, CLI and reports
are built on it. The engine's API is re-exported here.
"""

from .lora import (
    LoraConfig,
    LoraError,
    add_adapter,
    delete_adapter,
    disable_adapters,
    inject,
    load_adapter,
    merge_and_unload,
    save_adapter,
    set_adapter,
    trainable_parameters,
    unload,
)

__version__ = "0.1.0"

__all__ = [
    "LoraConfig",
    "LoraError",
    "__version__",
    "add_adapter",
    "delete_adapter",
    "disable_adapters",
    "inject",
    "load_adapter",
    "merge_and_unload",
    "save_adapter",
    "set_adapter",
    "trainable_parameters",
    "unload",
]
