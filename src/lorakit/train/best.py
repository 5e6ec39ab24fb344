"""The best evaluation of a training run, and the trainable weights the model had then.

Both trainers (lorakit's loop and the HF Trainer bridge) keep one ``BestEvaluation``. It decides
whether an evaluation improves on the best so far, counts those that do not (early stopping),
holds the one in-memory copy of the best weights (which the loop's checkpoints save as well),
and puts that copy back into the model when training ends: a trainer returns the model at its
best evaluation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


def trainable_tensors(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters that train, by name."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def load_into(model: torch.nn.Module, values: dict[str, torch.Tensor]) -> None:
    """Copy ``values`` into the model's parameters of the same names."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in values.items():
            params[name].copy_(value)


@dataclass
class BestEvaluation:
    """The best evaluation so far by ``metric``: maximised (``accuracy``), or minimised when it
    is ``loss`` or ``perplexity``. ``patience``: evaluations without improvement after which
    training should stop (0: never)."""

    metric: str = "accuracy"
    patience: int = 0
    step: int = 0
    value: float = math.nan  # the metric's value at `step`; ±inf before the first evaluation
    metrics: dict[str, float] = field(default_factory=dict)
    bad_evals: int = 0  # evaluations since the best one
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # trainable tensors at `step`

    def __post_init__(self) -> None:
        if math.isnan(self.value):
            self.value = math.inf if self.minimise else -math.inf

    @property
    def minimise(self) -> bool:
        return self.metric in ("loss", "perplexity")

    @property
    def should_stop(self) -> bool:
        return 0 < self.patience <= self.bad_evals

    def update(self, model: torch.nn.Module, step: int, figures: dict[str, float]) -> bool:
        """Take an evaluation of ``model`` at ``step``; copy its weights when it is the best."""
        value = figures[self.metric]
        if not (value < self.value if self.minimise else value > self.value):
            self.bad_evals += 1
            return False
        self.step, self.value, self.metrics, self.bad_evals = step, value, figures, 0
        self.weights = {n: p.detach().clone() for n, p in trainable_tensors(model).items()}
        return True

    def restore(self, model: torch.nn.Module) -> None:
        """Put the best weights back into ``model`` (nothing when no evaluation improved)."""
        load_into(model, self.weights)
