"""Putting LoRA into any `nn.Module`, and taking it out again.

`inject` swaps each targeted module for a LoRA layer that wraps it (the module itself is kept as
`base_layer`), wraps each `modules_to_save` module, and freezes everything else. The model's own
class and code are untouched, so the result is still the user's model.
"""

from __future__ import annotations

import contextlib
import difflib
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from .config import ALL_LINEAR, TASK_HEADS, LoraConfig
from .errors import LoraError, TargetModulesError
from .layers import Conv1D, LoraLayer, ModulesToSaveWrapper, make_lora_layer, supported_types
from .layers import Linear as LoraLinear

CONFIGS_ATTR = "lorakit_configs"  # {adapter_name: LoraConfig} kept on the model
HEAD_NAMES = ("lm_head", "classifier", "score")  # output heads that "all-linear" leaves alone


# ---------------------------------------------------------------- matching module names
def name_matches(name: str, patterns: list[str] | str | None) -> bool:
    """PEFT's rule: a regex string must match the whole name; a list entry must equal the name
    or be its suffix after a dot."""
    if not patterns:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def saved_matches(name: str, modules_to_save: list[str] | None) -> bool:
    """PEFT's rule for modules_to_save: a plain suffix of the name, with no dot before it, so
    "classifier" also saves DistilBERT's "pre_classifier" (PEFT's `_set_trainable`)."""
    return any(name.endswith(m) for m in modules_to_save or [])


def _output_head_names(model: nn.Module) -> set[str]:
    heads: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if (out is not None and module is out) or name in HEAD_NAMES:
            heads.add(name)
    return heads


def _targetable(model: nn.Module, inside: set[str]) -> list[tuple[str, nn.Module]]:
    types = (*supported_types(), LoraLayer)
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, types)
        and name not in inside
        and "lora_" not in name
        and ".modules_to_save." not in name
    ]


def _inside_lora_layers(model: nn.Module) -> set[str]:
    """The modules inside LoRA layers (base_layer, lora_A, ...): a further adapter goes into the
    LoRA layer itself, as in PEFT, never into its base_layer (LoRA inside LoRA)."""
    inside: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            inside.update(f"{name}.{sub}" for sub, _ in module.named_modules() if sub)
    return inside


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Names of the modules `config` puts LoRA on; a clear error when there are none."""
    inside = _inside_lora_layers(model)
    candidates = _targetable(model, inside)
    targetable = dict(candidates)
    if config.target_modules == ALL_LINEAR:
        heads = _output_head_names(model) | {
            n for n, _ in candidates if saved_matches(n, config.modules_to_save)
        }
        linear = (nn.Linear, LoraLinear) + ((Conv1D,) if Conv1D is not None else ())
        names = [n for n, m in candidates if isinstance(m, linear) and n not in heads]
    else:
        names = [
            n
            for n, _ in model.named_modules()
            if name_matches(n, config.target_modules)
            and (n in config.target_modules or _in_layers(n, config))
            and n not in inside
        ]
        unsupported = [n for n in names if n not in targetable and "lora_" not in n]
        if unsupported:
            kind = type(model.get_submodule(unsupported[0])).__name__
            raise TargetModulesError(
                f"target module {unsupported[0]!r} is a {kind}; LoRA layers exist for "
                "Linear, Embedding and GPT-2's Conv1D. Name those layers instead "
                f"(targetable here: {_describe(candidates)})"
            )
        names = [n for n in names if n in targetable]
    names = [n for n in names if not name_matches(n, config.exclude_modules)]
    kept = [n for n in names if not _within(n, config.saved)]
    clash = next((n for n in kept if saved_matches(n, config.saved)), None)
    if clash is not None:
        # PEFT puts LoRA on it, then fails to wrap the LoRA layer (TypeError): no file can result
        saved = next(m for m in config.saved if clash.endswith(m))
        raise TargetModulesError(
            f"target module {clash!r} is also saved whole: its name ends with {saved!r} from "
            "modules_to_save (PEFT saves every module whose name ends so); drop one of the two"
        )
    if names and not kept:
        raise TargetModulesError(
            f"target_modules {config.target_modules!r} matched only modules inside "
            f"modules_to_save {config.saved!r} ({', '.join(names)}), which train whole; "
            "target other layers"
        )
    if not kept:
        raise TargetModulesError(_no_match_message(config.target_modules, candidates))
    return kept


def _in_layers(name: str, config: LoraConfig) -> bool:
    """Is `name` in one of config.layers_to_transform? PEFT's `check_target_module_exists`: the
    index follows a layers_pattern entry, or else is the first number between dots; a name that
    equals a target_modules entry is taken whatever its layer."""
    wanted, patterns = config.layers_to_transform, config.layers_pattern
    if wanted is None or wanted == []:
        return True
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match is not None:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == wanted if isinstance(wanted, int) else index in wanted


def _within(name: str, saved: list[str]) -> bool:
    """Is `name` a modules_to_save module or inside one? PEFT never puts LoRA there, since the
    module trains whole (e.g. a RoBERTa head's `classifier.dense` when `classifier` is saved)."""
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in saved)


