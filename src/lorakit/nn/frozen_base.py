"""How training treats the frozen base model: its own dropout, the precision of its frozen
weights, and the attention kernel. None of this touches the adapter's weights or its files.

Profiling a MiniLM + LoRA step on this CPU (docs/benchmarks.md) put most of the time outside the
adapter: the base model's dropout masks, attention, and under bf16 autocast the casts of every
frozen weight on every forward. So the fast path is about the base:

- ``set_model_dropout``: the frozen model's own dropout probability (hidden, attention, head),
  LoRA's ``lora_dropout`` left alone. Dropout 0 also lets attention skip its mask.
- ``bf16_frozen_base``: for the length of a bf16 training run, the frozen floating-point weights
  (of modules with nothing trainable, normalization layers aside) are held in bf16 (cast once,
  not on every forward) and attention runs the eager kernel (plain batched matmuls, which use
  the CPU's bf16 matrix units; PyTorch's fused CPU attention backward is several times slower
  in bf16). On exit the exact fp32 weights and the original attention kernel come back, so the
  final evaluation, the saved adapter and its base fingerprint are those of the untouched base.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def set_model_dropout(model: nn.Module, p: float) -> int:
    """Give every dropout layer of the model itself (not LoRA's) probability ``p``; return how
    many there were. The model's config is updated too, so a saved merged model agrees."""
    if not 0 <= p < 1:
        raise ValueError(f"dropout must be in [0, 1), got {p}")
    changed = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Dropout) and "lora_dropout" not in name:
            module.p = p
            changed += 1
    for config in _configs(model):
        for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout",
                    "resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout",
                    "dropout", "attention_dropout", "seq_classif_dropout"):  # fmt: skip
            if isinstance(getattr(config, key, None), float):
                setattr(config, key, p)
    return changed


@contextmanager
def bf16_frozen_base(model: nn.Module) -> Iterator[None]:
    """Frozen fp32 weights held in bf16 and eager attention while inside; exactly restored after.
    Use it under bf16 autocast (the trainable weights stay fp32 for the optimizer)."""
    originals: dict[nn.Parameter, torch.Tensor] = {}
    kernels: dict[nn.Module, str | None] = {}
    try:
        for param in _frozen_alone(model):
            if param.dtype == torch.float32:
                originals[param] = param.data
                param.data = param.data.to(torch.bfloat16)
        for module in pretrained_models(model):
            kernels[module] = module.config._attn_implementation
            module.set_attn_implementation("eager")
        yield
    finally:
        for param, data in originals.items():
            param.data = data
        for module, kernel in kernels.items():
            if kernel is not None:
                module.set_attn_implementation(kernel)


def _frozen_alone(model: nn.Module) -> list[nn.Parameter]:
    """Frozen parameters whose own module has nothing trainable. A module that mixes the two
    (a LayerNorm whose bias trains under ``bias="all"``) keeps fp32: ops outside bf16 autocast,
    such as layer_norm, refuse a bf16 weight beside an fp32 bias. Normalization layers keep fp32
    too: layer_norm refuses bf16 weights for an fp32 input, which a trainable embedding
    (``modules_to_save = ["wte"]``) gives; with fp32 weights it takes either, and they are tiny."""
    frozen: dict[nn.Parameter, None] = {}  # ordered, and a tied weight counted once
    kept: set[nn.Parameter] = set()  # fp32
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if any(p.requires_grad for p in own) or isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
            kept.update(own)
        else:
            frozen.update(dict.fromkeys(own))
    return [p for p in frozen if p not in kept]


def pretrained_models(model: nn.Module) -> list[nn.Module]:
    """The outermost transformers models inside ``model`` (a PEFT wrapper holds one)."""
    found: list[nn.Module] = []
    inside: set[int] = set()  # ids of modules within one already found
    for module in model.modules():  # outer modules come before their children
        if id(module) in inside:
            continue
        if hasattr(module, "set_attn_implementation") and hasattr(module, "config"):
            found.append(module)
            inside.update(id(m) for m in module.modules())
    return found


def _configs(model: nn.Module) -> list[object]:
    return [m.config for m in pretrained_models(model)]


@contextmanager
def bf16_inference(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Evaluation and generation in bf16 (``enabled``): the weights held in bf16 (normalization
    layers aside) under bf16 autocast, without gradients; the exact weights come back after. A small LLM's forward pass
    is about ten times faster so on a CPU with bf16 matrix units."""
    if not enabled:
        with torch.no_grad():
            yield
        return
    trains = {param: param.requires_grad for param in model.parameters()}
    for param in trains:
        param.requires_grad_(False)
    device = next(model.parameters()).device.type
    try:
        with (
            torch.no_grad(),
            bf16_frozen_base(model),
            torch.autocast(device, dtype=torch.bfloat16),
        ):
            yield
    finally:
        for param, trained in trains.items():
            param.requires_grad_(trained)
