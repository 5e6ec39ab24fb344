"""Initialisations that start an adapter from the base weight itself: PiSSA and OLoRA.

Both split W0 into a part the adapter holds and a residual the base keeps, so the model computes
exactly what it did before (up to rounding) while A and B start on W0's most important directions:

    W0 = W_res + scaling · B0·A0        the base layer now holds W_res; A0 and B0 train

    PiSSA (Meng et al. 2024):  W0 = U·S·Vᵀ;  B0 = U_r·√(S_r/scaling),  A0 = √(S_r/scaling)·V_rᵀ
        ("pissa": exact SVD; "pissa_niter_N": randomized SVD with N subspace iterations, faster)
    OLoRA (Büyükakyüz 2024):   W0 = Q·R;    B0 = Q[:, :r],  A0 = R[:r]

The maths is PEFT's (`LoraLayer.pissa_init`, `olora_init`), bit for bit; GPT-2's Conv1D stores W0ᵀ,
which OLoRA here decomposes as W0 (PEFT's olora takes the stored matrix as it is: see the tests).
Embeddings keep the ordinary start, as in PEFT.

An adapter trained so is relative to W_res, not W0. Since
    W_res + s·B·A = W0 + s·(B·A − B0·A0) = W0 + s·[B | −B0]·[A ; A0],
it is also a plain LoRA adapter of rank 2r (same scaling) on the untouched base: `converted_tensors`
and `converted_config` write that form, as PEFT's `save_pretrained(...,
path_initial_model_for_weight_conversion=...)` does. Each layer keeps what the conversion and the
base fingerprint need: A0 and B0 (`INITIAL`, by adapter) and, on the CPU, the weight as it was
before the first such adapter changed it (`UNTOUCHED`), so that a saved adapter records the
fingerprint of the base it loads on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator

import torch
from torch import nn

from .config import PISSA_NITER, LoraConfig
from .errors import LoraError

INITIAL = "initial_lora_weights"  # on a layer: {adapter_name: (A0, B0)}
UNTOUCHED = "untouched_weight"  # on a layer: its base weight before any of them changed it


def mutates_base(init) -> bool:
    """Whether `init_lora_weights` moves part of the base weight into the adapter."""
    return isinstance(init, str) and (
        init in ("pissa", "olora") or bool(PISSA_NITER.fullmatch(init))
    )


def init_from_base(layer: nn.Module, adapter_name: str, init: str) -> None:
    """Sets A and B of a Linear LoRA layer by `init` and leaves W_res in its base layer."""
    base = layer.base_layer
    if base.weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise LoraError(
            f"init_lora_weights={init!r} needs a float32, float16 or bfloat16 base weight, "
            f"not {base.weight.dtype}; initialise before quantising the base"
        )
    if not hasattr(layer, UNTOUCHED):
        setattr(layer, UNTOUCHED, base.weight.detach().to("cpu", copy=True))
    weight = base.weight.to(torch.float32)  # out × in
    if layer.fan_in_fan_out:
        weight = weight.T
    r, scaling = layer.r[adapter_name], layer.scaling[adapter_name]
    A, B = (olora_factors if init == "olora" else pissa_factors)(weight, r, scaling, init)
    layer.lora_A[adapter_name].weight.data = A
    layer.lora_B[adapter_name].weight.data = B
    residual = (weight.data - scaling * B @ A).to(base.weight.dtype)
    base.weight.data = residual.T if layer.fan_in_fan_out else residual
    if not hasattr(layer, INITIAL):
        setattr(layer, INITIAL, {})
    getattr(layer, INITIAL)[adapter_name] = (A.detach().clone(), B.detach().clone())


def pissa_factors(weight: torch.Tensor, r: int, scaling: float, init: str):
    """(A0, B0) from W0's r largest singular values and vectors, each side taking √(S/scaling)."""
    niter = PISSA_NITER.fullmatch(init)
    if niter is None:
        V, S, Uh = torch.linalg.svd(weight.data, full_matrices=False)
        Vr, Sr, Uhr = V[:, :r], S[:r], Uh[:r]
    else:
        Vr, Sr, Ur = torch.svd_lowrank(weight.data, r, niter=int(niter.group(1)))
        Uhr = Ur.t()
    Sr = Sr / scaling
    return torch.diag(torch.sqrt(Sr)) @ Uhr, Vr @ torch.diag(torch.sqrt(Sr))


def olora_factors(weight: torch.Tensor, r: int, scaling: float, init: str):
    """(A0, B0) = the first r rows of R and columns of Q in W0 = Q·R."""
    Q, R = torch.linalg.qr(weight.data)
    return R[:r].contiguous(), Q[:, :r].contiguous()


# ---------------------------------------------------------------- the conversion to plain LoRA
def converted_tensors(
    tensors: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """An adapter file's tensors as a plain LoRA adapter of the untouched base: each A becomes
    [A ; A0] and each B [B | −B0] (`initial`: A0 and B0 under the same names). The other tensors
    (modules saved whole, biases) stay as they are; PEFT's conversion drops them, and its
    embedding adapters too."""
    out = dict(tensors)
    for key, tensor in tensors.items():
        start = initial.get(key)
        if start is None:
            continue
        if key.endswith(("lora_A.weight", "lora_embedding_A")):
            out[key] = torch.cat([tensor, start.to(tensor.dtype)], dim=0)
        elif key.endswith(("lora_B.weight", "lora_embedding_B")):
            out[key] = torch.cat([tensor, -start.to(tensor.dtype)], dim=1)
    return out


def converted_config(config: LoraConfig) -> LoraConfig:
    """The config of the converted adapter: rank 2r with the same scaling (alpha doubled, or
    times √2 under rsLoRA, in the patterns too, which PEFT refuses to convert) and an ordinary
    start, so loading it changes no base weight."""
    factor = math.sqrt(2) if config.use_rslora else 2
    return dataclasses.replace(
        config,
        r=2 * config.r,
        lora_alpha=config.lora_alpha * factor,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: v * factor for k, v in config.alpha_pattern.items()},
        init_lora_weights=True,
    )


def initial_weights(
    layer: nn.Module, adapter_name: str
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A0, B0) the layer's adapter started from, when its start came from the base weight."""
    return getattr(layer, INITIAL, {}).get(adapter_name)


@contextlib.contextmanager
def untouched_base(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block each base weight an initialisation changed holds its old values again
    (for the base fingerprint); on exit, W_res is back."""
    layers = [m for m in model.modules() if hasattr(m, UNTOUCHED)]
    residuals = [layer.base_layer.weight.data for layer in layers]
    for layer in layers:
        weight = layer.base_layer.weight
        weight.data = getattr(layer, UNTOUCHED).to(weight.device)
    try:
        yield model
    finally:
        for layer, residual in zip(layers, residuals, strict=True):
            layer.base_layer.weight.data = residual