def _describe(candidates: list[tuple[str, nn.Module]]) -> str:
    counts: dict[str, tuple[int, str]] = {}
    for name, module in candidates:
        leaf = name.rsplit(".", 1)[-1]
        n, _ = counts.get(leaf, (0, ""))
        counts[leaf] = (n + 1, type(module).__name__)
    return ", ".join(f"{leaf} ({kind} x{n})" for leaf, (n, kind) in counts.items())


def _no_match_message(targets, candidates) -> str:
    leaves = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n, _ in candidates))
    asked = [targets] if isinstance(targets, str) else list(targets or [])
    close = []
    for t in asked:
        close += difflib.get_close_matches(t.rsplit(".", 1)[-1], leaves, n=3, cutoff=0.3)
    ordered = list(dict.fromkeys(close + leaves))
    return (
        f"target_modules {targets!r} matched no module of this model. "
        f"Module names LoRA can target, closest first: {', '.join(ordered)}. "
        f"In detail: {_describe(candidates)}. Set target_modules to some of these "
        "(or 'all-linear')."
    )


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


# ---------------------------------------------------------------- adding and choosing adapters
def configs(model: nn.Module) -> dict[str, LoraConfig]:
    return getattr(model, CONFIGS_ATTR, {})


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def _wrappers(model: nn.Module) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            yield name, module


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
    for name in targets:
        module = model.get_submodule(name)
        module_config = config.for_module(name)  # its own r / lora_alpha, if a pattern says so
        if isinstance(module, LoraLayer):
            module.update_layer(adapter_name, module_config)
        else:
            _set_submodule(model, name, make_lora_layer(module, adapter_name, module_config))
    _add_modules_to_save(model, adapter_name, saved)
    if not hasattr(model, CONFIGS_ATTR):
        # a plain attribute: invisible to state_dict and to the model's own save methods
        object.__setattr__(model, CONFIGS_ATTR, {})
    configs(model)[adapter_name] = config
    return model


def _add_modules_to_save(model: nn.Module, adapter_name: str, names: list[str]) -> None:
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, ModulesToSaveWrapper):
            module.update(adapter_name)
        else:
            _set_submodule(model, name, ModulesToSaveWrapper(module, adapter_name))


def modules_to_save_names(model: nn.Module, config: LoraConfig) -> list[str]:
    """The modules that `config.modules_to_save` (its task's head included) trains whole."""
    config = config.with_task_head()
    if not config.saved:
        return []
    names = [
        name
        for name, _ in model.named_modules()
        if saved_matches(name, config.saved)
        and "lora_" not in name
        and ".modules_to_save." not in name
        and not name.endswith(".original_module")
        and ".original_module." not in name
    ]
    for inner in names:
        outer = next((n for n in names if inner.startswith(n + ".")), None)
        if outer is not None:
            # PEFT would wrap both and write a file that neither engine reads back
            raise TargetModulesError(
                f"modules_to_save names {inner!r}, which lies inside {outer!r}, also saved "
                f"whole; drop {inner.rsplit('.', 1)[-1]!r} from modules_to_save"
                + (
                    f" (with task_type {config.task_type!r} the head is always saved)"
                    if config.task_type in TASK_HEADS
                    else ""
                )
            )
    own = [m for m in config.saved if m not in TASK_HEADS.get(config.task_type or "", ())]
    if own and not any(saved_matches(n, own) for n in names):
        top = [n for n, _ in model.named_children()]
        raise TargetModulesError(
            f"modules_to_save {config.modules_to_save!r} matched no module; "
            f"top-level modules here: {', '.join(top)}"
        )
    return names


