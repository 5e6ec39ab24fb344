"""Keeping the best evaluation's weights while training goes on."""

from __future__ import annotations

from pathlib import Path

import torch

from . import engines


class BestWeights:
    """The trainable tensors of the best evaluation, in memory, and (when `directory` is given)
    the adapter on disk as well. Pass it as `train_loop(..., save_best=best)`."""

    def __init__(self, directory: Path | None = None, base_name: str | None = None):
        self.directory, self.base_name = directory, base_name
        self.state: dict[str, torch.Tensor] = {}

    def __call__(self, model: torch.nn.Module, step: int) -> None:
        self.state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        if self.directory is not None:
            engines.save(model, self.directory, self.base_name)

    def restore(self, model: torch.nn.Module) -> None:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in self.state.items():
                params[name].copy_(value)
