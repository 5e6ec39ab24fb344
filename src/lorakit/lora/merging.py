"""Writing adapters into the base weights, and taking LoRA out of a model again.

`merge_adapter` adds scaling·B·A of the active adapter to each LoRA layer's base weight (the
layers stay, so `unmerge_adapter` can subtract it again); `merge_and_unload` merges and then
puts the model's original modules back, so that what remains is a plain model that computes
base + adapter; `unload` puts them back without merging, which gives the base model as it was.
"""

from __future__ import annotations

from torch import nn

from .model import CONFIGS_ATTR, lora_layers, set_submodule, wrappers


def merge_adapter(model: nn.Module, safe_merge: bool = False) -> None:
    _untie_merge_targets(model)
    for _, layer in lora_layers(model):
        layer.merge(safe_merge=safe_merge)


def unmerge_adapter(model: nn.Module) -> None:
    for _, layer in lora_layers(model):
        layer.unmerge()


def merge_and_unload(model: nn.Module, safe_merge: bool = False) -> nn.Module:
    """The active adapter written into the base weights; the model's original module types."""
    return _unwrap(model, merge=True, safe_merge=safe_merge)


def unload(model: nn.Module) -> nn.Module:
    """Every adapter taken out without merging: the base model as it was."""
    return _unwrap(model, merge=False)


def _unwrap(model: nn.Module, merge: bool, safe_merge: bool = False) -> nn.Module:
    if merge:
        _untie_merge_targets(model)
    for name, layer in list(lora_layers(model)):
        if merge:
            layer.merge(safe_merge=safe_merge)
        else:
            layer.unmerge()
        set_submodule(model, name, layer.base_layer)
    for name, wrapper in list(wrappers(model)):
        keep = wrapper.active_module() if merge else wrapper.original_module
        set_submodule(model, name, keep)
    if hasattr(model, CONFIGS_ATTR):
        object.__delattr__(model, CONFIGS_ATTR)
    return model


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