def set_adapter(model: nn.Module, adapter_name: str) -> None:
    """Makes `adapter_name` the one used in forward and the one whose weights train."""
    if adapter_name not in configs(model):
        raise LoraError(
            f"no adapter named {adapter_name!r}; adapters here: {sorted(configs(model))}"
        )
    trainable = not configs(model)[adapter_name].inference_mode
    if any(layer.merged for _, layer in lora_layers(model)):
        # else the merged adapter stays in the weights and adds to the newly active one
        warnings.warn("set_adapter on a merged model: unmerging first, as PEFT does", stacklevel=2)
        unmerge_adapter(model)
    for _, layer in lora_layers(model):
        layer.active_adapter = adapter_name if adapter_name in layer.r else None
        for name, param in layer.named_parameters():
            if "lora_" in name:  # e.g. "lora_A.<adapter>.weight" or "lora_embedding_A.<adapter>"
                param.requires_grad = trainable and name.split(".")[1] == adapter_name
    for _, wrapper in _wrappers(model):
        wrapper.active_adapter = adapter_name
        wrapper.original_module.requires_grad_(False)
        for name, sub in wrapper.modules_to_save.items():
            sub.requires_grad_(trainable and name == adapter_name)


def active_adapter(model: nn.Module) -> str | None:
    for _, layer in lora_layers(model):
        if layer.active_adapter:
            return layer.active_adapter
    return None


def inject(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> nn.Module:
    """Adds LoRA to `model` in place: base frozen, the adapter and modules_to_save trainable."""
    first = not configs(model)
    add_adapter(model, adapter_name, config)
    if first:
        for name, param in model.named_parameters():
            if "lora_" not in name and ".modules_to_save." not in name:
                param.requires_grad = False
    _mark_bias_trainable(model, config.bias)
    set_adapter(model, adapter_name)
    return model


def _mark_bias_trainable(model: nn.Module, bias: str) -> None:
    if bias == "all":
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.requires_grad = True
    elif bias == "lora_only":
        for _, layer in lora_layers(model):
            if getattr(layer.base_layer, "bias", None) is not None:
                layer.base_layer.bias.requires_grad = True


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    if adapter_name not in configs(model):
        raise LoraError(
            f"no adapter named {adapter_name!r}; adapters here: {sorted(configs(model))}"
        )
    was_active = active_adapter(model) == adapter_name
    for _, module in list(lora_layers(model)) + list(_wrappers(model)):
        module.delete_adapter(adapter_name)
    del configs(model)[adapter_name]
    if was_active and configs(model):
        set_adapter(model, next(iter(configs(model))))


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes as its base (merged adapters are taken out)."""
    layers = [m for _, m in lora_layers(model)] + [m for _, m in _wrappers(model)]
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


# ---------------------------------------------------------------- merging and unloading
def merge_adapter(model: nn.Module, safe_merge: bool = False) -> None:
    _untie_merge_targets(model)
    for _, layer in lora_layers(model):
        layer.merge(safe_merge=safe_merge)


def _untie_merge_targets(model: nn.Module) -> None:
    """Give a LoRA layer its own copy of a weight it shares with another module before merging.

    GPT-2's output head is the token embedding's matrix: merging a head adapter into it in place
    would change the input embeddings as well, and the merged model would no longer compute what
    base + adapter computed. After the copy the two are separate weights, and the model's config
    says so (``tie_word_embeddings = False``), so a saved merged model loads untied."""
    uses: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        uses[id(param)] = uses.get(id(param), 0) + 1
    untied = False
    for _, layer in lora_layers(model):
        weight = layer.base_layer.weight
        if uses.get(id(weight), 0) > 1 and not layer.merged:
            layer.base_layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
            untied = True
    config = getattr(model, "config", None)
    if untied and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False


def unmerge_adapter(model: nn.Module) -> None:
    for _, layer in lora_layers(model):
        layer.unmerge()


def _unwrap(model: nn.Module, merge: bool, safe_merge: bool = False) -> nn.Module:
    if merge:
        _untie_merge_targets(model)
    for name, layer in list(lora_layers(model)):
        if merge:
            layer.merge(safe_merge=safe_merge)
        else:
            layer.unmerge()
        _set_submodule(model, name, layer.base_layer)
    for name, wrapper in list(_wrappers(model)):
        keep = wrapper.active_module() if merge else wrapper.original_module
        _set_submodule(model, name, keep)
    if hasattr(model, CONFIGS_ATTR):
        object.__delattr__(model, CONFIGS_ATTR)
    return model


def merge_and_unload(model: nn.Module, safe_merge: bool = False) -> nn.Module:
    """The active adapter written into the base weights; the model's original module types."""
    return _unwrap(model, merge=True, safe_merge=safe_merge)


def unload(model: nn.Module) -> nn.Module:
    """Every adapter taken out without merging: the base model as it was."""
    return _unwrap(model, merge=False)


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
