"""One causal LM in memory and the LoRA adapters that generate with it, loaded on demand.

Every adapter the server knows has a name and a folder (a run directory of `lorakit train` on a
causal recipe, or an adapter folder). At most `max_adapters` of them, and `max_loaded_bytes` of
their weights, sit on the model at once: a request for one that is not there loads it from disk,
and the least recently used adapters that no running request needs make room (an LRU cache, as
vLLM's and LoRAX's adapter caches).

Adapters are served in mixed batches (`lorakit.lora.MixedBatch`), which take LoRA on Linear
layers only, with nothing else of the base changed: an adapter that trains whole modules
(`modules_to_save`), biases or embeddings is refused with the way out (merge it and serve the
merged model as a base of its own).

The model is shared: every change to it holds `lock`, which the decoding worker holds for each
step (`serve/decoding.py`); a load on the worker's behalf runs inside its step.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.config import ConfigError
from lorakit.data.causal import pad_id
from lorakit.data.chat import has_chat_template
from lorakit.lora import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    Linear,
    LoraError,
    MixedBatch,
    delete_adapter,
    load_adapter,
    lora_layers,
    read_adapter,
)
from lorakit.models.causal_lm import load_causal_lm
from lorakit.recipes import is_merged_model
from lorakit.recipes.causal_lm import chat_prompting
from lorakit.rundir import read_run_summary

from .admission import AdapterLimits, check_adapter_files
from .errors import AdapterExistsError, AdapterLoadError, ServeError, UnknownAdapterError
from .registry import ADAPTER_NAME, load_error


@dataclass(frozen=True)
class CausalAdapter:
    """What the server knows of an adapter it serves."""

    name: str
    path: Path  # the adapter folder, on the server's disk: never sent to clients
    chat: bool  # its run rendered examples with the chat template
    system_prompt: str | None  # its run's system prompt, put first when a chat has none
    rank: int
    bytes: int  # its weights file


def locate_causal_adapter(path: str | Path, tokenizer) -> tuple[Path, bool, str | None]:
    """(adapter folder, chat, system prompt) of a causal run directory or an adapter folder."""
    path = Path(path).expanduser()
    if is_merged_model(path):
        raise AdapterLoadError(
            f"{path} is a merged model (lorakit merge); serve it as a base of its own: "
            f"lorakit serve --base {path}"
        )
    run = path if (path / "adapter" / CONFIG_NAME).is_file() else None
    adapter_dir = path / "adapter" if run else path
    if not (adapter_dir / CONFIG_NAME).is_file() or not (adapter_dir / WEIGHTS_NAME).is_file():
        raise AdapterLoadError(
            f"{path} is no adapter: give a run directory of `lorakit train` or a folder with "
            f"{CONFIG_NAME} and {WEIGHTS_NAME}"
        )
    if run is None or not (run / "summary.json").is_file():
        return adapter_dir.resolve(), has_chat_template(tokenizer), None
    try:
        task = read_run_summary(run).get("task")
        if task != "causal-lm":
            raise AdapterLoadError(
                f"{path} is a {task or 'classification'} run; this server generates text: serve "
                "it on a classifier base (lorakit serve --base minilm)"
            )
        chat, system_prompt = chat_prompting(run)
    except ConfigError as e:
        raise AdapterLoadError(f"{path}: {e}") from None
    return adapter_dir.resolve(), chat, system_prompt


class CausalRegistry:
    """A causal LM with named adapters, at most `max_adapters` (and `max_loaded_bytes`) loaded."""

    def __init__(
        self,
        base: str,
        *,
        dtype: torch.dtype | None = None,
        limits: AdapterLimits | None = None,
        max_adapters: int = 64,
        max_loaded_bytes: int = 2**30,
    ) -> None:
        if max_adapters < 1 or max_loaded_bytes < 1:
            raise ServeError("--max-adapters and --max-loaded-bytes must be at least 1")
        try:
            model, tokenizer = load_causal_lm(base, dtype=dtype)
        except (OSError, ValueError) as e:
            raise ServeError(f"--base {base}: {e}") from None
        self.model, self.tokenizer = model.eval(), tokenizer
        self.base = base
        self.base_name = Path(base).name if Path(base).expanduser().exists() else str(base)
        self.chat_template = has_chat_template(tokenizer)
        self.pad_id = pad_id(tokenizer)
        self.base_shapes = {name: list(p.shape) for name, p in model.named_parameters()}
        self.limits = limits or AdapterLimits()
        self.max_adapters, self.max_loaded_bytes = max_adapters, max_loaded_bytes
        self.adapters: dict[str, CausalAdapter] = {}
        self.retired: set[str] = set()  # unregistered, still on the model while rows use them
        self.loaded: OrderedDict[str, int] = OrderedDict()  # name -> bytes, least recent first
        self.mixed_batch = MixedBatch()
        self.lock = threading.RLock()  # the model
        self.admin_lock = threading.Lock()  # one registration at a time
        self.evictions = 0
        self.on_evict = lambda name: None
        self.in_use = lambda: set()  # the adapters running requests use (the batcher's)

    def names(self) -> list[str]:
        return sorted(dict(self.adapters))

    def adapter(self, model: str) -> CausalAdapter | None:
        """The adapter a request's `model` names: None for the base, else a registered one."""
        if model == self.base_name:
            return None
        found = self.adapters.get(model)
        if found is None:
            served = ", ".join([self.base_name, *self.names()])
            raise UnknownAdapterError(f"no model named {model!r}; this server has: {served}")
        return found

    # ------------------------------------------------------------ registering
    def register(self, name: str, path: str | Path) -> CausalAdapter:
        """Checks and loads the adapter at `path` under `name` (loading is the full check);
        it may be evicted later, and comes back from disk when a request needs it."""
        if not ADAPTER_NAME.fullmatch(name) or name == self.base_name:
            raise AdapterLoadError(
                f"adapter name {name!r} is not allowed; use 1-64 letters, digits, '_' or '-', "
                f"other than the base's name {self.base_name!r}"
            )
        adapter_dir, chat, system_prompt = locate_causal_adapter(path, self.tokenizer)
        with self.admin_lock:
            if name in self.adapters or name in self.retired:
                raise AdapterExistsError(
                    f"an adapter named {name!r} is already loaded (or still unloading); unload "
                    "it first, or pick another name"
                )
            check_adapter_files(adapter_dir, self.limits, self.base_shapes)
            config, tensors, _ = self._read(adapter_dir)
            size = (adapter_dir / WEIGHTS_NAME).stat().st_size
            adapter = CausalAdapter(name, adapter_dir, chat, system_prompt, config.r, size)
            with self.lock:
                self._load(adapter, (config, tensors, _), in_use=self.in_use())
                self.adapters[name] = adapter
        return adapter

    def unregister(self, name: str) -> CausalAdapter:
        """Forgets `name`: new requests for it are refused, and it leaves the model when no
        running request uses it any more (`drop_retired`)."""
        with self.admin_lock:
            adapter = self.adapters.pop(name, None)
            if adapter is None:
                self.adapter(name)  # the error that lists what is served
            self.retired.add(name)
            return adapter

    def drop_retired(self, in_use: set[str]) -> None:
        """Takes unregistered adapters off the model once no row uses them (lock held)."""
        for name in list(self.retired - in_use):
            if name in self.loaded:
                delete_adapter(self.model, name)
                del self.loaded[name]
                self.mixed_batch.forget()
            self.retired.discard(name)

    # ------------------------------------------------------------ the cache
    def prepare(self, in_use: set[str], name: str | None) -> None:
        """Makes sure adapter `name` is on the model (the worker calls this, lock held)."""
        if name is None:
            return
        if name in self.loaded:
            self.loaded.move_to_end(name)
            return
        adapter = self.adapters.get(name)
        if adapter is None:
            raise UnknownAdapterError(f"adapter {name!r} was unloaded")
        self._load(adapter, self._read(adapter.path), in_use)

    def _read(self, adapter_dir: Path):
        try:
            return read_adapter(adapter_dir)
        except LoraError as e:
            raise AdapterLoadError(str(e)) from None

    def _load(self, adapter: CausalAdapter, files, in_use: set[str]) -> None:
        """Caller holds the lock. Room first (evicting), then the load and its checks."""
        self._make_room(adapter.bytes, in_use | {adapter.name})
        config = files[0]
        if config.modules_to_save or config.bias != "none" or config.use_dora:
            what = (
                "trains whole modules (modules_to_save)" if config.modules_to_save
                else "is a DoRA adapter (use_dora)" if config.use_dora
                else f"trains biases (bias={config.bias!r})"
            )  # fmt: skip
            raise AdapterLoadError(
                f"adapter {adapter.path} {what}; every adapter shares the base, so only LoRA "
                "weights are served: merge it (lorakit merge) and serve the merged folder with "
                "--base"
            )
        try:
            load_adapter(self.model, adapter.path, adapter_name=adapter.name, files=files)
        except LoraError as e:
            raise load_error(config, self.base, e) from None
        for module, layer in lora_layers(self.model):
            if adapter.name in layer.r and not isinstance(layer, Linear):
                delete_adapter(self.model, adapter.name)
                raise AdapterLoadError(
                    f"adapter {adapter.path} puts LoRA on {module} ({type(layer).__name__}); "
                    "served adapters take LoRA on Linear layers only: merge it (lorakit merge) "
                    "and serve the merged folder with --base"
                )
        self.loaded[adapter.name] = adapter.bytes
        self.mixed_batch.forget()

    def _make_room(self, size: int, keep: set[str]) -> None:
        """Evicts the least recently used adapters outside `keep` until one of `size` fits."""
        if size > self.max_loaded_bytes:
            raise AdapterLoadError(
                f"the adapter has {size:,} bytes; this server holds at most "
                f"{self.max_loaded_bytes:,} bytes of adapters (lorakit serve --max-loaded-bytes)"
            )
        while self.loaded and (
            len(self.loaded) + 1 > self.max_adapters
            or sum(self.loaded.values()) + size > self.max_loaded_bytes
        ):
            idle = next((name for name in self.loaded if name not in keep), None)
            if idle is None:
                return  # every loaded adapter is in use: over the cap until some finish
            delete_adapter(self.model, idle)
            del self.loaded[idle]
            self.evictions += 1
            self.on_evict(idle)
