"""`lorakit inspect`: what is inside a model or an adapter, before choosing `target_modules`.

```python
from lorakit.inspect import inspect, describe_model, describe_adapter
print(inspect("minilm"))            # a model: a folder, `minilm`, a hub id, a classic base folder
print(inspect("runs/x/adapter"))    # an adapter folder, or a run directory
```

For a model: the module tree with repeated layers collapsed
(``encoder.layer.{0-5}.attention.self.query  Linear(384->384)  x6``), the module names LoRA can
target grouped by layer type, and parameter counts (total and per top-level module). For an
adapter: its config, base model, base fingerprint (from the safetensors header), lorakit
version, tensor and parameter counts, and bytes on disk.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from rich import box
from rich.console import Console
from rich.table import Table
from torch import nn

from lorakit import lora
from lorakit.config import ConfigError
from lorakit.lora.layers import supported_types
from lorakit.models import loading_folder
from lorakit.rundir import read_run_summary

_INDEX = re.compile(r"^\d+$")


# ---------------------------------------------------------------- models
def layer_description(module: nn.Module) -> str:
    """``Linear(384->384)``, ``Embedding(30522x384)``, ``Conv1D(768->2304)``, ``LayerNorm(384)``."""
    kind = type(module).__name__
    if isinstance(module, nn.Linear):
        return f"Linear({module.in_features}->{module.out_features})"
    if isinstance(module, nn.Embedding):
        return f"Embedding({module.num_embeddings}x{module.embedding_dim})"
    if kind == "Conv1D" and hasattr(module, "nf"):  # GPT-2's: weight stored (in, out)
        return f"Conv1D({module.weight.shape[0]}->{module.nf})"
    if isinstance(module, nn.LayerNorm):
        return f"LayerNorm({', '.join(map(str, module.normalized_shape))})"
    return kind


def _slots(values: Iterable[int]) -> str:
    """``[0, 1, 2]`` -> ``{0-2}``; ``[0, 2]`` -> ``{0,2}``; ``[3]`` -> ``3``."""
    ordered = sorted(set(values))
    if len(ordered) == 1:
        return str(ordered[0])
    if ordered == list(range(ordered[0], ordered[-1] + 1)):
        return f"{{{ordered[0]}-{ordered[-1]}}}"
    return "{" + ",".join(map(str, ordered)) + "}"


def condense_names(names: Iterable[str]) -> list[tuple[str, list[str]]]:
    """Names that differ only in numeric parts, grouped: ``(pattern, [names])`` in order of
    first appearance, the numbers written as ranges (``encoder.layer.{0-5}.output.dense``)."""
    groups: dict[tuple[str | None, ...], list[str]] = {}
    for name in names:
        parts = name.split(".")
        template = tuple(None if _INDEX.match(p) else p for p in parts)
        groups.setdefault(template, []).append(name)
    condensed = []
    for template, members in groups.items():
        numbers = [
            [int(p) for p, t in zip(m.split("."), template, strict=True) if t is None]
            for m in members
        ]
        slots = iter([_slots(column) for column in zip(*numbers, strict=True)])
        pattern = ".".join(t if t is not None else next(slots) for t in template)
        condensed.append((pattern, members))
    return condensed


def _own_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters(recurse=False))


def describe_model(model: nn.Module) -> dict[str, Any]:
    """The model's condensed module tree, LoRA-targetable names and parameter counts."""
    with_weights = [(n, m) for n, m in model.named_modules() if n and _own_parameters(m)]
    by_kind: dict[tuple[str, str], list[str]] = {}
    for name, module in with_weights:
        template = ".".join("#" if _INDEX.match(p) else p for p in name.split("."))
        by_kind.setdefault((template, layer_description(module)), []).append(name)
    modules = dict(with_weights)
    tree = []
    for (_, layer), names in by_kind.items():
        for pattern, members in condense_names(names):
            tree.append({
                "name": pattern, "layer": layer, "count": len(members),
                "params": sum(_own_parameters(modules[m]) for m in members),
            })  # fmt: skip

    targetable: dict[str, dict[str, int]] = {}
    for name, module in model.named_modules():
        if name and isinstance(module, supported_types()):
            kind = layer_description(module).split("(")[0]
            leaf = name.rsplit(".", 1)[-1]
            targetable.setdefault(kind, {}).setdefault(leaf, 0)
            targetable[kind][leaf] += 1
    try:
        all_linear = len(lora.find_targets(model, lora.LoraConfig(target_modules=lora.ALL_LINEAR)))
    except lora.LoraError:
        all_linear = 0
    return {
        "class": type(model).__name__,
        "total_params": sum(p.numel() for p in model.parameters()),
        "top_level": {n: sum(p.numel() for p in m.parameters()) for n, m in model.named_children()},
        "tree": tree,
        "targetable": targetable,
        "all_linear_count": all_linear,
    }


