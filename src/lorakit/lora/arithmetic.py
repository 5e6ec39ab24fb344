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
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import save_file
from torch import nn

from .adapter_files import (
    CONFIG_NAME,
    PREFIX,
    WEIGHTS_NAME,
    _write_files,
    lora_tensor_module,
    lorakit_version,
    read_adapter,
)
from .config import LoraConfig
from .errors import AdapterFileError, LoraError
from .initialisation import mutates_base
from .layers import Embedding, LoraLayer
from .model import adapter_config, add_adapter, configs, lora_layers, wrappers

FACTOR_WISE = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATION_TYPES = ("cat", *FACTOR_WISE, *SVD)
NEEDS_DENSITY = tuple(t for t in COMBINATION_TYPES if t not in ("cat", "linear", "svd"))
SIGN_METHODS = ("total", "frequency")


class Factors(NamedTuple):
    """One adapter's update of one module."""

    index: int  # the adapter's place in the list of adapters (its weight)
    A: torch.Tensor  # r × in
    B: torch.Tensor  # out × r
    scaling: float
    transposed: bool  # the module stores ΔWᵀ (GPT-2's Conv1D, embeddings): PEFT merges it so


@dataclasses.dataclass(frozen=True)
class Combination:
    """How adapters are combined: PEFT's `add_weighted_adapter` arguments past the names."""

    combination_type: str = "svd"
    svd_rank: int | None = None
    svd_clamp: float | None = None
    svd_full_matrices: bool = True
    svd_driver: str | None = None
    density: float | None = None
    majority_sign_method: str = "total"

    def check(self, adapters: Sequence, weights: Sequence) -> None:
        """One-line errors for arguments no combination can use."""
        if not adapters:
            raise LoraError("add_weighted_adapter needs at least one adapter to combine")
        if len(weights) != len(adapters):
            raise LoraError(
                f"{len(weights)} weight(s) for {len(adapters)} adapter(s); give one weight per "
                "adapter, e.g. weights=[0.5, 0.5]"
            )
        if not all(_is_number(w) and math.isfinite(w) for w in weights):
            raise LoraError(f"weights must be finite numbers, e.g. [0.5, 0.5], got {weights!r}")
        kind = self.combination_type
        if kind not in COMBINATION_TYPES:
            raise LoraError(
                f"unknown combination type {kind!r}; use one of {', '.join(COMBINATION_TYPES)}"
            )
        if kind in NEEDS_DENSITY and not (_is_number(self.density) and 0 < self.density <= 1):
            raise LoraError(
                f"combination type {kind!r} needs a density in (0, 1], the share of entries "
                f"kept (e.g. density=0.5), got {self.density!r}"
            )
        if self.majority_sign_method not in SIGN_METHODS:
            raise LoraError(
                "majority_sign_method must be 'total' or 'frequency', "
                f"got {self.majority_sign_method!r}"
            )
        if self.svd_rank is not None and not (_is_number(self.svd_rank) and self.svd_rank >= 1):
            raise LoraError(f"svd_rank must be a positive integer, got {self.svd_rank!r}")

    def for_adapters(self, count: int) -> Combination:
        # PEFT's rule: a single adapter is only scaled
        return dataclasses.replace(self, combination_type="linear") if count == 1 else self


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
    how = Combination(combination_type, svd_rank, svd_clamp, svd_full_matrices, svd_driver,
                      density, majority_sign_method)  # fmt: skip
    how.check(adapters, weights)
    _check_model(model, adapters, adapter_name)
    how = how.for_adapters(len(adapters))
    layers = dict(lora_layers(model))
    modules = {path: _layer_factors(layer, adapters) for path, layer in layers.items()}
    modules = {path: factors for path, factors in modules.items() if factors}
    new_ranks = combined_ranks(modules, how)
    config = combined_config([configs(model)[a] for a in adapters], how, new_ranks)
    add_adapter(model, adapter_name, config)  # its start draws what PEFT's draws (dare's seed)
    with torch.no_grad():
        for path, (A, B) in combine(modules, weights, how, new_ranks).items():
            new_A, new_B = _factors(layers[path], adapter_name)
            new_A.copy_(A)
            new_B.copy_(B)
    _copy_saved_modules(model, adapters, adapter_name)
    return model


