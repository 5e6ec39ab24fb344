"""LoRA layers: a frozen base layer plus one low-rank update per named adapter.

    x ──► base_layer (W0, frozen) ───────────────────────────┐
    │                                                        (+) ──► h = W0·x + (alpha/r)·B·A·x
    └──► dropout ──► lora_A (r × in) ──► lora_B (out × r) ──► × scaling

A starts random and B at zero, so an untouched adapter leaves the model exactly as it was
(LoRA paper, Hu et al. 2021, section 4.1). Merging writes scaling·B·A into W0, after which the
layer costs nothing extra; unmerging subtracts it again.

An adapter with `use_dora` also has a magnitude per output (`lora_magnitude_vector`), which
rescales the adapted layer's output row by row (DoRA; the math is in dora.py). Its norm is
computed from low-rank products on every training step and kept in eval mode until a weight
changes.

The attribute names are PEFT's (`base_layer`, `lora_A`, `lora_B`, `lora_embedding_A`,
`lora_embedding_B`, `lora_magnitude_vector`, `lora_dropout`, `scaling`), so state-dict keys line
up with PEFT's files.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import dora
from .config import LoraConfig
from .errors import LoraError
from .initialisation import init_from_base, mutates_base

try:  # GPT-2 style layers store their weight as (in, out): "fan_in_fan_out"
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is optional for the engine
    Conv1D = None


class LoraLayer(nn.Module):
    """What every LoRA layer shares: the adapters it holds and which one is active."""

    # the attributes that hold each adapter's A and B, keyed by adapter name (PEFT's name)
    adapter_layer_names: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA adapters only
        self.active_adapter: str | None = None
        self.merged_adapters: list[str] = []
        self.disabled = False
        self._dora_norms = dora.Norms()
        self.row_adapters = None  # a mixed-adapter batch's weights, while one runs (mixed_batch.py)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def weight(self) -> torch.Tensor:  # so code that reads `layer.weight` keeps working
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def adapter_names(self) -> list[str]:
        return list(self.r)

    def adapter_params(self, adapter_name: str | None = None) -> dict[str, nn.Parameter]:
        """The adapter's A and B by their names in this layer ("lora_A.default.weight"); of
        every adapter when `adapter_name` is None. The layer declares which of its parameters
        belong to adapters (torchtune's `adapter_params`): nothing picks them out by name."""
        return _params_by_adapter(self, self.adapter_layer_names, adapter_name)

    def update_layer(self, adapter_name: str, config: LoraConfig) -> None:
        self.r[adapter_name] = config.r
        self.lora_alpha[adapter_name] = config.lora_alpha
        self.scaling[adapter_name] = config.scaling
        p = config.lora_dropout
        # Identity when p == 0: no copy of the input on every forward.
        self.lora_dropout[adapter_name] = nn.Dropout(p) if p > 0 else nn.Identity()
        self._create_weights(adapter_name, config.r)
        self._init_weights(adapter_name, config.init_lora_weights)
        weight = self.base_layer.weight
        self._to(adapter_name, device=weight.device)
        if config.use_dora:
            self._init_magnitude(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise LoraError(f"unmerge adapter {adapter_name!r} before deleting it")
        for store in [*self._adapter_stores(), self.lora_dropout]:
            if adapter_name in store:
                del store[adapter_name]
        for table in (self.r, self.lora_alpha, self.scaling, self._dora_norms.kept):
            table.pop(adapter_name, None)
        if self.active_adapter == adapter_name:
            self.active_adapter = None

    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Adds scaling·B·A to the base weight (DoRA: W0 + scaling·B·A rescaled to the
        magnitudes). safe_merge checks the result for NaN/inf first."""
        names = adapter_names or ([self.active_adapter] if self.active_adapter else [])
        weight = self.base_layer.weight
        if not weight.is_floating_point():  # 8 or 4 bits: the update would be rounded away
            raise LoraError(
                f"the base layer holds its weight quantized ({weight.dtype}); merge into its "
                "dequantized weights instead (lorakit.models.quantize.dequantize_model first)"
            )
        for name in names:
            if name in self.merged_adapters:
                continue
            if safe_merge or name in self.lora_magnitude_vector:
                merged = self._merged(name, weight.data)
                if safe_merge and not torch.isfinite(merged).all():
                    raise LoraError(
                        f"merging adapter {name!r} gives NaN/inf weights; the adapter is broken "
                        "(retrain it, or lower the learning rate)"
                    )
                weight.data = merged
            else:
                weight.data += self.get_delta_weight(name).to(weight.dtype)
            self.merged_adapters.append(name)
        self._dora_norms.forget()

    def unmerge(self) -> None:
        weight = self.base_layer.weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self._dora_norms.merged:
                weight.data = self._unmerged(name, weight.data)
                del self._dora_norms.merged[name]
            else:
                weight.data -= self.get_delta_weight(name).to(weight.dtype)
        self._dora_norms.forget()

    def train(self, mode: bool = True) -> LoraLayer:
        if mode:  # the weights will change: eval mode's norms are computed again
            self._dora_norms.kept.clear()
        return super().train(mode)

    # ---------------------------------------------------------------- DoRA
    def _init_magnitude(self, adapter_name: str) -> None:
        """m = ||W0 + scaling·B·A|| per output: the adapted layer starts as the plain LoRA one."""
        A, _ = self.lora_factors(adapter_name)
        norm = self._dora_norm(adapter_name, self.base_layer.weight)
        self.lora_magnitude_vector[adapter_name] = nn.Parameter(norm.to(A.dtype))

    def _dora_scale(self, adapter_name: str) -> torch.Tensor:
        """m / ||W0 + scaling·B·A|| per output; the norm is a constant to autograd (section 4.3
        of the DoRA paper), so only m gets a gradient from it."""
        return self.lora_magnitude_vector[adapter_name] / self._dora_norm(adapter_name)

    def _dora_norm(self, adapter_name: str, weight: torch.Tensor | None = None) -> torch.Tensor:
        """||weight + scaling·B·A|| per output (weight: the base's, kept in eval mode, unless
        given), from the low-rank products of dora.py."""
        A, B = self.lora_factors(adapter_name)
        scaling, in_out = self.scaling[adapter_name], self._stores_in_out()
        if weight is not None:
            return dora.weight_norm(weight, A, B, scaling, in_out)
        weight, keep = self.base_layer.weight, not self.training
        return self._dora_norms.norm(adapter_name, weight, A, B, scaling, in_out, keep)

    def _merged(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """`weight` with adapter `name` merged in, as a new tensor. DoRA's norm is that of the
        unmerged base plus the update, as in forward (PEFT's rule when adapters are merged one
        after another), and is kept for unmerging: the merged weight no longer tells it."""
        delta = self.get_delta_weight(name).to(weight.dtype)
        if name not in self.lora_magnitude_vector:
            return weight + delta
        norm = self._dora_norm(name, self._unmerged_weight())
        self._dora_norms.merged[name] = norm
        factor = dora.per_output(self.lora_magnitude_vector[name], norm, self._stores_in_out())
        return ((weight + delta) * factor).to(weight.dtype)

    def _unmerged(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """`weight` with the merged adapter `name` taken out, as a new tensor."""
        delta = self.get_delta_weight(name).to(weight.dtype)
        if name not in self._dora_norms.merged:
            return weight - delta
        norm = self._dora_norms.merged[name]
        factor = dora.per_output(self.lora_magnitude_vector[name], norm, self._stores_in_out())
        return (weight / factor - delta).to(weight.dtype)

    def _unmerged_weight(self) -> torch.Tensor:
        """The base weight with every merged adapter taken out: what forward computes with."""
        weight = self.base_layer.weight.data
        for name in reversed(self.merged_adapters):
            weight = self._unmerged(name, weight)
        return weight

    def _lora_active(self) -> str | None:
        if self.disabled or self.merged or self.active_adapter not in self.r:
            return None
        return self.active_adapter

    def _to(self, adapter_name: str, device: torch.device) -> None:
        for store in self._adapter_stores():
            if adapter_name not in store:
                continue
            entry = store[adapter_name]
            if isinstance(entry, nn.Module):
                entry.to(device)
            else:  # a parameter: moved in place, so the dict keeps the same one
                entry.data = entry.data.to(device)

    def _adapter_stores(self) -> list[nn.ModuleDict | nn.ParameterDict]:
        return [getattr(self, name) for name in self.adapter_layer_names]

    # implemented by each layer type
    def lora_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapter's A (r × in) and B (out × r), outputs as DoRA's norm counts them."""
        raise NotImplementedError

    def _stores_in_out(self) -> bool:
        """Whether the base weight is stored (in × out) rather than (out × in)."""
        raise NotImplementedError

    def _create_weights(self, adapter_name: str, r: int) -> None:
        raise NotImplementedError

    def _init_weights(self, adapter_name: str, init: bool | str) -> None:
        raise NotImplementedError

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        raise NotImplementedError


class Linear(LoraLayer):
    """LoRA for `nn.Linear` (weight out × in) and GPT-2's `Conv1D` (weight in × out)."""

    adapter_layer_names = ("lora_A", "lora_B", "lora_magnitude_vector")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = Conv1D is not None and isinstance(base_layer, Conv1D)
        # a quantized Linear (bitsandbytes') keeps its codes packed: its shape is not the weight's
        self.in_features, self.out_features = (
            base_layer.weight.shape
            if self.fan_in_fan_out
            else (base_layer.in_features, base_layer.out_features)
        )
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.update_layer(adapter_name, config)

    def _create_weights(self, adapter_name, r):
        dtype = torch.float32 if not self.base_layer.weight.is_floating_point() else None
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False, dtype=dtype)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False, dtype=dtype)

    def _init_weights(self, adapter_name, init):
        if mutates_base(init):  # PiSSA, OLoRA: A and B from W0 itself (initialisation.py)
            init_from_base(self, adapter_name, init)
            return
        A, B = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        if init == "gaussian":
            nn.init.normal_(A, std=1 / self.r[adapter_name])
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        if init is False:  # a non-identity start, for tests and experiments
            nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        else:
            nn.init.zeros_(B)

    def lora_factors(self, adapter_name):
        return self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight

    def _stores_in_out(self):
        return self.fan_in_fan_out

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        A, B = self.lora_factors(adapter_name)
        delta = (B @ A) * self.scaling[adapter_name]  # out × in
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.row_adapters is not None:  # each row through its own adapter
            return self.row_adapters.add_to(result, x)
        name = self._lora_active()
        if name is None:
            return result
        A, B = self.lora_factors(name)
        x, dtype = _to_adapter_dtype(x, A), result.dtype
        if name in self.lora_magnitude_vector:
            return self._dora_forward(name, x, result).to(dtype)
        down = F.linear(self.lora_dropout[name](x), A)  # (..., r): the cheap half
        return add_scaled_product(result, down, B, self.scaling[name]).to(dtype)

    def _dora_forward(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """(m/n)·(W0·x + s·B·A·x) + b from the base output `result` = W0·x + b: two passes over
        the output more than LoRA (PEFT's `DoraLinearLayer.forward`, fused)."""
        A, B = self.lora_factors(name)
        dropout, scaling = self.lora_dropout[name], self.scaling[name]
        scale = self._dora_scale(name)
        if isinstance(dropout, nn.Identity) or not self.training:
            out = add_scaled_product(result, F.linear(x, A), B, scaling)
            return dora.rescale(out, scale, self.base_layer.bias)
        # with dropout in training, PEFT rescales the base output of the dropped-out input:
        # result + (m/n - 1)·W0·dropout(x) + (m/n)·s·B·A·dropout(x), one more product with W0
        x = dropout(x)
        base = self._base_product(x)
        if scale.dtype == base.dtype:  # two fused passes over the output
            lora = F.linear(F.linear(x, A), B)
            return torch.addcmul(torch.addcmul(result, base, scale - 1), lora, scale * scaling)
        kept = result - base  # first: the fused product below may write into `base`
        out = add_scaled_product(base, F.linear(x, A), B, scaling)
        return kept + dora.rescale(out, scale, None)

    def _base_product(self, x: torch.Tensor) -> torch.Tensor:
        """W0·x without the bias."""
        weight = self.base_layer.weight
        if not torch.is_autocast_enabled(x.device.type):
            weight = weight.to(x.dtype)
        return F.linear(x, weight.T if self.fan_in_fan_out else weight)


def _to_adapter_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x in the adapter's dtype, as PEFT casts it: an fp32 adapter on a bf16 or fp16 base
    (PEFT's files load so) computes in fp32, and the layer returns the base's dtype. Under
    autocast the ops choose the dtype themselves, and x is left as it is."""
    if torch.is_autocast_enabled(x.device.type):
        return x
    return x.to(weight.dtype)


def add_scaled_product(result: torch.Tensor, down: torch.Tensor, B: torch.Tensor, scaling: float):
    """result + scaling · down·Bᵀ, as one fused `addmm` where the dtypes allow it.

    The plain form `result + B(down) * scaling` runs three kernels over the full output
    (product, multiply, add) and the backward multiplies the full gradient by `scaling` again;
    `addmm` accumulates into a copy of `result` and scales the rank-r operands instead. Without
    autograd it accumulates in place: no second full-size output is written.
    """
    if result.dtype != down.dtype:
        return result + F.linear(down, B) * scaling  # mixed dtypes: leave the casts to torch
    flat, down = result.reshape(-1, result.shape[-1]), down.reshape(-1, down.shape[-1])
    if torch.is_grad_enabled() and (result.requires_grad or down.requires_grad):
        return torch.addmm(flat, down, B.T, alpha=scaling).view(result.shape)
    # inference: accumulate into the base output itself, which nothing else holds yet (an
    # in-place op is outside autocast, so B takes the dtype autocast gave the rest)
    return flat.addmm_(down, B.T.to(flat.dtype), alpha=scaling).view(result.shape)


class Embedding(LoraLayer):
    """LoRA for `nn.Embedding`: a lookup in A, then a product with B (PEFT's layout)."""

    adapter_layer_names = ("lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")

    def __init__(self, base_layer: nn.Embedding, adapter_name: str, config: LoraConfig) -> None:
        super().__init__(base_layer)
        self.num_embeddings, self.embedding_dim = base_layer.weight.shape
        self.lora_embedding_A = nn.ParameterDict()  # r × num_embeddings
        self.lora_embedding_B = nn.ParameterDict()  # embedding_dim × r
        self.update_layer(adapter_name, config)

    def _create_weights(self, adapter_name, r):
        self.lora_embedding_A[adapter_name] = nn.Parameter(torch.empty(r, self.num_embeddings))
        self.lora_embedding_B[adapter_name] = nn.Parameter(torch.empty(self.embedding_dim, r))

    def _init_weights(self, adapter_name, init):
        # PEFT's choice for embeddings: A = 0 and B ~ N(0, 1), so the start is still the base.
        A, B = self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]
        nn.init.normal_(B)
        if init is False:
            nn.init.normal_(A)
        else:
            nn.init.zeros_(A)

    def _embed_scale(self) -> torch.Tensor | None:
        """The factor a scaled embedding (Gemma's, BART's: `embed_scale`) multiplies its lookup
        by; the update is scaled alike, as in PEFT, so merged and unmerged outputs agree."""
        scale = getattr(self.base_layer, "embed_scale", None)
        if isinstance(scale, (int, float)):
            weight = self.base_layer.weight
            return torch.tensor(scale, device=weight.device, dtype=weight.dtype)
        if isinstance(scale, torch.Tensor) and scale.numel() == 1:
            return scale
        return None

    def lora_factors(self, adapter_name):
        return self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]

    def _stores_in_out(self):
        return True  # num_embeddings × embedding_dim: DoRA's outputs are the dimensions

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        A, B = self.lora_factors(adapter_name)
        return (B @ A).T * self.scaling[adapter_name]  # num_embeddings × embedding_dim

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        name = self._lora_active()
        if name is None:
            return result
        base = self.base_layer
        after_A = F.embedding(x, self.lora_embedding_A[name].T, padding_idx=base.padding_idx)
        update = (after_A @ self.lora_embedding_B[name].T) * self.scaling[name]
        scale = self._embed_scale()
        if scale is not None:
            update = update * scale.to(update.dtype)
        out = result + update
        if name in self.lora_magnitude_vector:  # an embedding has no bias
            out = dora.rescale(out, self._dora_scale(name), None)
        if torch.is_autocast_enabled(update.device.type):
            return out
        return out.to(result.dtype)  # the base's dtype, as in Linear


class ModulesToSaveWrapper(nn.Module):
    """A module trained in full: the frozen original plus one trainable copy per adapter."""

    def __init__(self, module: nn.Module, adapter_name: str) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False
        self.update(adapter_name)

    def update(self, adapter_name: str) -> None:
        copy_ = copy.deepcopy(self.original_module)
        copy_.requires_grad_(True)
        self.modules_to_save[adapter_name] = copy_

    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save)

    def adapter_params(self, adapter_name: str | None = None) -> dict[str, nn.Parameter]:
        """The trained copies' parameters ("modules_to_save.default.weight"); the original's
        are the base's (see `LoraLayer.adapter_params`)."""
        return _params_by_adapter(self, ("modules_to_save",), adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = None

    def active_module(self) -> nn.Module:
        if self.disabled or self.active_adapter not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args, **kwargs):
        return self.active_module()(*args, **kwargs)

    def __getattr__(self, name: str):
        """The active module's attributes (`weight`, `num_embeddings`, ...), which code around
        the model reads, e.g. `get_input_embeddings().weight`; PEFT's wrapper forwards them too."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save", "active_adapter", "disabled"):
                raise  # not set yet (inside __init__): no recursion through active_module
        return getattr(self.active_module(), name)


def _params_by_adapter(
    layer: nn.Module, stores: tuple[str, ...], adapter_name: str | None
) -> dict[str, nn.Parameter]:
    """The parameters in `layer`'s dicts keyed by adapter name (`stores`), named
    "<store>.<adapter>[.<parameter>]": those of `adapter_name`, or of every adapter."""
    params = {}
    for store in stores:
        for name, param in getattr(layer, store).named_parameters(prefix=store):
            if adapter_name is None or name.split(".")[1] == adapter_name:
                params[name] = param
    return params


def make_lora_layer(module: nn.Module, adapter_name: str, config: LoraConfig) -> LoraLayer | None:
    """The LoRA layer for `module`, or None when its type has no LoRA layer."""
    if isinstance(module, nn.Linear) or (Conv1D is not None and isinstance(module, Conv1D)):
        return Linear(module, adapter_name, config)
    if isinstance(module, nn.Embedding):
        return Embedding(module, adapter_name, config)
    return None


def supported_types() -> tuple[type, ...]:
    return (nn.Linear, nn.Embedding) + ((Conv1D,) if Conv1D is not None else ())
