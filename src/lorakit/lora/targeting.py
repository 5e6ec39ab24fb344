"""Which modules of a model get LoRA, and which are saved whole: PEFT's name matching.

    target_modules       a list entry matches a module whose full name equals it or ends with
                         "." + entry; a string is a regex that must match the whole name
                         (in bounded time: `lorakit.lora.patterns`);
                         "all-linear" takes every linear layer except the output head
    exclude_modules      the same forms; never targeted
    layers_to_transform  only the modules of these layer indices (with `layers_pattern`)
    modules_to_save      a module whose full name ends with an entry (no dot needed)

A wrong name fails here, before the model changes, with the names that do exist (closest
first), which PEFT's errors do not list.
"""

from __future__ import annotations

import difflib
import re

from torch import nn

from .config import ALL_LINEAR, TASK_HEADS, LoraConfig
from .errors import TargetModulesError
from .layers import Conv1D, LoraLayer, ModulesToSaveWrapper, supported_types
from .layers import Linear as LoraLinear
from .patterns import MatchBudget, fullmatch, layer_index

HEAD_NAMES = ("lm_head", "classifier", "score")  # output heads that "all-linear" leaves alone


def name_matches(
    name: str,
    patterns: list[str] | str | None,
    setting: str = "target_modules",
    budget: MatchBudget | None = None,
) -> bool:
    """PEFT's rule: a regex string must match the whole name (within `budget`: a `setting`
    error when it takes too long); a list entry must equal the name or be its suffix after a
    dot."""
    if not patterns:
        return False
    if isinstance(patterns, str):
        return fullmatch(patterns, name, setting, budget)
    return any(name == p or name.endswith("." + p) for p in patterns)


def saved_matches(name: str, modules_to_save: list[str] | None) -> bool:
    """PEFT's rule for modules_to_save: a plain suffix of the name, with no dot before it, so
    "classifier" also saves DistilBERT's "pre_classifier" (PEFT's `_set_trainable`)."""
    return any(name.endswith(m) for m in modules_to_save or [])


# ---------------------------------------------------------------- target_modules
def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Names of the modules `config` puts LoRA on; a clear error when there are none."""
    inside = _inside_adapters(model)
    candidates = _targetable(model, inside)
    budget = MatchBudget()
    if config.target_modules == ALL_LINEAR:
        names = _all_linear(model, candidates, config.saved)
    else:
        names = _named(model, config, inside, candidates, budget)
    excluded = config.exclude_modules
    names = [n for n in names if not name_matches(n, excluded, "exclude_modules", budget)]
    kept = [n for n in names if not _within(n, config.saved)]
    _check_not_saved(kept, config.saved)
    if names and not kept:
        raise TargetModulesError(
            f"target_modules {config.target_modules!r} matched only modules inside "
            f"modules_to_save {config.saved!r} ({', '.join(names)}), which train whole; "
            "target other layers"
        )
    if not kept:
        raise TargetModulesError(_no_match_message(config.target_modules, candidates))
    return kept


def _inside_adapters(model: nn.Module) -> set[str]:
    """The modules inside LoRA layers (base_layer, lora_A, ...) and inside modules_to_save
    wrappers: a further adapter goes into the LoRA layer or the wrapper itself, as in PEFT,
    never into what it holds (LoRA inside LoRA)."""
    inside: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, (LoraLayer, ModulesToSaveWrapper)):
            inside.update(f"{name}.{sub}" for sub, _ in module.named_modules() if sub)
    return inside


def _targetable(model: nn.Module, inside: set[str]) -> list[tuple[str, nn.Module]]:
    types = (*supported_types(), LoraLayer)
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, types) and name not in inside
    ]


def _all_linear(model: nn.Module, candidates: list[tuple[str, nn.Module]], saved: list[str]):
    """PEFT's "all-linear": every linear layer but the output head and the saved modules."""
    heads = _output_head_names(model) | {n for n, _ in candidates if saved_matches(n, saved)}
    linear = (nn.Linear, LoraLinear) + ((Conv1D,) if Conv1D is not None else ())
    return [n for n, m in candidates if isinstance(m, linear) and n not in heads]


