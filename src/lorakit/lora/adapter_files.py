"""Adapters on disk, in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

Tensor names are the ones PEFT writes for the same model: the path of the module inside
`base_model.model`, then `lora_A.weight` / `lora_B.weight` (or `lora_embedding_A` /
`lora_embedding_B`), with the adapter's name left out; a `modules_to_save` module is stored
under its own path (`base_model.model.classifier.weight`). The safetensors header also records
the base model's name (`base_model`, as `base_model_name_or_path`), the folder its weights were
read from (`base_model_path`), a fingerprint of those weights and lorakit's version.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .config import ALL_LINEAR, PISSA_NITER, LoraConfig
from .errors import AdapterFileError, AdapterShapeError, LoraError
from .initialisation import (
    converted_config,
    converted_tensors,
    initial_weights,
    mutates_base,
    untouched_base,
)
from .layers import LoraLayer, ModulesToSaveWrapper
from .merging import unload
from .model import (
    adapter_config,
    adapter_parameters,
    add_adapter,
    configs,
    delete_adapter,
    freeze_base,
    lora_layers,
    mark_bias_trainable,
    set_adapter,
    wrappers,
)
from .targeting import saved_matches

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
FLOATING_POINT = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class FingerprintWarning(UserWarning):
    """The adapter was trained on a base model with other weights."""


def lorakit_version() -> str:
    """The installed lorakit's version, as adapter and merged-model files record it."""
    try:
        from importlib.metadata import version

        return version("lorakit")
    except Exception:
        return "unknown"


# ---------------------------------------------------------------- names
def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's file names (live tensors, not copies)."""
    config = adapter_config(model, adapter_name)
    tensors: dict[str, torch.Tensor] = {}
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.r:
            for key, param in module.adapter_params(adapter_name).items():
                parts = key.split(".")  # "lora_A", the adapter's name, "weight"
                del parts[1]  # PEFT's files leave the adapter's name out
                tensors[PREFIX + path + "." + ".".join(parts)] = param
            bias = getattr(module.base_layer, "bias", None)
            if config.bias == "lora_only" and bias is not None:
                tensors[f"{PREFIX}{path}.base_layer.bias"] = bias
        elif isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            for key, tensor in module.modules_to_save[adapter_name].state_dict().items():
                tensors[f"{PREFIX}{path}.{key}"] = tensor
    if config.bias == "all":
        wrapped = tuple(f"{name}." for name, _ in wrappers(model))  # their biases are above
        for key, param in model.named_parameters():
            if key.endswith("bias") and not key.startswith(wrapped):
                tensors[PREFIX + key] = param
    return tensors


def lora_tensor_module(key: str) -> str | None:
    """The module a LoRA tensor of an adapter file belongs to
    ("base_model.model.encoder.query.lora_A.weight" -> "encoder.query"); None for a tensor of
    a module saved whole or of a base bias."""
    module, found, _ = key.removeprefix(PREFIX).partition(".lora_")
    return module if found else None


