"""A new adapter made from others: PEFT's `add_weighted_adapter` and its combination types.

Each adapter i changes a layer by ΔW_i = s_i·B_i·A_i (s_i its scaling). The new adapter (scaling 1):

    cat                  A = [w_1·s_1·A_1 ; w_2·s_2·A_2 ; ...],  B = [B_1 | B_2 | ...]
                         so B·A = Σ w_i·ΔW_i exactly, at rank Σ r_i
    svd (and *_svd)      the rank-k SVD of Σ w_i·ΔW_i (k = svd_rank, else the largest r_i): the
                         best rank-k approximation; ties_svd, dare_*_svd, magnitude_prune_svd
                         prune and merge the ΔW_i below before the SVD
    linear               A = Σ ±√|w_i·s_i|·A_i,  B = Σ √|w_i·s_i|·B_i (the sign on A): the factors
                         are combined, not the updates, so B·A has cross terms B_i·A_j (i ≠ j);
                         exact for one adapter, an approximation otherwise (PEFT says so too)
    ties                 per factor: keep the `density` largest entries of each (magnitude), elect
                         each entry's sign (the sum's, or the most frequent: majority_sign_method),
                         average the weighted entries that agree with it (Yadav et al. 2023)
    dare_linear          per factor: keep each entry with probability `density` and divide by it
                         (torch.bernoulli: seed torch for repeatable results), then linear
                         (Yu et al. 2023); dare_ties: the same, then ties' sign election
    magnitude_prune      per factor: the `density` largest entries, then linear

The factor-wise types need the same rank in each layer; cat and svd take any ranks.

Where PEFT 0.21.2 errs, lorakit does not (tests/test_weighted_adapters.py shows each): the new
adapter keeps each layer's own rank (PEFT drops `rank_pattern`, so a `linear` merge of adapters with
one saves a file that does not load) and has scaling 1 (PEFT copies the first adapter's
`use_rslora`, which scales the result by √r); a module saved whole keeps the trained copy (PEFT
takes a fresh copy of the base's); the new adapter covers every layer any of the adapters covers.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from .errors import LoraError
from .initialisation import mutates_base
from .layers import Embedding, LoraLayer
from .model import adapter_config, add_adapter, configs, lora_layers, wrappers

FACTOR_WISE = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATION_TYPES = ("cat", *FACTOR_WISE, *SVD)
NEEDS_DENSITY = tuple(t for t in COMBINATION_TYPES if t not in ("cat", "linear", "svd"))
SIGN_METHODS = ("total", "frequency")


def add_weighted_adapter(
    model: nn.Module,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
) -> nn.Module:
    """Adds `adapter_name`, the combination of `adapters` with `weights` (PEFT's arguments and
    names); the active adapter does not change."""
    _check(model, adapters, weights, adapter_name, combination_type, density, majority_sign_method)
    if len(adapters) == 1:  # PEFT's rule: one adapter is only scaled
        combination_type = "linear"
    ranks = {path: _ranks(layer, adapters) for path, layer in lora_layers(model)}
    ranks = {path: r for path, r in ranks.items() if r}
    new_ranks = {path: _new_rank(r, combination_type, svd_rank) for path, r in ranks.items()}
    if combination_type in SVD:  # no more singular values than the update has
        layers = dict(lora_layers(model))
        new_ranks = {path: min(r, *_factors_shape(layers[path])) for path, r in new_ranks.items()}
    if combination_type in FACTOR_WISE:
        _check_equal_ranks(ranks, combination_type)
    add_adapter(
        model, adapter_name, _new_config(model, adapters, combination_type, svd_rank, new_ranks)
    )
    for path, layer in lora_layers(model):
        if path not in ranks:
            continue
        present = [(a, w) for a, w in zip(adapters, weights, strict=True) if a in layer.r]
        if combination_type == "cat":
            A, B = _cat(layer, present)
        elif combination_type in SVD:
            A, B = _svd(layer, present, combination_type, new_ranks[path], density,
                        majority_sign_method, svd_clamp, svd_full_matrices, svd_driver)  # fmt: skip
        else:
            A, B = _factor_wise(layer, present, combination_type, density, majority_sign_method)
        new_A, new_B = _factors(layer, adapter_name)
        with torch.no_grad():
            new_A.copy_(A)
            new_B.copy_(B)
    _copy_saved_modules(model, adapters, adapter_name)
    return model


# ---------------------------------------------------------------- checks and the new config
def _check(model, adapters, weights, adapter_name, combination_type, density, sign_method) -> None:
    for name in adapters:
        adapter_config(model, name)  # an error that lists the model's adapters
    if not adapters:
        raise LoraError("add_weighted_adapter needs at least one adapter to combine")
    if len(weights) != len(adapters):
        raise LoraError(
            f"{len(weights)} weight(s) for {len(adapters)} adapter(s); give one weight per "
            "adapter, e.g. weights=[0.5, 0.5]"
        )
    if not all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights):
        raise LoraError(f"weights must be finite numbers, got {weights!r}")
    if adapter_name in configs(model):
        raise LoraError(
            f"the model already has an adapter named {adapter_name!r}; pick another name"
        )
    if combination_type not in COMBINATION_TYPES:
        raise LoraError(
            f"unknown combination_type {combination_type!r}; use one of {', '.join(COMBINATION_TYPES)}"
        )
    if combination_type in NEEDS_DENSITY and not (
        isinstance(density, (int, float)) and 0 < density <= 1
    ):
        raise LoraError(
            f"combination_type {combination_type!r} needs a density in (0, 1], the share of "
            f"entries kept (e.g. density=0.5), got {density!r}"
        )
    if sign_method not in SIGN_METHODS:
        raise LoraError(f"majority_sign_method must be 'total' or 'frequency', got {sign_method!r}")
    mutated = [a for a in adapters if mutates_base(adapter_config(model, a).init_lora_weights)]
    if mutated:
        raise LoraError(
            f"adapter {mutated[0]!r} started from the base weights (PiSSA/OLoRA), which it changed; "
            "save it with convert_to_lora=True and combine the loaded plain LoRA adapter"
        )
    for path, wrapper in wrappers(model):
        owners = [a for a in adapters if a in wrapper.modules_to_save]
        if len(owners) > 1:
            raise LoraError(
                f"adapters {owners[0]!r} and {owners[1]!r} both train {path!r} whole, and whole "
                "modules cannot be combined; combine adapters of which at most one saves it"
            )


def _ranks(layer: LoraLayer, adapters: list[str]) -> list[int]:
    return [layer.r[a] for a in adapters if a in layer.r]


def _new_rank(ranks: list[int], combination_type: str, svd_rank: int | None) -> int:
    if combination_type == "cat":
        return sum(ranks)
    if combination_type in SVD:
        return svd_rank or max(ranks)
    return ranks[0]


def _check_equal_ranks(ranks: dict[str, list[int]], combination_type: str) -> None:
    for path, layer_ranks in ranks.items():
        if len(set(layer_ranks)) > 1:
            raise LoraError(
                f"combination_type {combination_type!r} needs the same r in each layer, but "
                f"{path!r} has ranks {layer_ranks}; use 'cat' or 'svd' for adapters of other ranks"
            )


def _new_config(model, adapters, combination_type, svd_rank, new_ranks: dict[str, int]):
    """The first adapter's config (as in PEFT) with the new ranks, scaling 1 and exactly the
    layers any of the adapters adapts."""
    first = adapter_config(model, adapters[0])
    max_ranks = [
        max([c.r, *c.rank_pattern.values()]) for c in (configs(model)[a] for a in adapters)
    ]
    r = _new_rank(max_ranks, combination_type, svd_rank)  # PEFT's r, so most layers need no pattern
    pattern = {path: rank for path, rank in new_ranks.items() if rank != r}
    return dataclasses.replace(
        first,
        r=r,
        lora_alpha=r,
        use_rslora=False,
        init_lora_weights=True,  # overwritten; drawn as PEFT draws, so dare's masks match
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        target_modules=sorted(new_ranks),
        layers_to_transform=None,
        layers_pattern=None,
        modules_to_save=sorted({m for a in adapters for m in configs(model)[a].saved}) or None,
        inference_mode=True,
    )


def _copy_saved_modules(model: nn.Module, adapters: list[str], adapter_name: str) -> None:
    """A module saved whole by one of the adapters: the new adapter takes its trained copy."""
    for _, wrapper in wrappers(model):
        owner = next((a for a in adapters if a in wrapper.modules_to_save), None)
        if owner is not None and adapter_name in wrapper.modules_to_save:
            wrapper.modules_to_save[adapter_name].load_state_dict(
                wrapper.modules_to_save[owner].state_dict()
            )


# ---------------------------------------------------------------- the combinations
def _factors(layer: LoraLayer, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of `adapter` in `layer`: r × in and out × r for every layer type."""
    if isinstance(layer, Embedding):
        return layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter]
    return layer.lora_A[adapter].weight, layer.lora_B[adapter].weight


