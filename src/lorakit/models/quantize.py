"""Frozen base weights held in 8 or 4 bits (QLoRA, Dettmers et al. 2023), by bitsandbytes.

    nn.Linear (W, fp32)  ──quantize_model──►  Linear8bitLt: int8 codes + one scale a row
                                              Linear4bit:   NF4 codes + one absmax a block of 64
    forward:  x ──► dequantize W (in compute dtype) ──► x·Wᵀ      A, B stay fp32 beside it

What is quantized: every `nn.Linear` of the model except the output head (`lm_head`, which
SmolLM2 and GPT-2 tie to the input embeddings; transformers' bitsandbytes loading leaves it out
too). Embeddings and norms keep full precision. bitsandbytes' layers are `nn.Linear` subclasses,
so lorakit's LoRA layers wrap them as they wrap a plain Linear, and PEFT's do as well.

Merging never writes an update into the codes: `dequantize_model` first puts a full-precision
Linear holding the dequantized weight (`dequantize_weight`) in place of each quantized one, and
the adapter merges into that (the LoRA engine refuses to merge into an integer weight).
bitsandbytes runs on CUDA and, since 0.48, on the CPU; it is imported only when a model is
quantized.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

import torch
from torch import nn

from lorakit.models import ModelError

QUANTIZE_MODES = ("none", "int8", "nf4")
Quantize = Literal["none", "int8", "nf4"]
OUTPUT_HEAD_NAMES = ("lm_head",)  # transformers' name; `get_output_embeddings` finds others


class QuantizeError(ModelError):
    """A model that cannot be quantized as asked."""


def quantize_model(model: nn.Module, mode: Quantize) -> nn.Module:
    """`model` with each `nn.Linear` but the output head replaced, in place, by bitsandbytes'
    int8 (``"int8"``) or NF4 (``"nf4"``) layer holding the same weight; frozen. ``"none"``:
    the model as it is. Every other parameter is cast to fp32 (a model loaded in bf16 to keep
    the fp32 copy out of memory gets its embeddings and norms back in full precision)."""
    if mode == "none":
        return model
    if mode not in QUANTIZE_MODES:
        raise QuantizeError(
            f"unknown quantization {mode!r}; use one of {', '.join(QUANTIZE_MODES)}"
        )
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or module is head or name in OUTPUT_HEAD_NAMES:
            continue
        _set_submodule(model, name, _quantized_linear(module, mode))
    model.float()  # integer codes stay as they are
    if getattr(model, "config", None) is not None:
        model.config.dtype = torch.float32  # what a merged model is saved as
    return model.requires_grad_(False)


def _quantized_linear(linear: nn.Linear, mode: Quantize) -> nn.Module:
    bnb = _bitsandbytes()
    device = linear.weight.device
    weight = linear.weight.data
    bias = linear.bias is not None
    with torch.device("meta"):  # no throwaway random weight of the layer's size
        if mode == "int8":
            layer = bnb.nn.Linear8bitLt(
                linear.in_features, linear.out_features, bias, has_fp16_weights=False
            )
        else:
            layer = bnb.nn.Linear4bit(
                linear.in_features, linear.out_features, bias, quant_type="nf4",
                compute_dtype=torch.float32,
            )  # fmt: skip
    if mode == "int8":
        layer.weight = bnb.nn.Int8Params(weight.float(), False, has_fp16_weights=False)
    else:
        layer.weight = bnb.nn.Params4bit(weight.float(), False, quant_type="nf4", module=layer)
        # CPU inference would otherwise repack the codes in place on its first call, so the
        # same base would hold (and fingerprint as) different bytes before and after
        layer.support_avx512bf16_for_cpu = False
    if bias:
        layer.bias = nn.Parameter(linear.bias.data.float(), requires_grad=False)
    return layer.to(device)  # bitsandbytes quantizes on the move to a device


def is_quantized(module: nn.Module) -> bool:
    """A bitsandbytes int8 or 4-bit Linear (none exists before bitsandbytes is imported)."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def dequantize_weight(layer: nn.Module) -> torch.Tensor:
    """The fp32 weight (out × in) a quantized Linear computes with."""
    weight = layer.weight
    if hasattr(weight, "quant_state"):  # 4-bit
        functional = _bitsandbytes().functional
        return functional.dequantize_4bit(weight.data, weight.quant_state).float()
    codes, scales = _int8_codes(layer)
    return codes.float() * (scales.float()[:, None] / 127)


def _int8_codes(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """An int8 layer's codes and row scales: on the weight until its first forward, then in
    the layer's matmul state."""
    state = layer.state
    if state.SCB is not None:
        return state.CB if state.CB is not None else layer.weight.data, state.SCB
    return layer.weight.data, layer.weight.SCB


def dequantized_linear(layer: nn.Module) -> nn.Linear:
    """A plain fp32 `nn.Linear` that computes what the quantized `layer` computes."""
    weight = dequantize_weight(layer)
    plain = nn.Linear(layer.in_features, layer.out_features, layer.bias is not None, device="meta")
    plain.weight = nn.Parameter(weight, requires_grad=False)
    if layer.bias is not None:
        plain.bias = nn.Parameter(layer.bias.data.float(), requires_grad=False)
    return plain


def dequantize_model(model: nn.Module) -> nn.Module:
    """Every quantized Linear of `model` (LoRA's base layers too) replaced, in place, by its
    `dequantized_linear`: the model to merge an adapter into and save in full precision."""
    for name, module in list(model.named_modules()):
        if is_quantized(module):
            _set_submodule(model, name, dequantized_linear(module))
    return model


def quantization_of(model: nn.Module) -> Quantize:
    """``"int8"``, ``"nf4"`` or ``"none"``: how the model's Linears are held."""
    for module in model.modules():
        if is_quantized(module):
            return "nf4" if hasattr(module.weight, "quant_state") else "int8"
    return "none"


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _bitsandbytes():
    """bitsandbytes, imported on first use. Two of its notices are not shown: that an optional
    CPU kernel package is missing (it falls back to its own kernels), and, on every int8
    product, that the inputs are rounded through fp16 (LLM.int8()'s design)."""
    for name in ("bitsandbytes.backends.cpu.ops", "bitsandbytes.autograd._functions"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import bitsandbytes
        import bitsandbytes.functional  # noqa: F401
    except ImportError:
        raise QuantizeError(
            "model.quantize needs bitsandbytes: pip install 'bitsandbytes==0.50.2'"
        ) from None
    return bitsandbytes
