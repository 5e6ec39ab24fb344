"""One base model in memory, many LoRA adapters on it, each with its own classification head.

An adapter for text classification carries its head as `modules_to_save`. The engine's
`ModulesToSaveWrapper` keeps one head module per adapter, each a copy of the base's head, so
every copy would have the base's label count. Here, just before an adapter is loaded, the copy's
template is shaped to the label count in the adapter's own file (only the output size of the
head's Linear layers changes; their input size must fit the base, or the engine says why not).
So adapters for 2 and for 5 labels share one base, and the base's own random head is never used.

The model is shared: every forward pass, and every change to the model, holds `lock`. A load
does its slow parts without it (limits from the file's header, reading the files, shaping the
head), one load or unload at a time (`admin_lock`), so predictions for other adapters go on.

A folder `lorakit merge` wrote is served under a name too (`serve/merged.py`): a model of its
own beside the base, which never takes `lock`; names, listing and unloading are the adapters'.
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
from lorakit.models.transformer import public_name
from lorakit.recipes import Predictor, is_merged_model
from lorakit.recipes.sequence_classification import SequenceClassification, check_max_length
from lorakit.rundir import read_run_summary

from .admission import AdapterLimits, check_adapter_files
from .errors import AdapterExistsError, AdapterLoadError, ServeError, UnknownAdapterError
from .merged import load_merged

ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass
class AdapterInfo:
    """What the server knows of a loaded adapter."""

    name: str
    path: str  # on the server's disk: for the operator, never sent to clients
    labels: list[str]
    max_length: int
    rank: int | None  # None for a merged model
    warnings: list[str] = field(default_factory=list)
    kind: str = "lora"  # or "merged": a folder `lorakit merge` wrote, a model of its own


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


LORA_TENSOR = re.compile(
    r"(?P<module>.+)\.(lora_A\.weight|lora_B\.weight|lora_embedding_[AB]|lora_magnitude_vector)"
)


def base_tensors(model: nn.Module, heads: list[str], names) -> list[str]:
    """The tensors of an adapter file (by `names`) that would be copied into the base model:
    all but its LoRA weights and its own copies of the heads it saves whole (`heads`)."""
    own_heads = set()
    for path in heads:
        module = model.get_submodule(path)
        head = module.original_module if isinstance(module, ModulesToSaveWrapper) else module
        own_heads |= {f"{PREFIX}{path}.{key}" for key in head.state_dict()}
    foreign = []
    for name in names:
        lora = LORA_TENSOR.fullmatch(name.removeprefix(PREFIX))
        wrapped = lora and {"base_layer", "lora_A", "lora_B"} & set(lora["module"].split("."))
        if name not in own_heads and (not lora or wrapped):
            foreign.append(name)
    return foreign


def _shaped_like(original: nn.Module, path: str, shapes: dict[str, list[int]]) -> nn.Module:
    """`original`, or a copy whose Linear layers have the output sizes stored in the adapter
    (`shapes`: from its file's header)."""
    shaped = original
    for sub_name, sub in list(original.named_modules()):
        if not isinstance(sub, nn.Linear):
            continue
        key = f"{PREFIX}{'.'.join(filter(None, [path, sub_name]))}.weight"
        stored = shapes.get(key)
        if stored is None or len(stored) != 2 or stored[1] != sub.in_features:
            continue  # a wrong input size is the engine's to report
        if stored[0] == sub.out_features:
            continue
        new = nn.Linear(sub.in_features, stored[0], bias=sub.bias is not None)
        new = new.to(dtype=sub.weight.dtype, device=sub.weight.device)
        if not sub_name:
            return new
        if shaped is original:
            shaped = copy.deepcopy(original)
        parent, _, child = sub_name.rpartition(".")
        setattr(shaped.get_submodule(parent) if parent else shaped, child, new)
    return shaped


def load_error(config, base: str, error: LoraError) -> AdapterLoadError:
    """The engine's reason an adapter did not load on `base`, led by the base the adapter
    records when it is not this one."""
    recorded, served = config.base_model_name_or_path, public_name(str(base))
    if not recorded or public_name(recorded) == served:
        return AdapterLoadError(str(error))
    return AdapterLoadError(
        f"this adapter was made for the base model {recorded}, but this server's base is "
        f"{served}; it loads only on its own base ({error})"
    )


class AdapterRegistry:
    """A base sequence classifier with named adapters; `predict` runs one adapter on texts."""

    def __init__(
        self,
        base: str,
        *,
        batch_size: int = 32,
        max_length: int | None = None,
        limits: AdapterLimits | None = None,
    ):
        if is_merged_model(Path(base).expanduser()):
            raise ServeError(
                f"--base {base} is a merged model (lorakit merge); serve merged folders with "
                f"--adapter NAME={base} beside a base model"
            )
        model, tokenizer, resolved = SequenceClassification.serving_base(base)
        self.model = model.eval()
        # the base's own shapes: an adapter's head may differ from them in its label count only
        self.base_shapes = {name: list(p.shape) for name, p in model.named_parameters()}
        self.tokenizer = tokenizer
        self.base = resolved
        self.batch_size = batch_size
        self.limits = limits or AdapterLimits()
        sizes = [tokenizer.model_max_length, getattr(model.config, "max_position_embeddings", 0)]
        self.max_length = max_length or min(x for x in sizes if x and x > 0)
        self.adapters: dict[str, AdapterInfo] = {}  # every name served: adapters and merged
        self.merged: dict[str, tuple[AdapterInfo, Predictor]] = {}  # the merged models
        self.lock = threading.Lock()  # the model: forward passes and changes
        self.admin_lock = threading.Lock()  # one load or unload at a time

    @property
    def base_name(self) -> str:
        """The base model's name as clients see it: a folder's own name, never its path."""
        return Path(self.base).name if Path(self.base).is_absolute() else self.base

    # ------------------------------------------------------------ loading and unloading
    def names(self) -> list[str]:
        return sorted(dict(self.adapters))  # a snapshot: loads and unloads run in other threads

    def infos(self) -> list[AdapterInfo]:
        snapshot = dict(self.adapters)
        return [snapshot[name] for name in sorted(snapshot)]

    def load(self, name: str, path: str | Path, labels: list[str] | None = None) -> AdapterInfo:
        """Loads the adapter at `path` (adapter folder or run directory) under `name`, or the
        merged model there (a folder `lorakit merge` wrote).

        Its limits are checked from its config and header, then its files are read and its head
        shaped without the model's lock, so predictions go on meanwhile; only putting the
        adapter on the model (and one probe) holds the lock."""
        if not ADAPTER_NAME.fullmatch(name):
            raise AdapterLoadError(
                f"adapter name {name!r} is not allowed; use 1-64 letters, digits, '_' or '-'"
            )
        if labels is not None:
            self.limits.check_labels(len(labels), "the request")
        if is_merged_model(Path(path).expanduser()):
            return self._load_merged(name, Path(path).expanduser().resolve(), labels)
        source = locate_adapter(path)
        with self.admin_lock:
            self._check_free(name)
            if source.max_length is not None:  # as training checks it: else every request fails
                try:
                    check_max_length(source.max_length, self.model, self.base)
                except ConfigError as e:
                    raise AdapterLoadError(str(e)) from None
            shapes = check_adapter_files(source.adapter_dir, self.limits, self.base_shapes)
            try:
                files = read_adapter(source.adapter_dir)
            except LoraError as e:
                raise AdapterLoadError(str(e)) from None
            try:  # the modules load_adapter will save whole: the same rule, the same errors
                heads = modules_to_save_names(self.model, files[0])
            except LoraError as e:
                raise self._load_error(files[0], e) from None
            self._refuse_base_tensors(path, files[0], heads, files[1])
            if not files[0].modules_to_save:
                raise AdapterLoadError(
                    f"adapter {source.adapter_dir} has no classification head (modules_to_save); "
                    "serve adapters trained with modules_to_save=['classifier'], as lorakit's "
                    "classification recipes save them"
                )
            shaped = self._shaped_heads(heads, shapes)
            with self.lock:
                notes = self._load_into_model(name, source.adapter_dir, files, shaped)
                try:
                    num_labels = self._forward(name, ["probe"], self.max_length).shape[1]
                except Exception:
                    delete_adapter(self.model, name)
                    raise
            labels = labels or source.labels or [f"LABEL_{i}" for i in range(num_labels)]
            if len(labels) != num_labels:
                self._delete(name)
                raise AdapterLoadError(
                    f"adapter {source.adapter_dir} predicts {num_labels} classes but "
                    f"{len(labels)} labels were given ({labels})"
                )
            info = AdapterInfo(
                name,
                str(source.adapter_dir),
                list(labels),
                source.max_length or self.max_length,
                files[0].r,
                notes,
            )
            self.adapters[name] = info
        return info

    def _load_merged(self, name: str, folder: Path, labels: list[str] | None) -> AdapterInfo:
        """A merged model is loaded beside the base, never onto it: no lock is taken."""
        with self.admin_lock:
            self._check_free(name)
            predictor, labels = load_merged(folder, self.limits, labels)
            max_length = getattr(predictor, "max_length", None) or self.max_length
            info = AdapterInfo(name, str(folder), labels, max_length, None, kind="merged")
            self.merged[name] = (info, predictor)
            self.adapters[name] = info
        return info

    def _check_free(self, name: str) -> None:
        if name in self.adapters:
            raise AdapterExistsError(
                f"an adapter named {name!r} is already loaded; DELETE /v1/adapters/{name} "
                "first or pick another name"
            )

    def _shaped_heads(self, heads: list[str], shapes) -> dict[str, nn.Module]:
        """Each head that the adapter's output sizes change, shaped so (the model unchanged)."""
        shaped = {}
        for path in heads:
            original = self._head(path)
            head = _shaped_like(original, path, shapes)
            if head is not original:
                shaped[path] = head
        return shaped

    def _load_into_model(self, name, adapter_dir, files, shaped) -> list[str]:
        """Caller holds the lock. The shaped heads are templates of the adapter's own copies
        only: the originals are back when this returns."""
        originals = {path: self._head(path) for path in shaped}
        for path, head in shaped.items():
            self._put_head(path, head)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", FingerprintWarning)
                load_adapter(self.model, adapter_dir, adapter_name=name, files=files)
        except LoraError as e:
            raise self._load_error(files[0], e) from None
        finally:
            for path, original in originals.items():
                self._put_head(path, original)
        if any(issubclass(w.category, FingerprintWarning) for w in caught):
            return [
                "trained on a base model with other weights (its base fingerprint differs): "
                "outputs may differ from training"
            ]
        return []

    def _load_error(self, config, error: LoraError) -> AdapterLoadError:
        return load_error(config, self.base, error)

    def _refuse_base_tensors(self, adapter_dir, config, heads, tensors) -> None:
        """Every adapter shares the base: one that would write into it is refused (keeping its
        base tensors apart would mean a base per adapter; merge it into a model of its own)."""
        foreign = base_tensors(self.model, heads, tensors)
        if config.bias == "none" and not foreign:
            return
        what = f"trains base biases (bias={config.bias!r})" if config.bias != "none" else ""
        if foreign:
            what += " and " if what else ""
            what += f"carries {len(foreign)} tensor(s) of the base, first: {foreign[0]}"
        raise AdapterLoadError(
            f"adapter {adapter_dir} {what}; the server never changes the base that every adapter "
            "shares: serve adapters saved with bias='none' and only LoRA and head weights, or "
            "merge this one (lorakit merge) and serve the merged model as its own base"
        )

    def _head(self, path: str) -> nn.Module:
        module = self.model.get_submodule(path)
        return module.original_module if isinstance(module, ModulesToSaveWrapper) else module

    def _put_head(self, path: str, head: nn.Module) -> None:
        module = self.model.get_submodule(path)
        if isinstance(module, ModulesToSaveWrapper):
            module.original_module = head
        else:
            parent, _, child = path.rpartition(".")
            setattr(self.model.get_submodule(parent) if parent else self.model, child, head)

    def unload(self, name: str) -> AdapterInfo:
        with self.admin_lock:
            if self.info(name).kind == "merged":
                del self.merged[name]  # in-flight predictions keep their reference
            else:
                self._delete(name)
            return self.adapters.pop(name)

    def _delete(self, name: str) -> None:
        with self.lock:
            delete_adapter(self.model, name)

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
        merged = self.merged.get(name)
        if merged is not None:
            info, predictor = merged
            return info, predictor.predict_proba(list(texts))
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
