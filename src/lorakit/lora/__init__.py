"""lorakit's LoRA engine, in plain PyTorch.

LoRA (Hu et al. 2021) freezes a pretrained weight W0 and learns a low-rank change to it:

    h = W0·x + (alpha / r) · B·A·dropout(x)        A: r × in,  B: out × r,  r << min(in, out)

Only A and B train, so an adapter is tiny next to the model, and after training B·A can be
merged into W0 so that inference costs nothing extra. DoRA (`use_dora`) also trains one
magnitude per output, which rescales W0 + (alpha / r)·B·A to it.

    layers.py         the LoRA layers (Linear, GPT-2 Conv1D, Embedding) and ModulesToSaveWrapper;
                      each declares its adapter parameters (`adapter_params`)
    dora.py           DoRA's math: the weight norm from low-rank products, kept in eval mode
    targeting.py      which modules get LoRA or are saved whole: PEFT's name matching
    model.py          a model's adapters: inject, add, set, delete, disable; parameter counts
    merging.py        merge into the base weights, unmerge, merge_and_unload, unload
    arithmetic.py     a new adapter combined from others (add_weighted_adapter: cat, svd, ties, ...)
    initialisation.py PiSSA and OLoRA starts from the base weight, and their conversion to LoRA
    mixed_batch.py    one forward whose rows go through different adapters (serving)
    adapter_files.py  save and load adapters in PEFT's on-disk format
    config.py         LoraConfig, with PEFT's field names and defaults (no torch)

This package imports nothing else from lorakit, and never PEFT: PEFT compatibility is a matter
of file format and names, tested against PEFT itself. Its names load on first use (PEP 562), so
`lorakit.lora.config` and `lorakit.lora.errors` can be read without importing torch.
"""

import importlib

_EXPORTS = {
    "arithmetic": ("COMBINATION_TYPES", "add_weighted_adapter", "add_weighted_adapter_files"),
    "adapter_files": (
        "CONFIG_NAME", "WEIGHTS_NAME", "FingerprintWarning", "adapter_state_dict",
        "base_fingerprint", "load_adapter", "lora_tensor_module", "lorakit_version",
        "read_adapter", "save_adapter",
    ),
    "config": ("ALL_LINEAR", "MAX_ALPHA", "LoraConfig"),
    "errors": (
        "AdapterFileError", "AdapterShapeError", "LoraConfigError", "LoraError",
        "TargetModulesError",
    ),
    "layers": ("Embedding", "Linear", "LoraLayer", "ModulesToSaveWrapper"),
    "merging": ("merge_adapter", "merge_and_unload", "unload", "unmerge_adapter"),
    "mixed_batch": ("MixedBatch",),
    "model": (
        "ParameterCount", "active_adapter", "adapter_config", "adapter_parameters",
        "add_adapter", "configs", "delete_adapter", "disable_adapters", "freeze_base", "inject",
        "lora_layers", "set_adapter", "trainable_parameters",
    ),
    "targeting": ("find_targets", "modules_to_save_names"),
}  # fmt: skip
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value  # the next look-up is an ordinary one
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