def _factors_shape(layer: LoraLayer) -> tuple[int, int]:
    """(in, out) of the update: the largest rank it can have is the smaller one."""
    weight = layer.base_layer.weight
    return tuple(weight.shape)


def _cat(layer, present):
    As, Bs = [], []
    for adapter, weight in present:
        A, B = _factors(layer, adapter)
        As.append(A.data * weight * layer.scaling[adapter])
        Bs.append(B.data)
    return torch.cat(As, dim=0), torch.cat(Bs, dim=1)


def _factor_wise(layer, present, combination_type, density, sign_method):
    """PEFT's `_generalized_task_arithmetic_weighted_adapter`: A and B merged each on its own,
    with √|w·s| on both sides and the sign on A."""
    weights_A, weights_B, As, Bs = [], [], [], []
    for adapter, weight in present:
        A, B = _factors(layer, adapter)
        weighted = weight * layer.scaling[adapter]
        sign = 1 if weighted >= 0 else -1
        weights_A.append(math.sqrt(abs(weighted)) * sign)
        weights_B.append(math.sqrt(abs(weighted)))
        As.append(A.data)
        Bs.append(B.data)
    dtype = As[0].dtype
    merged = [
        merge_tensors(
            tensors,
            torch.tensor(weights).to(tensors[0].device),
            combination_type,
            density,
            sign_method,
        ).to(dtype)  # fmt: skip
        for tensors, weights in ((As, weights_A), (Bs, weights_B))
    ]
    return merged[0], merged[1]


