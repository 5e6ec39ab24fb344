"""lorakit's LoRA engine, in plain PyTorch.

LoRA (Hu et al. 2021) freezes a pretrained weight W0 and learns a low-rank change to it:

    h = W0·x + (alpha / r) · B·A·dropout(x)        A: r × in,  B: out × r,  r << min(in, out)

Only A and B train, so an adapter is tiny next to the model, and after training B·A can be
merged into W0 so that inference costs nothing extra.

    layers.py         the LoRA layers (Linear, GPT-2 Conv1D, Embedding) and ModulesToSaveWrapper;
                      each declares its adapter parameters (`adapter_params`)
    targeting.py      which modules get LoRA or are saved whole: PEFT's name matching
    model.py          a model's adapters: inject, add, set, delete, disable; parameter counts
    merging.py        merge into the base weights, unmerge, merge_and_unload, unload
    adapter_files.py  save and load adapters in PEFT's on-disk format
    config.py         LoraConfig, with PEFT's field names and defaults

This package imports nothing else from lorakit, and never PEFT: PEFT compatibility is a matter
of file format and names, tested against PEFT itself.
"""

from .adapter_files import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    FingerprintWarning,
    adapter_state_dict,
    base_fingerprint,
    load_adapter,
    lora_tensor_module,
    lorakit_version,
    read_adapter,
    save_adapter,
)
from .config import ALL_LINEAR, LoraConfig
from .errors import AdapterFileError, AdapterShapeError, LoraError, TargetModulesError
from .layers import Embedding, Linear, LoraLayer, ModulesToSaveWrapper
from .merging import merge_adapter, merge_and_unload, unload, unmerge_adapter
from .model import (
    ParameterCount,
    active_adapter,
    adapter_config,
    adapter_parameters,
    add_adapter,
    configs,
    delete_adapter,
    disable_adapters,
    freeze_base,
    inject,
    lora_layers,
    set_adapter,
    trainable_parameters,
)
from .targeting import find_targets, modules_to_save_names

__all__ = [
    "ALL_LINEAR",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "AdapterFileError",
    "AdapterShapeError",
    "Embedding",
    "FingerprintWarning",
    "Linear",
    "LoraConfig",
    "LoraError",
    "LoraLayer",
    "ModulesToSaveWrapper",
    "ParameterCount",
    "TargetModulesError",
    "active_adapter",
    "adapter_config",
    "adapter_parameters",
    "adapter_state_dict",
    "add_adapter",
    "base_fingerprint",
    "configs",
    "delete_adapter",
    "disable_adapters",
    "find_targets",
    "freeze_base",
    "inject",
    "load_adapter",
    "lora_layers",
    "lora_tensor_module",
    "lorakit_version",
    "merge_adapter",
    "merge_and_unload",
    "modules_to_save_names",
    "read_adapter",
    "save_adapter",
    "set_adapter",
    "trainable_parameters",
    "unload",
    "unmerge_adapter",
]
