"""One base model in memory, many LoRA adapters on it, each with its own classification head.

An adapter for text classification carries its head as `modules_to_save`. The engine's
`ModulesToSaveWrapper` keeps one head module per adapter, each a copy of the base's head, so
every copy would have the base's label count. Here, just before an adapter is loaded, the copy's
template is shaped to the label count in the adapter's own file (only the output size of the
head's Linear layers changes; their input size must fit the base, or the engine says why not).
So adapters for 2 and for 5 labels share one base, and the base's own random head is never used.

The model is shared: loading, unloading and every forward pass hold `lock`.
"""

from __future__ import annotations

import copy
import re
import threading
import tomllib
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lorakit.config import ConfigError
from lorakit.lora import (
    CONFIG_NAME,
    FingerprintWarning,
    LoraError,
    ModulesToSaveWrapper,
    delete_adapter,
    load_adapter,
    modules_to_save_names,
    read_adapter,
    set_adapter,
)
from lorakit.lora.adapter_files import PREFIX
from lorakit.recipes.sequence_classification import SequenceClassification, check_max_length
from lorakit.rundir import read_run_summary

from .errors import AdapterExistsError, AdapterLoadError, UnknownAdapterError

ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass
class AdapterInfo:
    """What the server knows of a loaded adapter."""

    name: str
    path: str
    labels: list[str]
    max_length: int
    warnings: list[str] = field(default_factory=list)


@dataclass
class AdapterSource:
    """An adapter folder, with labels and max_length when it sits in a run directory."""

    adapter_dir: Path
    labels: list[str] | None = None
    max_length: int | None = None