def _svd(layer, present, combination_type, rank, density, sign_method, clamp, full, driver):
    """PEFT's `_svd_generalized_task_arithmetic_weighted_adapter`: the updates merged, then
    the rank-`rank` SVD of the result as B = U·S, A = Vh."""
    deltas = [layer.get_delta_weight(a) for a, _ in present]  # scaling included
    weights = torch.tensor([w for _, w in present]).to(deltas[0].device)
    method = "linear" if combination_type == "svd" else combination_type.removesuffix("_svd")
    delta = merge_tensors(deltas, weights, method, density, sign_method)
    if getattr(layer, "fan_in_fan_out", False) or isinstance(layer, Embedding):
        delta = delta.T  # out × in
    U, S, Vh = torch.linalg.svd(delta, full_matrices=full, driver=driver)
    U, S, Vh = U[:, :rank], S[:rank], Vh[:rank, :]
    U = U @ torch.diag(S)
    if clamp is not None:
        high = torch.quantile(torch.cat([U.flatten(), Vh.flatten()]), clamp)
        U, Vh = U.clamp(-high, high), Vh.clamp(-high, high)
    return Vh, U


# ---------------------------------------------------------------- merging tensors (PEFT's merge_utils)
def merge_tensors(
    tensors: list[torch.Tensor],
    weights: torch.Tensor,
    method: str,
    density: float | None = None,
    sign_method: str = "total",
) -> torch.Tensor:
    """Σ weights·tensors after `method`'s pruning; ties and dare_ties keep, per entry, only the
    values of the elected sign and average them."""
    if method in ("ties", "magnitude_prune"):
        tensors = [magnitude_prune(t, density) for t in tensors]
    elif method in ("dare_linear", "dare_ties"):
        tensors = [random_prune(t, density) for t in tensors]
    stacked = torch.stack(tensors, dim=0)
    weighted = stacked * weights.view(weights.shape + (1,) * (stacked.dim() - 1))
    if method not in ("ties", "dare_ties"):
        return weighted.sum(dim=0)
    agree = majority_sign_mask(stacked, sign_method)
    return (weighted * agree).sum(dim=0) / torch.clamp(agree.sum(dim=0), min=1.0)


def magnitude_prune(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """The int(density·n) entries of largest magnitude; the rest zero."""
    if density >= 1:
        return tensor
    mask = torch.zeros_like(tensor).reshape(-1)
    top = torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel()), largest=True)
    mask[top[1]] = 1
    return tensor * mask.reshape(tensor.shape)


def random_prune(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Each entry kept with probability `density` and divided by it (DARE's rescaling)."""
    if density >= 1:
        return tensor
    mask = torch.bernoulli(torch.full_like(input=tensor, fill_value=density))
    return tensor * mask / density


def majority_sign_mask(stacked: torch.Tensor, method: str = "total") -> torch.Tensor:
    """Where each tensor's sign is the elected one: the sign of the sum ("total") or the most
    frequent sign ("frequency"); a tie elects +."""
    sign = stacked.sign()
    magnitude = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    return sign == torch.where(magnitude >= 0, 1, -1)
