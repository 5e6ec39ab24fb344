"""Dropout with cheap random masks, for training on the CPU.

PyTorch's CPU dropout draws its mask with one Mersenne-Twister call per element
(``bernoulli_``). In a MiniLM + LoRA training step that was a fifth of the fp32 step, more than
all of LoRA (docs/benchmarks.md). Here the mask comes from numpy's PCG64DXSM generator, 16 random
bits per element taken four to a 64-bit word, which is several times cheaper:

- An element is kept when its 16 bits fall below ``round((1 - p) * 65536)``. The kept ones are
  scaled by the inverse of that exact keep rate, so the output stays unbiased; the drop rate is p
  rounded to a multiple of 1/65536 (0.1 becomes 0.100006).
- Each call seeds the generator from torch's default generator, so ``torch.manual_seed`` fixes
  every mask and a resumed run (which restores torch's RNG state) draws the same ones.
- Only the mask differs from ``torch.nn.functional.dropout``: as there, the output is the input
  times a mask of 0 and 1/(1-p) in the input's dtype, and the backward pass multiplies by it.

``fast_dropout(model)`` puts this into a model for the length of a training run: every
``nn.Dropout`` (the model's and LoRA's) and, in transformers models, the dropout on attention
probabilities, which happens inside the attention function. That one is replaced by lorakit's
attention (registered with transformers as ``"lorakit"``): plain batched matmuls with this dropout
in training; without dropout it defers to PyTorch's fused attention, except for bf16 on the CPU,
where the matmuls (on the CPU's bf16 matrix units) are faster than the fused kernel's backward.
Tensors on other devices take PyTorch's own kernels, which are fast there.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from lorakit.nn.frozen_base import pretrained_models

ATTENTION = "lorakit"
_RESOLUTION = 1 << 16  # keep decisions are made on 16 random bits


def keep_mask(shape: torch.Size, p: float, dtype: torch.dtype) -> tuple[torch.Tensor, float]:
    """A 0/1 mask of ``dtype`` keeping each element with probability ~(1 - p), and 1 / that
    probability (the factor that keeps the output unbiased)."""
    n = math.prod(shape)
    seed = int(torch.randint(0, 2**62, (1,)))  # ties the mask to torch's RNG state
    words = np.random.PCG64DXSM(seed).random_raw((n + 3) // 4)  # 4 x 16 bits per word
    bits = torch.from_numpy(words.view(np.int16)[:n]).view(shape)  # uniform on [-2^15, 2^15)
    kept = round((1 - p) * _RESOLUTION)
    mask = torch.lt(bits, kept - _RESOLUTION // 2, out=torch.empty(shape, dtype=dtype))
    return mask, _RESOLUTION / kept


def _fast(x: torch.Tensor, p: float) -> bool:
    """On the CPU, and p not so near 0 or 1 that 16 bits cannot tell it from them."""
    return x.device.type == "cpu" and 0 < round((1 - p) * _RESOLUTION) < _RESOLUTION


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``torch.nn.functional.dropout`` with a cheap mask on the CPU. As in PyTorch's own CPU
    dropout, the output is x times a mask of 0 and 1/(1-p), and autograd keeps only the mask."""
    if not training or p == 0:
        return x
    if not _fast(x, p):
        return nn.functional.dropout(x, p, training)
    mask, scale = keep_mask(x.shape, p, x.dtype)
    return x * mask.mul_(scale)


# ---------------------------------------------------------------- attention with this dropout
def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention-function signature. In training with dropout, and for bf16 on
    the CPU: ``matmul_attention``. Otherwise, and for anything that one does not do (other
    devices, soft capping, attention sinks, position biases, causal attention asked for by a
    flag instead of a mask): transformers' SDPA attention."""
    special = any(kwargs.get(k) is not None for k in ("softcap", "s_aux", "position_bias"))
    causal_flag = kwargs.get("is_causal", getattr(module, "is_causal", False))
    special |= bool(attention_mask is None and causal_flag and query.shape[2] > 1)
    wanted = (module.training and dropout > 0) or query.dtype == torch.bfloat16
    if wanted and query.device.type == "cpu" and not special:
        p = dropout if module.training else 0.0
        return matmul_attention(module, query, key, value, attention_mask, scaling, p)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )


def matmul_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0):
    """softmax(q·kᵀ·scaling + mask)·v in batched matmuls, with the fast dropout above on the
    probabilities. The mask is additive (float) or boolean (True = attend)."""
    from transformers.integrations.sdpa_attention import repeat_kv

    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query * scaling, key.transpose(-1, -2))
    if attention_mask is not None:
        mask = attention_mask[..., : key.shape[-2]]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    probs = scores.softmax(dim=-1).to(value.dtype)
    if dropout > 0 and _fast(probs, dropout):
        # the 1/(1-p) goes on v: head_dim / length the size of the probabilities (1/4 for
        # MiniLM at 128 tokens)
        mask, scale = keep_mask(probs.shape, dropout, probs.dtype)
        probs, value = probs * mask, value * scale
    elif dropout > 0:
        probs = nn.functional.dropout(probs, dropout, training=True)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTENTION, attention)
    AttentionMaskInterface.register(ATTENTION, eager_mask)  # an additive float mask


# ---------------------------------------------------------------- putting it into a model
@contextmanager
def fast_dropout(model: nn.Module) -> Iterator[None]:
    """For the length of the block: the cheap mask in every ``nn.Dropout`` of ``model`` and in
    the attention of its transformers models (where they use PyTorch's fused or eager attention).
    On exit every module is as it was."""
    dropouts = [m for m in model.modules() if type(m) is nn.Dropout]
    for module in dropouts:
        module.forward = _forward_of(module)  # an instance attribute, deleted on exit
    switched = _use_lorakit_attention(model)
    try:
        yield
    finally:
        for module in dropouts:
            del module.forward
        for module, kernel in switched.items():
            module.set_attn_implementation(kernel)


def _forward_of(module: nn.Dropout):
    def forward(x: torch.Tensor) -> torch.Tensor:
        return dropout(x, module.p, module.training)

    return forward


def _use_lorakit_attention(model: nn.Module) -> dict[nn.Module, str]:
    """Switch models on the CPU with PyTorch's SDPA or eager attention to lorakit's; return
    {model: old}. (On a GPU PyTorch's fused attention already draws its dropout fast.)"""
    switched = {}
    for module in pretrained_models(model):
        kernel = module.config._attn_implementation
        on_cpu = all(p.device.type == "cpu" for p in module.parameters())
        if kernel in ("sdpa", "eager") and on_cpu:
            _register_attention()
            module.set_attn_implementation(ATTENTION)
            switched[module] = kernel
    return switched