def load_model_for_inspection(target: str) -> tuple[nn.Module, str]:
    """A model from a folder (transformers or classic), ``minilm``, ``tiny-gpt2``, ``smollm2``,
    a .gguf file or a hub id, and the folder or id it came from."""
    from lorakit.models.classic import is_classic, load_classic
    from lorakit.models.gguf import SMOLLM2, converted_folder, smollm2_gguf

    path = Path(target).expanduser()
    if path.is_dir() and is_classic(path):
        return load_classic(path)[0], str(path)
    if target == "tiny-gpt2":
        from lorakit.recipes.pretrain_tiny_gpt2 import ensure_tiny_gpt2

        target = str(ensure_tiny_gpt2())
    if target == SMOLLM2 or target.lower().endswith(".gguf"):  # converted once, then a folder
        target = str(converted_folder(smollm2_gguf() if target == SMOLLM2 else path))
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging as hf_logging

    from lorakit.models.transformer import resolve_model

    resolved = resolve_model(target)
    with loading_folder(resolved):
        config = AutoConfig.from_pretrained(resolved)
    import transformers

    architecture = (getattr(config, "architectures", None) or [None])[0]
    model_class = getattr(transformers, architecture or "", None) or AutoModel
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with loading_folder(resolved):
            return model_class.from_pretrained(resolved), resolved
    finally:
        hf_logging.set_verbosity(verbosity)


# ---------------------------------------------------------------- adapters
def describe_adapter(folder: str | Path) -> dict[str, Any]:
    """An adapter folder's config, base model, fingerprint, version, tensors and size."""
    folder = Path(folder)
    config, tensors, metadata = lora.read_adapter(folder)
    modules = {k: m for k in tensors if (m := lora.lora_tensor_module(k)) is not None}
    lora_modules = sorted(set(modules.values()))
    lora_params = sum(tensors[k].numel() for k in modules)
    return {
        "folder": str(folder),
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "scaling": config.lora_alpha / (config.r**0.5 if config.use_rslora else config.r),
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "target_modules": config.target_modules,
        "init_lora_weights": config.init_lora_weights,
        "modules_to_save": config.modules_to_save,
        "bias": config.bias,
        "task_type": config.task_type,
        "base_model": config.base_model_name_or_path or metadata.get("base_model") or None,
        "base_model_path": metadata.get("base_model_path") or None,
        "base_fingerprint": metadata.get("base_fingerprint"),
        "lorakit_version": metadata.get("lorakit_version"),
        "tensors": len(tensors),
        "params": sum(t.numel() for t in tensors.values()),
        "lora_params": lora_params,
        "saved_module_params": sum(t.numel() for t in tensors.values()) - lora_params,
        "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()}),
        "lora_modules": [pattern for pattern, _ in condense_names(lora_modules)],
        "bytes_on_disk": sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()),
    }


# ---------------------------------------------------------------- text
def _console() -> Console:
    # plain text: readable in a terminal and in a CI log alike
    return Console(file=io.StringIO(), width=110, color_system=None, highlight=False)


def _render(*items: Any) -> str:
    console = _console()
    for item in items:
        console.print(item, soft_wrap=isinstance(item, str))  # long paths stay on one line
    return "\n".join(line.rstrip() for line in console.file.getvalue().splitlines()) + "\n"


def _table(title: str, *columns: str, right: Iterable[str] = ()) -> Table:
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in columns:
        table.add_column(column, justify="right" if column in right else "left", overflow="fold")
    return table


