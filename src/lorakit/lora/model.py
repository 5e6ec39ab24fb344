"""The adapters of a model: putting LoRA into any `nn.Module`, choosing, disabling, deleting.

`inject` swaps each targeted module (see targeting.py) for a LoRA layer that wraps it (the
module itself is kept as `base_layer`), wraps each `modules_to_save` module, and freezes
everything else. The model's own class and code are untouched, so the result is still the
user's model. Which parameters belong to an adapter, each adapter layer says itself
(`adapter_params`); `adapter_parameters` asks them all.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from .config import LoraConfig
from .errors import LoraError
from .layers import LoraLayer, ModulesToSaveWrapper, make_lora_layer
from .patterns import MatchBudget
from .targeting import find_targets, modules_to_save_names

CONFIGS_ATTR = "lorakit_configs"  # {adapter_name: LoraConfig} kept on the model


# ---------------------------------------------------------------- what a model holds
def configs(model: nn.Module) -> dict[str, LoraConfig]:
    return getattr(model, CONFIGS_ATTR, {})


def adapter_config(model: nn.Module, adapter_name: str) -> LoraConfig:
    """The config of adapter `adapter_name`; an error that lists the model's adapters."""
    config = configs(model).get(adapter_name)
    if config is None:
        raise LoraError(
            f"no adapter named {adapter_name!r}; adapters here: {sorted(configs(model))}"
        )
    return config


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def wrappers(model: nn.Module) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            yield name, module


def adapter_parameters(
    model: nn.Module, adapter_name: str | None = None
) -> dict[str, nn.Parameter]:
    """The adapters' parameters by full name: LoRA's A and B and the trained copies of the
    modules_to_save; those of `adapter_name` alone when given. Every other one is the base's."""
    params: dict[str, nn.Parameter] = {}
    for path, module in model.named_modules():
        if isinstance(module, (LoraLayer, ModulesToSaveWrapper)):
            for name, param in module.adapter_params(adapter_name).items():
                params[f"{path}.{name}" if path else name] = param
    return params


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


# ---------------------------------------------------------------- adding and choosing adapters
def inject(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> nn.Module:
    """Adds LoRA to `model` in place: base frozen, the adapter and modules_to_save trainable."""
    first = not configs(model)
    add_adapter(model, adapter_name, config)
    if first:
        freeze_base(model)
    mark_bias_trainable(model, config.bias)
    set_adapter(model, adapter_name)
    return model


def add_adapter(model: nn.Module, adapter_name: str, config: LoraConfig) -> nn.Module:
    """Adds a new adapter beside any that exist; the active adapter does not change."""
    if adapter_name in configs(model):
        raise LoraError(
            f"the model already has an adapter named {adapter_name!r}; pick another name "
            "or call delete_adapter first"
        )
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise LoraError(f"adapter names are non-empty strings without dots, got {adapter_name!r}")
    config = config.with_task_head()  # stored so: the saved adapter_config.json lists the head
    targets = find_targets(model, config)
    saved = modules_to_save_names(model, config)  # its errors come before the model changes
    budget = MatchBudget()  # each target's own r / lora_alpha, if a pattern says so
    module_configs = {name: config.for_module(name, budget) for name in targets}
    for name, module_config in module_configs.items():
        module = model.get_submodule(name)
        if isinstance(module, LoraLayer):
            module.update_layer(adapter_name, module_config)
        else:
            set_submodule(model, name, make_lora_layer(module, adapter_name, module_config))
    for name in saved:
        module = model.get_submodule(name)
        if isinstance(module, ModulesToSaveWrapper):
            module.update(adapter_name)
        else:
            set_submodule(model, name, ModulesToSaveWrapper(module, adapter_name))
    if not hasattr(model, CONFIGS_ATTR):
        # a plain attribute: invisible to state_dict and to the model's own save methods
        object.__setattr__(model, CONFIGS_ATTR, {})
    configs(model)[adapter_name] = config
    return model


def freeze_base(model: nn.Module) -> None:
    """Every parameter that belongs to no adapter stops training."""
    adapters = {id(p) for p in adapter_parameters(model).values()}
    for param in model.parameters():
        if id(param) not in adapters:
            param.requires_grad = False


def mark_bias_trainable(model: nn.Module, bias: str) -> None:
    """LoraConfig.bias: "all" trains every bias, "lora_only" those of the LoRA layers."""
    if bias == "all":
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.requires_grad = True
    elif bias == "lora_only":
        for _, layer in lora_layers(model):
            if getattr(layer.base_layer, "bias", None) is not None:
                layer.base_layer.bias.requires_grad = True


def set_adapter(model: nn.Module, adapter_name: str) -> None:
    """Makes `adapter_name` the one used in forward and the one whose weights train."""
    trainable = not adapter_config(model, adapter_name).inference_mode
    if any(layer.merged for _, layer in lora_layers(model)):
        # else the merged adapter stays in the weights and adds to the newly active one
        warnings.warn("set_adapter on a merged model: unmerging first, as PEFT does", stacklevel=2)
        for _, layer in lora_layers(model):
            layer.unmerge()
    for _, layer in lora_layers(model):
        layer.active_adapter = adapter_name if adapter_name in layer.r else None
    for _, wrapper in wrappers(model):
        wrapper.active_adapter = adapter_name
        wrapper.original_module.requires_grad_(False)
    for _, module in [*lora_layers(model), *wrappers(model)]:
        for name in module.adapter_names():
            for param in module.adapter_params(name).values():
                param.requires_grad = trainable and name == adapter_name


def active_adapter(model: nn.Module) -> str | None:
    for _, layer in lora_layers(model):
        if layer.active_adapter:
            return layer.active_adapter
    return None


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    adapter_config(model, adapter_name)  # an error when there is none
    was_active = active_adapter(model) == adapter_name
    for _, module in [*lora_layers(model), *wrappers(model)]:
        module.delete_adapter(adapter_name)
    del configs(model)[adapter_name]
    if was_active and configs(model):
        set_adapter(model, next(iter(configs(model))))


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes as its base (merged adapters are taken out)."""
    layers = [m for _, m in lora_layers(model)] + [m for _, m in wrappers(model)]
    merged = {id(m): list(m.merged_adapters) for m in layers if getattr(m, "merged", False)}
    for module in layers:
        if id(module) in merged:
            module.unmerge()
        module.disabled = True
    try:
        yield model
    finally:
        for module in layers:
            module.disabled = False
            if id(module) in merged:
                module.merge(merged[id(module)])


# ---------------------------------------------------------------- counting
@dataclass(frozen=True)
class ParameterCount:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable:,} || all params: {self.total:,} "
            f"|| trainable%: {self.percent:.4f}"
        )


def trainable_parameters(model: nn.Module) -> ParameterCount:
    params = list(model.parameters())
    return ParameterCount(
        trainable=sum(p.numel() for p in params if p.requires_grad),
        total=sum(p.numel() for p in params),
    )