# ---------------------------------------------------------------- fingerprint
def base_fingerprint(
    model: nn.Module, modules_to_save: list[str] | None = None, stored: Iterable[str] = ()
) -> str:
    """A digest of the base model's weights, under their names before LoRA was added.

    Adapters and `modules_to_save` (e.g. a freshly initialised head) are left out, so the same
    pretrained weights give the same fingerprint before and after `inject`; so are the base
    tensors an adapter file stores (`stored`: its tensor names, such as the biases it trained
    under `bias="all"`), which the adapter brings with it. `modules_to_save` defaults to those
    of the adapters on the model; an adapter's file records (and its loading checks) its own.
    """
    merged = [layer for _, layer in lora_layers(model) if layer.merged]
    if merged:
        raise LoraError("unmerge the adapter (unmerge_adapter) before fingerprinting the base")
    if modules_to_save is None:
        modules_to_save = [m for config in configs(model).values() for m in config.saved]
    saved = set(modules_to_save)
    brought = {key.removeprefix(PREFIX).replace(".base_layer.", ".") for key in stored}
    adapters = {id(p) for p in adapter_parameters(model).values()}
    digest = hashlib.blake2b(digest_size=16)
    for name, param in model.named_parameters():
        if id(param) in adapters:
            continue
        base_name = name.replace(".base_layer.", ".").replace(".original_module.", ".")
        if base_name in brought or saved_matches(base_name.rsplit(".", 1)[0], sorted(saved)):
            continue
        tensor = param.detach().contiguous().cpu()
        digest.update(f"{base_name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------- saving
def _write_files(directory: Path, writers: dict[str, Callable[[Path], None]]) -> None:
    """Writes each file through a temporary one beside it and renames them all once every one is
    on disk: a write that fails (a full disk) leaves the folder as it was, or, when this call
    made it, removes it; the error is one line."""
    made = not directory.exists()
    written: list[Path] = []
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for name, write in writers.items():
            written.append(directory / f".{name}.tmp-{os.getpid()}")
            write(written[-1])
            with open(written[-1], "rb") as f:
                os.fsync(f.fileno())
        for name, tmp in zip(writers, written, strict=True):
            os.replace(tmp, directory / name)
    except (OSError, SafetensorError) as err:
        raise AdapterFileError(
            f"could not write the adapter to {directory} ({err}); free space (or fix the "
            "folder's permissions) and save it again"
        ) from None
    finally:
        for tmp in written:
            tmp.unlink(missing_ok=True)
        if made:
            with contextlib.suppress(OSError):  # kept when the files are in it
                directory.rmdir()


def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    adapter_name: str = "default",
    base_model_name_or_path: str | None = None,
    base_model_path: str | None = None,
    *,
    convert_to_lora: bool = False,
    path_initial_model_for_weight_conversion: str | os.PathLike | None = None,
) -> Path:
    """Writes the adapter alone (a few KB to MB), loadable by lorakit and by PEFT.

    `base_model_name_or_path`: the name PEFT users load the base by (a hub id where there is
    one); `base_model_path`: the local folder the base was read from, recorded in the header.
    An adapter whose start came from the base weight (PiSSA, OLoRA) is saved as it is, or, with
    `convert_to_lora`, as the plain LoRA adapter of rank 2r that gives the same model on the
    untouched base (`initialisation.py`); `path_initial_model_for_weight_conversion` does the
    same from the adapter as it was saved right after initialisation (PEFT's option)."""
    directory = Path(directory)
    config = adapter_config(model, adapter_name)
    base_name = base_model_name_or_path or config.base_model_name_or_path
    merged = any(layer.merged for _, layer in lora_layers(model))
    tensors = {
        k: v.detach().to("cpu").contiguous().clone()
        for k, v in adapter_state_dict(model, adapter_name).items()
    }
    with untouched_base(model):  # the base this file loads on
        fingerprint = "" if merged else base_fingerprint(model, config.saved, stored=tensors)
    initial = _initial_tensors(model, adapter_name, path_initial_model_for_weight_conversion)
    if path_initial_model_for_weight_conversion is not None or (
        convert_to_lora and mutates_base(config.init_lora_weights)
    ):
        tensors, config = converted_tensors(tensors, initial), converted_config(config)
    metadata = {
        "format": "pt",
        "lorakit_version": lorakit_version(),
        "base_model": str(base_name or ""),
        "base_model_path": str(base_model_path or base_name or ""),
        # merged weights are not the base's: such a file records no fingerprint (none is checked)
        "base_fingerprint": fingerprint,
    }
    config_dict = config.to_dict()
    config_dict["base_model_name_or_path"] = base_name
    if config.target_modules == ALL_LINEAR:
        # PEFT resolves "all-linear" by a rule of its own (LoRA on a classifier head lorakit
        # leaves alone, or on DistilBERT's saved pre_classifier, where it fails) and saves the
        # names it chose; lorakit saves its names too, so that both engines adapt the same layers
        config_dict["target_modules"] = sorted(
            name for name, layer in lora_layers(model) if adapter_name in layer.r
        )
    config_dict["inference_mode"] = True
    # PEFT reads GPT-2's Conv1D weights as (in, out) only when told so
    config_dict["fan_in_fan_out"] = config.fan_in_fan_out or any(
        getattr(layer, "fan_in_fan_out", False) and adapter_name in layer.r
        for _, layer in lora_layers(model)
    )
    config_text = json.dumps(config_dict, indent=2, sort_keys=True) + "\n"
    _write_files(directory, {
        WEIGHTS_NAME: lambda path: save_file(tensors, str(path), metadata),
        CONFIG_NAME: lambda path: path.write_text(config_text, encoding="utf-8"),
    })  # fmt: skip
    return directory


def _initial_tensors(
    model: nn.Module, adapter_name: str, folder: str | os.PathLike | None
) -> dict[str, torch.Tensor]:
    """A0 and B0 under their file names: from the adapter folder saved right after
    initialisation, or as the layers recorded them."""
    if folder is not None:
        return read_adapter(folder)[1]
    tensors = {}
    for path, layer in lora_layers(model):
        start = initial_weights(layer, adapter_name)
        if start is not None:
            tensors[f"{PREFIX}{path}.lora_A.weight"], tensors[f"{PREFIX}{path}.lora_B.weight"] = (
                start
            )
    return tensors


