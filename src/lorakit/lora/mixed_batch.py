"""Mixed-adapter batches: every row of one batch through its own adapter, in one forward.

A server with many adapters on one base gets requests for several of them at once. One forward
per adapter splits the batch into small ones; instead each row names its adapter (or none, for
the base), and every LoRA layer adds each row's own update to the shared base output (the idea
of Punica's BGMV and S-LoRA, here in plain PyTorch):

    h[i] = W0·x[i] + s_k · B_k·A_k·x[i]        k: the adapter of row i

The adapters present in the batch are concatenated along the rank, so adapters of different
ranks fit without padding, and two ordinary products do every row at once:

    A_cat = [A_1; A_2; ...]   (Σr × in)        B_cat = [B_1 | B_2 | ...]   (out × Σr)
    down  = x · A_catᵀ                          every adapter's down-projection of every row
    h     = W0·x + (down ⊙ M) · B_catᵀ          M[i] = s_k on adapter k's columns, 0 elsewhere

The mask M keeps, for each row, only its own adapter's columns, scaled: the other adapters add
exact zeros. The waste is Σr against r columns in the two thin products, which are small next
to W0·x; no adapter weight is copied per row, as a per-row gather of A and B would.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .errors import LoraError
from .layers import Linear
from .model import disable_adapters, lora_layers, set_adapter


class RowAdapters:
    """One layer's adapters for one batch: the concatenated A and B, and the row mask."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, mask: torch.Tensor) -> None:
        self.A, self.B, self.mask = A, B, mask  # (Σr, in), (out, Σr), (rows, 1, Σr)

    def add_to(self, result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """result + each row's own scaled update; `x` and `result` are (rows, tokens, ·)."""
        dtype = result.dtype
        down = torch.matmul(x.to(self.A.dtype), self.A.T) * self.mask
        return (result + torch.matmul(down, self.B.T)).to(dtype)


class MixedBatch:
    """Puts a batch's rows through their adapters: ``with batch.rows(model, names): model(...)``.

    The concatenated weights of each set of adapters are kept until `forget` (call it when an
    adapter is loaded, changed or deleted, or another adapter was set on the model), so a batch
    whose rows keep their adapters from step to step builds them once.
    """

    def __init__(self, max_plans: int = 16) -> None:
        self.max_plans = max_plans
        # (adapter names in the batch) -> {layer: (A_cat, B_cat, [(adapter, first, last)...])}
        self._plans: dict[tuple[str, ...], dict] = {}
        self._active: str | None = None  # the adapter the last uniform batch set

    def forget(self) -> None:
        self._plans.clear()
        self._active = None

    @contextlib.contextmanager
    def rows(self, model: nn.Module, names: Sequence[str | None]) -> Iterator[nn.Module]:
        """Inside the block, row i of every forward goes through adapter ``names[i]`` (None:
        the base). One adapter for every row takes the ordinary single-adapter path."""
        present = tuple(sorted({name for name in names if name is not None}))
        if not present:
            with disable_adapters(model):
                yield model
            return
        if len(present) == 1 and None not in names:
            if self._active != present[0]:  # set_adapter walks every layer: once per change
                set_adapter(model, present[0])
                self._active = present[0]
            yield model
            return
        plan = self._plan(model, present)
        masks: dict[tuple, torch.Tensor] = {}  # layers with the same columns share one mask
        try:
            for layer, (A, B, columns) in plan.items():
                key = tuple(columns)
                if key not in masks:
                    masks[key] = _row_mask(names, columns, A)
                layer.row_adapters = RowAdapters(A, B, masks[key])
            with disable_adapters(model):  # layers no adapter of the batch targets: the base
                yield model
        finally:
            for layer in plan:
                layer.row_adapters = None

    def _plan(self, model: nn.Module, present: tuple[str, ...]) -> dict:
        plan = self._plans.get(present)
        if plan is not None:
            return plan
        plan = {}
        for name, layer in lora_layers(model):
            held = [adapter for adapter in present if adapter in layer.r]
            if not held:
                continue
            dora = [adapter for adapter in held if adapter in layer.lora_magnitude_vector]
            if not isinstance(layer, Linear) or layer.merged or dora:
                what = f"DoRA in {dora[0]!r}" if dora else f"a {type(layer).__name__} layer"
                raise LoraError(
                    f"{name}: a mixed-adapter batch takes unmerged plain LoRA on Linear layers "
                    f"only ({what} here); serve it alone"
                )
            plan[layer] = _concatenated(layer, held)
        if len(self._plans) >= self.max_plans:
            self._plans.pop(next(iter(self._plans)))
        self._plans[present] = plan
        return plan


def _concatenated(layer: Linear, adapters: list[str]):
    """(A_cat, B_cat, columns): `columns` says which adapter owns which columns, and its scale."""
    columns, first = [], 0
    for adapter in adapters:
        r = layer.r[adapter]
        columns.append((adapter, first, first + r, layer.scaling[adapter]))
        first += r
    with torch.no_grad():
        A = torch.cat([layer.lora_A[adapter].weight for adapter in adapters])
        B = torch.cat([layer.lora_B[adapter].weight for adapter in adapters], dim=1)
    return A, B, columns


def _row_mask(names: Sequence[str | None], columns: list, like: torch.Tensor) -> torch.Tensor:
    """(rows, 1, Σr): each row's adapter scale on that adapter's columns, zero elsewhere."""
    mask = torch.zeros(len(names), 1, columns[-1][2], dtype=like.dtype)
    where = {adapter: (first, last, scale) for adapter, first, last, scale in columns}
    for row, name in enumerate(names):
        if name in where:
            first, last, scale = where[name]
            mask[row, 0, first:last] = scale
    return mask.to(like.device)
