"""Gradient checkpointing of a transformers model for the length of a training run.

A training step keeps every block's activations for the backward pass; for an LLM at long
sequences they outweigh the frozen weights. With checkpointing each decoder block keeps only its
input, and the backward pass runs the block's forward once more to get the rest back: about one
more forward of compute for the activation memory of one block at a time (transformers'
``GradientCheckpointingLayer``; torch's ``torch.utils.checkpoint``).

With LoRA the blocks' input does not require grad (the embedding is frozen). Reentrant
checkpointing then returns no gradient at all, which is why PEFT and transformers hook the input
embedding to make its output require grad (``enable_input_require_grads``). Non-reentrant
checkpointing, used here, gives the LoRA weights inside a block their gradients without it, so the
hook that transformers adds when enabling is taken off again: it only adds backward work (the
first block's input gradient).

The recomputed forward draws the same dropout masks: torch's checkpoint restores the RNG state,
from which ``lorakit.nn.fast_dropout`` seeds its masks too. On exit the model is as it was.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from lorakit.nn.frozen_base import pretrained_models

CHECKPOINT_OPTIONS = {"use_reentrant": False}  # torch.utils.checkpoint's keyword arguments


class CheckpointingUnsupported(ValueError):
    """The model holds no transformers model that supports gradient checkpointing."""


def is_checkpointing(model: nn.Module) -> bool:
    """Whether any block of ``model`` recomputes its activations (transformers' own test)."""
    return any(getattr(module, "gradient_checkpointing", False) for module in model.modules())


def checkpointable_models(model: nn.Module) -> list[nn.Module]:
    """The transformers models in ``model`` (through PEFT's wrapper); an error when there is
    none or one of them does not support gradient checkpointing."""
    models = pretrained_models(model)
    refused = [m for m in models if not getattr(m, "supports_gradient_checkpointing", False)]
    if not models or refused:
        name = type(refused[0] if refused else model).__name__
        raise CheckpointingUnsupported(f"{name} does not support gradient checkpointing")
    return models


@contextmanager
def gradient_checkpointing(model: nn.Module) -> Iterator[None]:
    """Non-reentrant checkpointing of every transformers model in ``model`` while inside;
    afterwards off again, unless it was on before."""
    switched = [m for m in checkpointable_models(model) if not is_checkpointing(m)]
    for module in switched:
        had_input_hook = hasattr(module, "_require_grads_hook")  # enable_input_require_grads'
        _enable(module)
        if not had_input_hook:
            module.disable_input_require_grads()
    try:
        yield
    finally:
        for module in switched:
            _disable(module)


def _enable(model: nn.Module) -> None:
    # transformers 5 renamed gradient checkpointing to activation checkpointing
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=CHECKPOINT_OPTIONS)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=CHECKPOINT_OPTIONS)


def _disable(model: nn.Module) -> None:
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()