# ---------------------------------------------------------------- loading
def read_adapter(directory: str | os.PathLike) -> tuple[LoraConfig, dict[str, torch.Tensor], dict]:
    """Config, tensors and header metadata of an adapter folder, with errors that name the fix."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterFileError(
            f"{directory} is not a folder; point at the adapter folder that holds "
            f"{CONFIG_NAME} and {WEIGHTS_NAME} (e.g. RUN_DIR/adapter)"
        )
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (directory / n).is_file()]
    if missing:
        hint = (
            " (adapter_model.bin is pickle, which lorakit never loads)"
            if (directory / "adapter_model.bin").exists()
            else ""
        )
        raise AdapterFileError(
            f"{directory} has no {' and no '.join(missing)}{hint}; an adapter folder holds "
            f"{CONFIG_NAME} and {WEIGHTS_NAME}, as save_adapter or PEFT's save_pretrained write them"
        )
    config = read_config(directory / CONFIG_NAME)
    try:
        tensors = {}
        with safe_open(str(directory / WEIGHTS_NAME), framework="pt") as f:
            metadata = f.metadata() or {}
            for key in f.keys():  # noqa: SIM118 (safe_open is no dict)
                tensors[key] = f.get_tensor(key)
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise AdapterFileError(
            f"{directory / WEIGHTS_NAME} is truncated or corrupted ({type(e).__name__}: {e}); "
            "save or download the adapter again"
        ) from None
    for key, tensor in tensors.items():
        _check_tensor(directory / WEIGHTS_NAME, key, tensor)
    return config, tensors, metadata


def read_config(path: Path) -> LoraConfig:
    """An `adapter_config.json`: UTF-8 JSON (nested no deeper than Python's recursion limit) of
    LoRA settings that `LoraConfig` accepts, or an AdapterFileError naming the file."""
    try:
        fields = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise AdapterFileError(f"{path} cannot be read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise AdapterFileError(
            f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save the adapter again"
        ) from None
    except RecursionError:
        raise AdapterFileError(
            f"{path} is nested too deep to be an adapter config; save the adapter again"
        ) from None
    except ValueError as e:  # JSONDecodeError, or an integer of thousands of digits
        raise AdapterFileError(f"{path} is not valid JSON ({e}); save the adapter again") from None
    if not isinstance(fields, dict):
        raise AdapterFileError(
            f"{path} is not a JSON object of LoRA settings (found a {type(fields).__name__}); "
            "save the adapter again"
        )
    try:
        return LoraConfig.from_dict(fields)
    except TypeError as e:
        raise AdapterFileError(f"{path} has a bad field: {e}") from None
    except LoraError as e:  # a value LoraConfig refuses: name the file that holds it
        raise AdapterFileError(f"{path}: {e}") from None


def _check_tensor(path: Path, key: str, tensor: torch.Tensor) -> None:
    """An adapter's tensors are finite floating-point numbers: an integer or bool tensor would
    be converted without a word, and one NaN spreads to every output."""
    if tensor.dtype not in FLOATING_POINT:
        kind = str(tensor.dtype).removeprefix("torch.")
        raise AdapterFileError(
            f"{path}: tensor {key} holds {kind} numbers; an adapter's tensors are floating point "
            "(float32, float16, bfloat16 or float64): save the adapter again"
        )
    if not bool(torch.isfinite(tensor).all()):
        raise AdapterFileError(
            f"{path}: tensor {key} is not finite (NaN or infinity); the training that made it "
            "diverged: train again (a lower learning rate) or use an earlier checkpoint"
        )


def load_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    adapter_name: str = "default",
    is_trainable: bool = False,
    files: tuple[LoraConfig, dict[str, torch.Tensor], dict] | None = None,
) -> nn.Module:
    """Loads an adapter saved by lorakit or PEFT into `model` (adding LoRA layers if needed);
    for inference (in eval mode, as PEFT does) unless `is_trainable`. `files`: what
    `read_adapter(directory)` gave, when the folder was read already."""
    config, tensors, metadata = files if files is not None else read_adapter(directory)
    if PISSA_NITER.fullmatch(str(config.init_lora_weights)):
        raise AdapterFileError(
            f"adapter {directory} was saved unconverted after init_lora_weights="
            f"{config.init_lora_weights!r}, whose randomized SVD cannot be rebuilt on the base; "
            "save it again with convert_to_lora=True (a plain LoRA adapter of the untouched base)"
        )
    config.inference_mode = not is_trainable
    recorded = metadata.get("base_fingerprint")
    if recorded:
        actual = base_fingerprint(model, config.with_task_head().saved, stored=tensors)
        if actual != recorded:
            warnings.warn(
                f"adapter {directory} was trained on a base model with fingerprint {recorded}, "
                f"but this model's weights have fingerprint {actual}; outputs may differ from "
                f"training (base recorded: {metadata.get('base_model') or 'unknown'})",
                FingerprintWarning,
                stacklevel=2,
            )
    fresh = not configs(model)
    if adapter_name in configs(model):
        raise LoraError(
            f"the model already has an adapter named {adapter_name!r}; "
            "load under another adapter_name or delete_adapter first"
        )
    add_adapter(model, adapter_name, config)
    expected = adapter_state_dict(model, adapter_name)
    tensors = _as_named_here(tensors, expected)
    extra_base = {k: v for k, v in tensors.items() if k not in expected}
    _check_and_copy(model, adapter_name, directory, expected, tensors, extra_base)
    if fresh:
        freeze_base(model)
    if is_trainable:
        mark_bias_trainable(model, config.bias)  # trained with the adapter, as in inject
    set_adapter(model, adapter_name)
    if not is_trainable:
        # new LoRA layers start in training mode, and their lora_dropout would be applied at
        # inference; PEFT's from_pretrained turns the model to eval mode so too
        model.eval()
    return model


def _as_named_here(tensors: dict, expected: dict) -> dict:
    """A base tensor's key has ".base_layer." where the saving model had a LoRA layer, whichever
    adapter put it there (a second adapter's bias="all" file names the first one's biases so, in
    PEFT and lorakit alike); such a tensor takes the key this model gives it."""
    plain = {key.replace(".base_layer.", "."): key for key in expected}
    named = {}
    for key, tensor in tensors.items():
        if key not in expected:
            key = plain.get(key.replace(".base_layer.", "."), key)
        named[key] = tensor
    return named


def _check_and_copy(model, adapter_name, directory, expected, tensors, extra_base) -> None:
    missing = [k for k in expected if k not in tensors]
    if missing:
        _undo(model, adapter_name)
        raise AdapterShapeError(
            f"adapter {directory} lacks {len(missing)} tensor(s) this model needs, first: "
            f"{missing[0]}; it was made for another model or other target_modules"
        )
    # PEFT may store full tensors of targeted embedding layers beside the adapter; a tied
    # lm_head's weight is listed under its own name only with remove_duplicate=False.
    model_params = dict(model.named_parameters(remove_duplicate=False))
    unknown = []
    for key in extra_base:
        name = _copy_name(key.removeprefix(PREFIX), adapter_name, model_params)
        name = name if name in model_params else name.replace(".weight", ".base_layer.weight")
        if name not in model_params:
            unknown.append(key)
        else:
            expected[key] = model_params[name]
    if unknown:
        targets = configs(model)[adapter_name].target_modules
        _undo(model, adapter_name)
        module = lora_tensor_module(unknown[0])
        if module is not None and module in dict(model.named_modules()):
            # e.g. PEFT's ensure_weight_tying: LoRA on a tied lm_head that its config leaves out
            raise AdapterShapeError(
                f"adapter {directory} has LoRA tensors for {module!r}, a module of this model "
                f"that its target_modules {targets!r} do not name, so lorakit cannot rebuild it; "
                "load it with PEFT (lora.engine=peft)"
            )
        raise AdapterShapeError(
            f"adapter {directory} has tensors this model lacks, first: {unknown[0]}; "
            "it was made for another model"
        )
    for key, target in expected.items():
        source = tensors[key]
        if tuple(source.shape) != tuple(target.shape):
            _undo(model, adapter_name)
            raise AdapterShapeError(
                f"adapter tensor {key} has shape {tuple(source.shape)} but this model needs "
                f"{tuple(target.shape)}: the adapter was made for a different base model "
                "(or another r / number of labels)"
            )
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(tensors[key].to(target.dtype))


def _copy_name(name: str, adapter_name: str, model_params: dict) -> str:
    """PEFT's bias="all" also writes a modules_to_save copy's bias: without the adapter's name
    for the saved module's own parameter ("classifier.modules_to_save.bias"), with the name PEFT
    saved it under for a nested one ("classifier.modules_to_save.default.dense.bias")."""
    if ".modules_to_save." not in name:
        return name
    head, _, rest = name.partition(".modules_to_save.")
    for tail in (rest, rest.partition(".")[2]):
        candidate = f"{head}.modules_to_save.{adapter_name}.{tail}"
        if candidate in model_params:
            return candidate
    return name


def _undo(model: nn.Module, adapter_name: str) -> None:
    if len(configs(model)) == 1:
        unload(model)
    else:
        delete_adapter(model, adapter_name)
