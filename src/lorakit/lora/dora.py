"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, "DoRA").

The adapted weight is split into a direction and a magnitude per output:

    W' = m · (W0 + s·B·A) / ||W0 + s·B·A||        m: one number per output (`lora_magnitude_vector`)
    h  = W'·x + b = (m / n) · (W0·x + s·B·A·x) + b,          n = ||W0 + s·B·A|| per output

m starts at n, so the layer starts as plain LoRA does (the base, while B is zero); A, B and m
train. The norm n is a constant in the backward pass (section 4.3: it is detached), as in PEFT.

PEFT computes n by building W0 + s·B·A (out × in) on every step. Here it is expanded per output
row i instead, with B_i the i-th row of B:

    n_i² = ||W0_i||² + 2s · B_i·(A·W0_iᵀ) + s² · B_i·(A·Aᵀ)·B_iᵀ

||W0_i||² is the frozen base's and is computed once; W0·Aᵀ (out × r) and A·Aᵀ (r × r) are
low-rank products, so a step reads W0 once and writes nothing of its size. In fp32 the two agree
to about 1e-7 relative (tests/test_dora.py holds it to PEFT's within 1e-5).

In eval mode a layer keeps its norms (`Norms`) until W0, A or B changes; training computes them
on every step (A and B change), but ||W0_i||² only once.

Orientation: a weight is read as (out × in); GPT-2's Conv1D stores (in × out) and an embedding
(num_embeddings × dim) is read so too, with `fan_in_fan_out`. For an embedding the "outputs" are
the embedding dimensions and the norm runs over the vocabulary, as in PEFT.
"""

from __future__ import annotations

import torch


def row_norms_squared(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """||W0_i||² per output i, in fp32: the part of the norm that does not train."""
    weight = weight.detach().float()
    return (weight * weight).sum(dim=0 if fan_in_fan_out else 1)


@torch.no_grad()
def weight_norm(
    weight: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
    fan_in_fan_out: bool,
    weight_squared: torch.Tensor | None = None,
) -> torch.Tensor:
    """||W0 + scaling·B·A|| per output (out,), in fp32 and without autograd, without forming the
    full matrix. A: r × in, B: out × r; `weight_squared`: `row_norms_squared(weight)` when known."""
    if weight_squared is None:
        weight_squared = row_norms_squared(weight, fan_in_fan_out)
    A, B = A.detach().float(), B.detach().float()
    low = A.to(weight.dtype)
    # W0·Aᵀ (out × r): the base read once, at the base's own precision
    base_A = (low @ weight).T if fan_in_fan_out else weight @ low.T
    cross = (B * base_A.float()).sum(dim=1)
    lora_squared = ((B @ (A @ A.T)) * B).sum(dim=1)
    squared = weight_squared + (2 * scaling) * cross + (scaling * scaling) * lora_squared
    return squared.clamp_min(0).sqrt()


def rescale(out: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """scale·(out - bias) + bias: a layer's output `out` (bias included) with its direction part
    multiplied by `scale` = m / n, per output (the last dimension).

    In fp32 this is one fused op. In a lower precision (bf16 autocast) scale itself would round
    to steps of 1/128 near 1, so the small correction (scale - 1)·(out - bias) is added instead,
    as PEFT's formula does."""
    if scale.dtype == out.dtype:
        if bias is None:
            return out * scale
        return torch.addcmul(bias * (1 - scale), out, scale)
    direction = out if bias is None else out - bias
    return torch.addcmul(out, direction, (scale - 1).to(out.dtype))


def per_output(magnitude: torch.Tensor, norm: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """m / norm shaped to multiply a stored weight, one factor per output: merging a DoRA update
    writes (W0 + delta) times it."""
    factor = magnitude.detach() / norm
    return factor.view(1, -1) if fan_in_fan_out else factor.view(-1, 1)


class Norms:
    """What a DoRA layer keeps between calls; none of it is state (nothing is saved): the norm
    per adapter, kept in eval mode and keyed by the states of W0, A and B; ||W0_i||², keyed by
    W0's; and the norm each merged adapter was merged with, which unmerging needs."""

    def __init__(self) -> None:
        self.kept: dict[str, tuple[tuple, torch.Tensor]] = {}
        self.weight_squared: tuple[tuple, torch.Tensor] | None = None
        self.merged: dict[str, torch.Tensor] = {}

    def norm(self, name, weight, A, B, scaling, fan_in_fan_out, keep: bool) -> torch.Tensor:
        """`weight_norm`, from what is kept where nothing changed since; kept if `keep`."""
        key = (_state(weight), _state(A), _state(B), scaling)
        cached = self.kept.get(name)
        if cached is not None and cached[0] == key:
            return cached[1]
        if self.weight_squared is None or self.weight_squared[0] != key[0]:
            self.weight_squared = (key[0], row_norms_squared(weight, fan_in_fan_out))
        norm = weight_norm(weight, A, B, scaling, fan_in_fan_out, self.weight_squared[1])
        if keep:
            self.kept[name] = (key, norm)
        return norm

    def forget(self) -> None:
        """After the weights changed through `.data` (merging), which no version counter sees."""
        self.kept.clear()
        self.weight_squared = None


def _state(tensor: torch.Tensor) -> tuple:
    """What changes when a tensor's values are replaced or changed in place."""
    return tensor.data_ptr(), tensor._version, tensor.dtype, tuple(tensor.shape)