def combined_ranks(modules: dict[str, list[Factors]], how: Combination) -> dict[str, int]:
    """Each module's rank in the combination (an error where a factor-wise type meets ranks
    that differ)."""
    ranks = {}
    for path, factors in modules.items():
        layer_ranks = [f.A.shape[0] for f in factors]
        if how.combination_type in FACTOR_WISE and len(set(layer_ranks)) > 1:
            raise LoraError(
                f"combination type {how.combination_type!r} needs the same r in each module, but "
                f"{path!r} has ranks {layer_ranks}; use 'cat' or 'svd' for adapters of other ranks"
            )
        ranks[path] = _new_rank(layer_ranks, how)
        if how.combination_type in SVD:  # no more singular values than the update has
            ranks[path] = min(ranks[path], factors[0].A.shape[1], factors[0].B.shape[0])
    return ranks


def combine(
    modules: dict[str, list[Factors]],
    weights: Sequence[float],
    how: Combination,
    new_ranks: dict[str, int],
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The new (A, B) of each module, in the order given (dare draws its masks in that order)."""
    combined = {}
    for path, factors in modules.items():
        if how.combination_type == "cat":
            combined[path] = _cat(factors, weights)
        elif how.combination_type in SVD:
            combined[path] = _svd(factors, weights, how, new_ranks[path])
        else:
            combined[path] = _factor_wise(factors, weights, how)
    return combined


def combined_config(
    sources: list[LoraConfig], how: Combination, new_ranks: dict[str, int]
) -> LoraConfig:
    """The first adapter's config (as in PEFT) with the new ranks, scaling 1 and exactly the
    modules any of the adapters adapts (by full name)."""
    max_ranks = [max([c.r, *c.rank_pattern.values()]) for c in sources]
    r = _new_rank(max_ranks, how)  # PEFT's r, so that most modules need no pattern
    pattern = {path: rank for path, rank in new_ranks.items() if rank != r}
    return dataclasses.replace(
        sources[0],
        r=r,
        lora_alpha=r,
        use_rslora=False,
        init_lora_weights=True,  # overwritten; drawn as PEFT draws, so dare's masks match
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        target_modules=sorted(new_ranks),
        layers_to_transform=None,
        layers_pattern=None,
        modules_to_save=sorted({m for c in sources for m in c.saved}) or None,
        inference_mode=True,
    )


# ---------------------------------------------------------------- adapter folders
def add_weighted_adapter_files(
    folders: Sequence[str | os.PathLike],
    weights: Sequence[float],
    out: str | os.PathLike,
    combination_type: str = "svd",
    **options,
) -> Path:
    """The combination of the adapters in `folders`, written to `out` as an adapter folder that
    lorakit and PEFT load on the same base; no model is needed. `options`: the rest of
    `add_weighted_adapter`'s arguments (density, svd_rank, ...)."""
    how = Combination(combination_type, **options)
    how.check(folders, weights)
    how = how.for_adapters(len(folders))
    files = [read_adapter(folder) for folder in folders]
    _check_same_base(folders, files)
    modules: dict[str, list[Factors]] = {}
    whole: dict[str, torch.Tensor] = {}  # modules saved whole, biases: taken as they are
    embeddings = set()
    for i, (folder, (config, tensors, _)) in enumerate(zip(folders, files, strict=True)):
        if mutates_base(config.init_lora_weights):
            raise AdapterFileError(
                f"{folder} holds a {config.init_lora_weights} adapter saved unconverted; save it "
                "with convert_to_lora=True (a plain LoRA adapter of the untouched base) first"
            )
        for path, (A, B, embedding) in _file_factors(tensors).items():
            scaling = config.for_module(path).scaling
            transposed = embedding or config.fan_in_fan_out
            if embedding:
                embeddings.add(path)
            modules.setdefault(path, []).append(Factors(i, A, B, scaling, transposed))
        for key, tensor in tensors.items():
            if lora_tensor_module(key) is None:
                if key in whole:
                    raise LoraError(
                        f"{key.removeprefix(PREFIX)} is saved whole by more than one adapter and "
                        "whole modules cannot be combined; combine adapters of which one saves it"
                    )
                whole[key] = tensor
    modules = dict(sorted(modules.items()))
    new_ranks = combined_ranks(modules, how)
    config = combined_config([config for config, _, _ in files], how, new_ranks)
    tensors = dict(whole)
    for path, (A, B) in combine(modules, weights, how, new_ranks).items():
        names = (
            ("lora_embedding_A", "lora_embedding_B")
            if path in embeddings
            else ("lora_A.weight", "lora_B.weight")
        )
        tensors[f"{PREFIX}{path}.{names[0]}"] = A.contiguous()
        tensors[f"{PREFIX}{path}.{names[1]}"] = B.contiguous()
    _write_combined(Path(out), config, tensors, files[0][2])
    return Path(out)


def _file_factors(tensors: dict[str, torch.Tensor]) -> dict[str, tuple]:
    """{module: (A, B, is an embedding)} of an adapter file's LoRA tensors."""
    factors = {}
    for key in tensors:
        path = lora_tensor_module(key)
        if path is None or key.endswith(("lora_B.weight", "lora_embedding_B")):
            continue
        embedding = key.endswith("lora_embedding_A")
        B_key = key.removesuffix("lora_embedding_A" if embedding else "lora_A.weight") + (
            "lora_embedding_B" if embedding else "lora_B.weight"
        )
        if B_key not in tensors:
            raise AdapterFileError(f"adapter tensor {key} has no {B_key}; save the adapter again")
        factors[path] = (tensors[key], tensors[B_key], embedding)
    return factors


def _check_same_base(folders, files) -> None:
    """Adapters of different base models (by name or recorded fingerprint) cannot combine."""
    for field, read in (
        ("base model", lambda config, metadata: config.base_model_name_or_path),
        ("base fingerprint", lambda config, metadata: metadata.get("base_fingerprint")),
    ):
        values = [read(config, metadata) for config, _, metadata in files]
        known = [(folder, v) for folder, v in zip(folders, values, strict=True) if v]
        if len({v for _, v in known}) > 1:
            (first, a), (second, b) = known[0], next(k for k in known if k[1] != known[0][1])
            raise LoraError(
                f"{first} and {second} were trained on different base models ({field} {a} vs "
                f"{b}); combine adapters of one base model"
            )


def _write_combined(out: Path, config: LoraConfig, tensors: dict, metadata: dict) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LoraError(
            f"{out} exists and is not an empty folder; choose a new folder for the adapter"
        )
    fields = {**config.to_dict(), "inference_mode": True}
    header = {
        "format": "pt",
        "lorakit_version": lorakit_version(),
        **{k: metadata.get(k, "") for k in ("base_model", "base_model_path", "base_fingerprint")},
    }
    text = json.dumps(fields, indent=2, sort_keys=True) + "\n"
    _write_files(out, {
        WEIGHTS_NAME: lambda path: save_file(tensors, str(path), header),
        CONFIG_NAME: lambda path: path.write_text(text, encoding="utf-8"),
    })  # fmt: skip


# ---------------------------------------------------------------- checks
def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_model(model: nn.Module, adapters: list[str], adapter_name: str) -> None:
    for name in adapters:
        adapter_config(model, name)  # an error that lists the model's adapters
    if adapter_name in configs(model):
        raise LoraError(
            f"the model already has an adapter named {adapter_name!r}; pick another name"
        )
    mutated = [a for a in adapters if mutates_base(adapter_config(model, a).init_lora_weights)]
    if mutated:
        raise LoraError(
            f"adapter {mutated[0]!r} started from the base weights (PiSSA/OLoRA) and changed "
            "them; save it with convert_to_lora=True and combine the plain LoRA adapter it gives"
        )
    for path, wrapper in wrappers(model):
        owners = [a for a in adapters if a in wrapper.modules_to_save]
        if len(owners) > 1:
            raise LoraError(
                f"adapters {owners[0]!r} and {owners[1]!r} both train {path!r} whole, and whole "
                "modules cannot be combined; combine adapters of which at most one saves it"
            )


def _new_rank(ranks: list[int], how: Combination) -> int:
    if how.combination_type == "cat":
        return sum(ranks)
    if how.combination_type in SVD:
        return how.svd_rank or max(ranks)
    return ranks[0]


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


def _layer_factors(layer: LoraLayer, adapters: list[str]) -> list[Factors]:
    transposed = isinstance(layer, Embedding) or getattr(layer, "fan_in_fan_out", False)
    return [
        Factors(i, *_factors(layer, a), layer.scaling[a], transposed)
        for i, a in enumerate(adapters)
        if a in layer.r
    ]


def _cat(factors: list[Factors], weights: Sequence[float]):
    A = torch.cat([f.A.data * weights[f.index] * f.scaling for f in factors], dim=0)
    return A, torch.cat([f.B.data for f in factors], dim=1)


def _factor_wise(factors: list[Factors], weights: Sequence[float], how: Combination):
    """PEFT's `_generalized_task_arithmetic_weighted_adapter`: A and B merged each on its own,
    with √|w·s| on both sides and the sign on A."""
    weights_A, weights_B = [], []
    for f in factors:
        weighted = weights[f.index] * f.scaling
        sign = 1 if weighted >= 0 else -1
        weights_A.append(math.sqrt(abs(weighted)) * sign)
        weights_B.append(math.sqrt(abs(weighted)))
    merged = [
        merge_tensors(
            tensors,
            torch.tensor(ws).to(tensors[0].device),
            how.combination_type,
            how.density,
            how.majority_sign_method,
        ).to(tensors[0].dtype)  # fmt: skip
        for tensors, ws in (
            ([f.A.data for f in factors], weights_A),
            ([f.B.data for f in factors], weights_B),
        )  # fmt: skip
    ]
    return merged[0], merged[1]


def _svd(factors: list[Factors], weights: Sequence[float], how: Combination, rank: int):
    """PEFT's `_svd_generalized_task_arithmetic_weighted_adapter`: the updates s·B·A merged (in
    the layout the module stores, where dare's masks fall), then the rank-`rank` SVD of the
    result as B = U·S, A = Vh."""
    deltas = [(f.B @ f.A) * f.scaling for f in factors]  # out × in, as get_delta_weight computes
    transposed = factors[0].transposed
    if transposed:
        deltas = [delta.T for delta in deltas]
    weights = torch.tensor([weights[f.index] for f in factors]).to(deltas[0].device)
    kind = how.combination_type
    method = "linear" if kind == "svd" else kind.removesuffix("_svd")
    delta = merge_tensors(deltas, weights, method, how.density, how.majority_sign_method)
    if transposed:
        delta = delta.T
    U, S, Vh = torch.linalg.svd(delta, full_matrices=how.svd_full_matrices, driver=how.svd_driver)
    U, S, Vh = U[:, :rank], S[:rank], Vh[:rank, :]
    U = U @ torch.diag(S)
    if how.svd_clamp is not None:
        high = torch.quantile(torch.cat([U.flatten(), Vh.flatten()]), how.svd_clamp)
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
