"""A causal LM's output head, run where it is needed and the way it runs fast.

**The loss where a label is.**
A causal LM's forward runs its output head on every position and the loss then drops the
positions whose label is -100 (padding, an instruction's prompt). For a small LLM the head is
the largest matrix product (SmolLM2: 576 x 49,152, a fifth of the parameters), so under
instruction tuning, where most positions are prompt, most of that work is thrown away.

``labeled_positions_loss`` runs the model's own forward (through any wrapper: PEFT, DDP,
accelerate's autocast) with a forward pre-hook on the output head that hands it only the hidden
states whose next token carries a label. The head returns (positions, vocabulary) logits, and
the loss is the cross-entropy of those against their labels: the same number as the model's
own ``labels=`` loss (mean over labeled tokens), for less work.

**Contiguous inputs.** Generation and answer scoring ask the model for the last position's
logits alone (``logits_to_keep``), so the head gets ``hidden[:, -1:]``, a strided view. For a
3-d input that cannot be viewed as 2-d, ``torch.matmul`` expands the weight to a batch of copies
(64 rows x 49,152 x 576 in bf16: 3.6 GB copied per call), which made a SmolLM2 forward three times
slower than one over every position. ``contiguous_head_inputs`` hands the head a contiguous copy
of its input (a few kilobytes) instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


def output_head(model: nn.Module) -> nn.Module:
    """The module that maps hidden states to vocabulary logits, through PEFT / DDP wrappers."""
    inner = model
    while not hasattr(inner, "get_output_embeddings") and hasattr(inner, "module"):
        inner = inner.module  # DDP
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"{type(inner).__name__} has no output head (get_output_embeddings)")
    return head


@contextmanager
def head_on_positions(model: nn.Module, keep: torch.Tensor) -> Iterator[None]:
    """While inside, the output head sees only the hidden states where ``keep`` (batch, length)
    is True, in row-major order, and returns (keep.sum(), vocabulary) logits."""

    def select(module: nn.Module, args: tuple) -> tuple:
        hidden = args[0]
        return (hidden[keep.to(hidden.device)], *args[1:])

    handle = output_head(model).register_forward_pre_hook(select)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def contiguous_head_inputs(model: nn.Module) -> Iterator[None]:
    """While inside, the output head's input is made contiguous first (see the module's
    docstring)."""

    def contiguous(module: nn.Module, args: tuple) -> tuple:
        return (args[0].contiguous(), *args[1:])

    handle = output_head(model).register_forward_pre_hook(contiguous)
    try:
        yield
    finally:
        handle.remove()


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """Position t's target is token t+1: labels moved left by one, the last position -100."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def labeled_positions_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy of the next token at every position that has a label (``labels`` as
    Hugging Face causal LMs take them: the input ids, -100 where no loss counts)."""
    targets = shifted_labels(batch["labels"])
    keep = targets != IGNORE_INDEX
    if not bool(keep.any()):
        raise ValueError("the batch has no target tokens (every label is -100)")
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with head_on_positions(model, keep):
        logits = model(**inputs).logits
    return F.cross_entropy(logits.float(), targets[keep].to(logits.device), reduction=reduction)
