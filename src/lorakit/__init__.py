"""lorakit: LoRA fine-tuning that is small, fast, correct and easy to see into.

`lorakit.lora` is the engine (pure PyTorch, PEFT's file format); the pipelines, CLI and reports
are built on it. The engine's API is re-exported here, loaded on first use (PEP 562), so that
`import lorakit.config` (or the CLI's --help) does not import torch and transformers.
"""

import logging

from lorakit import lora  # cheap: the engine's own names load on first use

# bitsandbytes (model.quantize), imported by transformers whenever it is installed, warns on
# every import of a CPU without its optional kernel download, which lorakit never uses
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

_ENGINE_API = (
    "LoraConfig", "LoraError", "add_adapter", "add_weighted_adapter", "delete_adapter",
    "disable_adapters", "inject", "load_adapter", "merge_and_unload", "save_adapter",
    "set_adapter", "trainable_parameters", "unload",
)  # fmt: skip

__version__ = "0.1.0"

__all__ = sorted([*_ENGINE_API, "__version__"])


def __getattr__(name: str):
    if name not in _ENGINE_API:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(lora, name)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