def _output_head_names(model: nn.Module) -> set[str]:
    heads: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if (out is not None and module is out) or name in HEAD_NAMES:
            heads.add(name)
    return heads


def _named(model, config: LoraConfig, inside: set[str], candidates, budget) -> list[str]:
    """The modules a list or regex target_modules names, in the layers asked for; an error
    when one of them has no LoRA layer."""
    names = [
        n
        for n, _ in model.named_modules()
        if name_matches(n, config.target_modules, "target_modules", budget)
        and (n in config.target_modules or _in_layers(n, config, budget))
        and n not in inside
    ]
    targetable = dict(candidates)
    unsupported = [n for n in names if n not in targetable]
    if unsupported:
        kind = type(model.get_submodule(unsupported[0])).__name__
        raise TargetModulesError(
            f"target module {unsupported[0]!r} is a {kind}; LoRA layers exist for "
            "Linear, Embedding and GPT-2's Conv1D. Name those layers instead "
            f"(targetable here: {_describe(candidates)})"
        )
    return names


def _in_layers(name: str, config: LoraConfig, budget: MatchBudget) -> bool:
    """Is `name` in one of config.layers_to_transform? PEFT's `check_target_module_exists`: the
    index follows a layers_pattern entry, or else is the first number between dots; a name that
    equals a target_modules entry is taken whatever its layer."""
    wanted, patterns = config.layers_to_transform, config.layers_pattern
    if wanted is None or wanted == []:
        return True
    index = None
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
        index = None if match is None else int(match.group("idx"))
    else:
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            index = layer_index(pattern, name, "layers_pattern", budget)
            if index is not None:
                break
    if index is None:
        return False
    return index == wanted if isinstance(wanted, int) else index in wanted


def _within(name: str, saved: list[str]) -> bool:
    """Is `name` a modules_to_save module or inside one? PEFT never puts LoRA there, since the
    module trains whole (e.g. a RoBERTa head's `classifier.dense` when `classifier` is saved)."""
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in saved)


def _check_not_saved(targets: list[str], saved: list[str]) -> None:
    """A target that modules_to_save also names: PEFT puts LoRA on it, then fails to wrap the
    LoRA layer (TypeError), so no file can result."""
    clash = next((n for n in targets if saved_matches(n, saved)), None)
    if clash is not None:
        entry = next(m for m in saved if clash.endswith(m))
        raise TargetModulesError(
            f"target module {clash!r} is also saved whole: its name ends with {entry!r} from "
            "modules_to_save (PEFT saves every module whose name ends so); drop one of the two"
        )


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


# ---------------------------------------------------------------- modules_to_save
def modules_to_save_names(model: nn.Module, config: LoraConfig) -> list[str]:
    """The modules that `config.modules_to_save` (its task's head included) trains whole."""
    config = config.with_task_head()
    if not config.saved:
        return []
    inside = _inside_adapters(model)
    names = [
        name
        for name, _ in model.named_modules()
        if saved_matches(name, config.saved) and name not in inside
    ]
    _check_not_nested(names, config)
    own = [m for m in config.saved if m not in TASK_HEADS.get(config.task_type or "", ())]
    if own and not any(saved_matches(n, own) for n in names):
        top = [n for n, _ in model.named_children()]
        raise TargetModulesError(
            f"modules_to_save {config.modules_to_save!r} matched no module; "
            f"top-level modules here: {', '.join(top)}"
        )
    return names


def _check_not_nested(names: list[str], config: LoraConfig) -> None:
    """A saved module inside another saved one: PEFT would wrap both and write a file that
    neither engine reads back."""
    for inner in names:
        outer = next((n for n in names if inner.startswith(n + ".")), None)
        if outer is None:
            continue
        why = ""
        if config.task_type in TASK_HEADS:
            why = f" (with task_type {config.task_type!r} the head is always saved)"
        raise TargetModulesError(
            f"modules_to_save names {inner!r}, which lies inside {outer!r}, also saved whole; "
            f"drop {inner.rsplit('.', 1)[-1]!r} from modules_to_save{why}"
        )