def model_text(info: dict[str, Any], source: str) -> str:
    head = f"model: {info['class']}, {info['total_params']:,} parameters\nfrom: {source}"
    tree = _table("module tree (modules with weights; repeats collapsed)",
                  "module", "layer", "count", "params", right=("count", "params"))  # fmt: skip
    for row in info["tree"]:
        tree.add_row(row["name"], row["layer"], f"x{row['count']}", f"{row['params']:,}")
    targets = _table("names LoRA can target (lora.target_modules)",
                     "layer type", "names (count)")  # fmt: skip
    for kind, names in info["targetable"].items():
        targets.add_row(kind, ", ".join(f"{n} (x{c})" for n, c in names.items()))
    counts = _table("parameters", "top-level module", "params", "share", right=("params", "share"))
    total = info["total_params"] or 1
    for name, count in info["top_level"].items():
        counts.add_row(name, f"{count:,}", f"{100 * count / total:.1f}%")
    counts.add_row("total", f"{info['total_params']:,}", "100%")
    note = (f"'all-linear' would target {info['all_linear_count']} Linear/Conv1D modules "
            "(output heads left out). A name matches a module whose full name ends with it.")  # fmt: skip
    return _render(head, tree, targets, counts, note)


def adapter_text(info: dict[str, Any], run: dict[str, Any] | None = None) -> str:
    table = _table(f"adapter {info['folder']}", "field", "value")
    fingerprint = info["base_fingerprint"] or "not recorded (an adapter saved by PEFT has none)"
    fields = {
        "r": info["r"],
        "lora_alpha": f"{info['lora_alpha']:g} (scaling {info['scaling']:g})",
        "use_rslora": info["use_rslora"],
        "use_dora": info["use_dora"],
        "target_modules": info["target_modules"],
        "LoRA on": "\n".join(info["lora_modules"]) or "(none)",
        "modules_to_save": info["modules_to_save"] or "(none)",
        "bias": info["bias"],
        "init_lora_weights": info["init_lora_weights"],
        "task_type": info["task_type"] or "(none)",
        "base model": info["base_model"] or "unknown",
        "base model folder": info["base_model_path"] or "not recorded",
        "base fingerprint": fingerprint,
        "lorakit version": info["lorakit_version"] or "not recorded",
        "tensors": f"{info['tensors']} ({', '.join(info['dtypes'])})",
        "parameters": f"{info['params']:,} (LoRA {info['lora_params']:,}, "
        f"saved modules {info['saved_module_params']:,})",
        "bytes on disk": f"{info['bytes_on_disk']:,}",
    }
    for key, value in (run or {}).items():
        fields[f"run: {key}"] = value
    for key, value in fields.items():
        table.add_row(key, str(value))
    return _render(table)


def _run_facts(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "summary.json"
    if not path.is_file():
        return {"status": "unfinished (no summary.json)"}
    summary = read_run_summary(run_dir)
    keys = ("recipe", "task", "dataset", "engine", "test_accuracy", "test_perplexity")
    facts = {k: summary[k] for k in keys if summary.get(k) is not None}
    if summary.get("base_model") == "base":  # the classic recipe's own pretrained base
        facts["base model folder"] = f"{run_dir / 'base'} (inspect it for the module tree)"
    return facts


def inspect(target: str | Path) -> str:
    """A readable description of a model, an adapter folder or a run directory."""
    path = Path(target).expanduser()
    if path.is_dir() and (path / lora.CONFIG_NAME).is_file():
        return adapter_text(describe_adapter(path))
    if path.is_dir() and (path / "adapter" / lora.CONFIG_NAME).is_file():
        return adapter_text(describe_adapter(path / "adapter"), _run_facts(path))
    if path.is_dir() and not (path / "config.json").is_file():
        raise ConfigError(
            f"{path} is neither a model folder (config.json), an adapter folder "
            f"({lora.CONFIG_NAME}) nor a run directory (adapter/); give one of those, or "
            "'minilm'"
        )
    model, source = load_model_for_inspection(str(target))
    with torch.no_grad():
        return model_text(describe_model(model), source)