def locate_adapter(path: str | Path) -> AdapterSource:
    """`path` is an adapter folder or a run directory (then its summary gives the labels)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise AdapterLoadError(
            f"{path} does not exist; give an adapter folder (with {CONFIG_NAME}) "
            "or a run directory written by `lorakit train`"
        )
    if (path / "adapter" / CONFIG_NAME).is_file():
        adapter_dir, run_dir = path / "adapter", path
    else:
        adapter_dir, run_dir = path, path.parent
    source = AdapterSource(adapter_dir.resolve())
    summary = run_dir / "summary.json"
    if summary.is_file() and adapter_dir.name == "adapter":
        try:
            source.labels = [str(x) for x in read_run_summary(run_dir)["labels"]]
        except (ConfigError, KeyError, TypeError) as e:
            raise AdapterLoadError(f"{summary} has no readable 'labels' list ({e})") from None
        config = run_dir / "config.toml"
        if config.is_file():
            data = tomllib.loads(config.read_text(encoding="utf-8")).get("data", {})
            source.max_length = data.get("max_length")
    return source


def _shaped_like(original: nn.Module, path: str, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """`original`, or a copy whose Linear layers have the output sizes stored in `tensors`."""
    shaped = original
    for sub_name, sub in list(original.named_modules()):
        if not isinstance(sub, nn.Linear):
            continue
        stored = tensors.get(f"{PREFIX}{'.'.join(filter(None, [path, sub_name]))}.weight")
        if stored is None or stored.ndim != 2 or stored.shape[1] != sub.in_features:
            continue  # a wrong input size is the engine's to report
        if stored.shape[0] == sub.out_features:
            continue
        new = nn.Linear(sub.in_features, stored.shape[0], bias=sub.bias is not None)
        new = new.to(dtype=sub.weight.dtype, device=sub.weight.device)
        if not sub_name:
            return new
        if shaped is original:
            shaped = copy.deepcopy(original)
        parent, _, child = sub_name.rpartition(".")
        setattr(shaped.get_submodule(parent) if parent else shaped, child, new)
    return shaped


class AdapterRegistry:
    """A base sequence classifier with named adapters; `predict` runs one adapter on texts."""

    def __init__(self, base: str, *, batch_size: int = 32, max_length: int | None = None):
        model, tokenizer, resolved = SequenceClassification.serving_base(base)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.base = resolved
        self.batch_size = batch_size
        limits = [tokenizer.model_max_length, getattr(model.config, "max_position_embeddings", 0)]
        self.max_length = max_length or min(x for x in limits if x and x > 0)
        self.adapters: dict[str, AdapterInfo] = {}
        self.lock = threading.Lock()

    # ------------------------------------------------------------ loading and unloading
    def names(self) -> list[str]:
        return sorted(dict(self.adapters))  # a snapshot: loads and unloads run in other threads

    def infos(self) -> list[AdapterInfo]:
        snapshot = dict(self.adapters)
        return [snapshot[name] for name in sorted(snapshot)]

    def load(self, name: str, path: str | Path, labels: list[str] | None = None) -> AdapterInfo:
        """Loads the adapter at `path` (adapter folder or run directory) under `name`."""
        if not ADAPTER_NAME.fullmatch(name):
            raise AdapterLoadError(
                f"adapter name {name!r} is not allowed; use 1-64 letters, digits, '_' or '-'"
            )
        source = locate_adapter(path)
        try:
            if source.max_length is not None:  # as training checks it: else every request fails
                check_max_length(source.max_length, self.model, self.base)
            config, tensors, _ = read_adapter(source.adapter_dir)
        except (ConfigError, LoraError) as e:
            raise AdapterLoadError(str(e)) from None
        if not config.modules_to_save:
            raise AdapterLoadError(
                f"adapter {source.adapter_dir} has no classification head (modules_to_save); "
                "serve adapters trained with modules_to_save=['classifier'], as lorakit's "
                "classification recipes save them"
            )
        with self.lock:
            if name in self.adapters:
                raise AdapterExistsError(
                    f"an adapter named {name!r} is already loaded; DELETE /v1/adapters/{name} "
                    "first or pick another name"
                )
            notes = self._load_into_model(name, source.adapter_dir, config, tensors)
            try:
                num_labels = self._forward(name, ["probe"], self.max_length).shape[1]
                labels = labels or source.labels or [f"LABEL_{i}" for i in range(num_labels)]
                if len(labels) != num_labels:
                    raise AdapterLoadError(
                        f"adapter {source.adapter_dir} predicts {num_labels} classes but "
                        f"{len(labels)} labels were given ({labels})"
                    )
            except Exception:
                delete_adapter(self.model, name)
                raise
            max_length = source.max_length or self.max_length
            info = AdapterInfo(name, str(source.adapter_dir), list(labels), max_length, notes)
            self.adapters[name] = info
        return info

    def _load_into_model(self, name, adapter_dir, config, tensors) -> list[str]:
        try:  # the modules load_adapter will save whole: the same rule, the same errors
            heads = modules_to_save_names(self.model, config)
        except LoraError as e:
            raise AdapterLoadError(str(e)) from None
        originals = self._shape_heads(heads, tensors)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", FingerprintWarning)
                load_adapter(self.model, adapter_dir, adapter_name=name)
        except LoraError as e:
            raise AdapterLoadError(str(e)) from None
        finally:
            self._restore_heads(originals)
        return [str(w.message) for w in caught if issubclass(w.category, FingerprintWarning)]

    def _shape_heads(self, heads: list[str], tensors) -> dict[str, nn.Module]:
        """Gives each head the adapter's output sizes; returns the originals to put back."""
        originals = {}
        for path in heads:
            module = self.model.get_submodule(path)
            wrapped = isinstance(module, ModulesToSaveWrapper)
            original = module.original_module if wrapped else module
            shaped = _shaped_like(original, path, tensors)
            if shaped is not original:
                self._put_head(path, shaped)
                originals[path] = original
        return originals

    def _restore_heads(self, originals: dict[str, nn.Module]) -> None:
        for path, original in originals.items():
            self._put_head(path, original)

    def _put_head(self, path: str, head: nn.Module) -> None:
        module = self.model.get_submodule(path)
        if isinstance(module, ModulesToSaveWrapper):
            module.original_module = head
        else:
            parent, _, child = path.rpartition(".")
            setattr(self.model.get_submodule(parent) if parent else self.model, child, head)

    def unload(self, name: str) -> AdapterInfo:
        with self.lock:
            self.info(name)
            delete_adapter(self.model, name)
            return self.adapters.pop(name)

    def info(self, name: str) -> AdapterInfo:
        """The loaded adapter `name`, or an error that lists the loaded ones."""
        info = self.adapters.get(name)
        if info is None:
            loaded = ", ".join(self.names()) or "none"
            raise UnknownAdapterError(f"no adapter named {name!r}; loaded adapters: {loaded}")
        return info

    # ------------------------------------------------------------ inference
    def predict(self, name: str, texts: list[str]) -> tuple[AdapterInfo, np.ndarray]:
        """(the adapter's info, class probabilities: one row per text)."""
        with self.lock:
            info = self.info(name)
            return info, self._forward(name, texts, info.max_length)

    def _forward(self, name: str, texts: list[str], max_length: int) -> np.ndarray:
        """Caller holds the lock. Texts run shortest first in batches, to pad little."""
        set_adapter(self.model, name)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        rows: list[np.ndarray | None] = [None] * len(texts)
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                batch = self.tokenizer(
                    [texts[i] for i in chunk],
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                    return_tensors="pt",
                )
                logits = self.model(**batch).logits.float()
                for i, row in zip(chunk, torch.softmax(logits, dim=-1).numpy(), strict=True):
                    rows[i] = row
        return np.stack(rows)
