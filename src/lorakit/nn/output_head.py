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

**A frozen head, fused with its loss.** Under LoRA the head is frozen (SmolLM2's is tied to the
token embedding), so its only gradient is the one it passes back to the hidden states. Then the
pre-hook takes the labeled hidden states and hands the head no rows, and
``FrozenHeadCrossEntropy`` computes logits, loss and that gradient together, 128 positions at a
time: the (positions x 49,152) fp32 logits are never held whole, and the cross-entropy's
elementwise passes run on chunks that stay in cache (0.48 s against 0.73 s for the head and loss
of a 16 x 128 batch here). A head that trains, or a model that caps or scales its logits, keeps
the path above.

**Contiguous inputs.** Generation and answer scoring ask the model for the last position's
logits alone (``logits_to_keep``), so the head gets ``hidden[:, -1:]``, a strided view. For a
3-d input that cannot be viewed as 2-d, ``torch.matmul`` expands the weight to a batch of copies
(64 rows x 49,152 x 576 in bf16: 3.6 GB copied per call), which made a SmolLM2 forward three times
slower than one over every position. ``contiguous_head_inputs`` hands the head a contiguous copy
of its input (a few kilobytes) instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


# config fields of models whose logits are more than the head's product (a fused loss would
# skip what they do to the logits)
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
LOSS_CHUNK = 128  # positions whose fp32 logits are held at once by the fused loss


def _language_model(model: nn.Module) -> nn.Module:
    inner = model
    while not hasattr(inner, "get_output_embeddings") and hasattr(inner, "module"):
        inner = inner.module  # DDP
    return inner


def output_head(model: nn.Module) -> nn.Module:
    """The module that maps hidden states to vocabulary logits, through PEFT / DDP wrappers."""
    inner = _language_model(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"{type(inner).__name__} has no output head (get_output_embeddings)")
    return head


def _frozen_plain_head(model: nn.Module, head: nn.Module) -> bool:
    """Whether the head is a frozen bias-free nn.Linear whose product is the logits."""
    config = getattr(_language_model(model), "config", None)
    return (
        type(head) is nn.Linear
        and head.bias is None
        and not head.weight.requires_grad
        and not any(getattr(config, name, None) for name in LOGIT_TRANSFORMS)
    )


class FrozenHeadCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets``, chunk by chunk, for a
    frozen head: each chunk's gradient with respect to ``hidden`` is made in the forward pass
    (softmax minus one-hot, times the weight), so the (positions x vocabulary) logits are never
    held whole nor kept for the backward pass."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, dtype):
        count = hidden.shape[0]
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden, dtype=dtype)
        weight = weight.to(dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, count, LOSS_CHUNK):
                rows = slice(start, start + LOSS_CHUNK)
                # one kernel reads the logits in the compute dtype and writes fp32 log-probabilities
                log_probs = F.log_softmax(hidden[rows].to(dtype) @ weight.T, 1, dtype=torch.float32)
                wanted = targets[rows].unsqueeze(1)
                loss -= log_probs.gather(1, wanted).sum()
                # the gradient of the chunk's loss by its logits: softmax minus one-hot
                probs = log_probs.exp_()
                probs.scatter_add_(1, wanted, probs.new_full(wanted.shape, -1.0))
                grad[rows] = probs.to(dtype) @ weight
        ctx.save_for_backward(grad)
        ctx.count, ctx.hidden_dtype = count, hidden.dtype
        return loss / count

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return (grad * (grad_loss / ctx.count)).to(ctx.hidden_dtype), None, None, None


@contextmanager
def _head_inputs(
    model: nn.Module, change: Callable[[torch.Tensor], torch.Tensor]
) -> Iterator[None]:
    """While inside, the output head's input goes through ``change`` first."""

    def hook(module: nn.Module, args: tuple) -> tuple:
        return (change(args[0]), *args[1:])

    handle = output_head(model).register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _captured_head_inputs(model: nn.Module, keep: torch.Tensor, kept: list):
    """While inside, the head's input at ``keep`` goes to ``kept`` and the head itself gets no
    rows: the fused loss does its work."""

    def capture(hidden: torch.Tensor) -> torch.Tensor:
        kept.append(hidden[keep.to(hidden.device)])
        return hidden[..., :0, :]

    return _head_inputs(model, capture)


def head_on_positions(model: nn.Module, keep: torch.Tensor):
    """While inside, the output head sees only the hidden states where ``keep`` (batch, length)
    is True, in row-major order, and returns (keep.sum(), vocabulary) logits."""
    return _head_inputs(model, lambda hidden: hidden[keep.to(hidden.device)])


def contiguous_head_inputs(model: nn.Module):
    """While inside, the output head's input is made contiguous first (see the module's
    docstring)."""
    return _head_inputs(model, lambda hidden: hidden.contiguous())


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
    head = output_head(model)
    if reduction == "mean" and torch.is_grad_enabled() and _frozen_plain_head(model, head):
        kept: list[torch.Tensor] = []
        with _captured_head_inputs(model, keep, kept):
            model(**inputs)
        hidden = kept[0]
        dtype = (torch.get_autocast_dtype(hidden.device.type)
                 if torch.is_autocast_enabled(hidden.device.type) else head.weight.dtype)  # fmt: skip
        if head.weight.dtype == torch.bfloat16:
            dtype = torch.bfloat16
        targets = targets[keep].to(hidden.device)
        return FrozenHeadCrossEntropy.apply(hidden, head.weight, targets, dtype)
    with head_on_positions(model, keep):
        logits = model(**inputs).logits
    return F.cross_entropy(logits.float(), targets[keep].to(logits.device), reduction=reduction)
