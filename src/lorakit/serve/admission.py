"""What an adapter must be before the server reads one tensor of it.

AdapterRoots    run-time loads (POST /v1/adapters) name folders under the operator's
                `--adapter-root`s, symlinks resolved: an adapter folder, a run directory or a
                folder `lorakit merge` wrote, every file of it under the root; anything else
                (outside, missing, not a folder, neither adapter_config.json nor merge.json)
                gets one message, so a client learns nothing of the server's disk. Adapters
                and merged folders given at startup (`--adapter`) are trusted.
AdapterLimits   rank, bytes and labels an adapter may have: checked from adapter_config.json
                and the safetensors header (names, shapes), before the weights are read; the
                bytes a merged model may have (`serve/merged.py` checks them).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from lorakit.lora import CONFIG_NAME, WEIGHTS_NAME
from lorakit.lora.adapter_files import PREFIX
from lorakit.recipes import MERGE_RECORD

from .errors import AdapterOverLimitError, NotAnAdapterError, ServeError

MAX_CONFIG_BYTES = 1 << 20  # adapter_config.json: a few KB in practice
RUN_FILES = ("summary.json", "config.toml")  # what a run directory adds to its adapter folder
MERGED_FILES = (MERGE_RECORD, "config.json", "model.safetensors")  # what a merged folder needs


@dataclass(frozen=True)
class AdapterLimits:
    """The most an adapter may bring: `lorakit serve --max-adapter-rank/-bytes/--max-labels`,
    and a merged model: `--max-merged-bytes`."""

    max_rank: int = 256  # r of every module (LoRA papers use 4-64, rsLoRA up to 2048)
    max_bytes: int = 256 * 2**20  # the weights file (a MiniLM adapter with its head: ~100 KB)
    max_labels: int = 1000  # classes of one adapter's head
    max_merged_bytes: int = 2 * 2**30  # a merged model's files and parameters (MiniLM: 90 MB)

    def __post_init__(self) -> None:
        for name in ("max_rank", "max_bytes", "max_labels", "max_merged_bytes"):
            if getattr(self, name) < 1:
                raise ServeError(f"{name} must be at least 1, got {getattr(self, name)}")

    def check_labels(self, count: int, what: str) -> None:
        if count > self.max_labels:
            raise AdapterOverLimitError(
                f"{what} has {count:,} labels; this server takes at most {self.max_labels:,} "
                "(lorakit serve --max-labels)"
            )


class AdapterRoots:
    """The folders run-time loads may come from (resolved once, at startup)."""

    def __init__(self, roots: Iterable[str | Path] = ()):
        self.roots = []
        for root in roots:
            resolved = Path(root).expanduser().resolve()
            if not resolved.is_dir():
                raise ServeError(f"--adapter-root {root}: not a folder")
            self.roots.append(resolved)

    def resolve(self, given: str) -> Path:
        """The adapter folder, run directory or merged folder that `given` names under a root: a
        path relative to a root (roots tried in order) or an absolute one inside a root."""
        for root in self.roots:
            folder = (root / given).resolve()
            if folder.is_relative_to(root) and (_loadable(folder, root) or _merged(folder, root)):
                return folder
        where = "the adapter roots" if self.roots else "an adapter root (this server has none)"
        raise NotAnAdapterError(f"{given!r} is not a loadable adapter under {where}")


def _loadable(folder: Path, root: Path) -> bool:
    """An adapter folder or run directory whose files are plain files under `root`."""
    if not folder.is_dir():
        return False
    adapter = folder / "adapter" if (folder / "adapter" / CONFIG_NAME).exists() else folder
    needed = [adapter / CONFIG_NAME, adapter / WEIGHTS_NAME]
    extra = [folder / name for name in RUN_FILES if adapter != folder]
    return all(_plain_file_under(f, root) for f in needed) and all(
        _plain_file_under(f, root) for f in extra if f.exists() or f.is_symlink()
    )


def _merged(folder: Path, root: Path) -> bool:
    """A folder `lorakit merge` wrote, whose every entry lies under `root` (its tokenizer
    files too: a link out of the root would be read as one)."""
    return (
        folder.is_dir()
        and all(_plain_file_under(folder / name, root) for name in MERGED_FILES)
        and all(entry.resolve().is_relative_to(root) for entry in folder.iterdir())
    )


def _plain_file_under(path: Path, root: Path) -> bool:
    resolved = path.resolve()
    return resolved.is_relative_to(root) and resolved.is_file()


def check_adapter_files(
    adapter_dir: Path, limits: AdapterLimits, base_shapes: dict[str, list[int]]
) -> dict[str, list[int]]:
    """Refuses an adapter over `limits`, reading no tensor; returns the shape of each tensor
    (from the safetensors header). `base_shapes`: the base model's parameters, whose sizes a
    head saved whole changes only in its label count. A file that cannot be read is left to
    `read_adapter`, whose errors say what is wrong with it."""
    config_file, weights = adapter_dir / CONFIG_NAME, adapter_dir / WEIGHTS_NAME
    for path, most, option in (
        (config_file, MAX_CONFIG_BYTES, None),
        (weights, limits.max_bytes, "--max-adapter-bytes"),
    ):
        size = path.stat().st_size if path.is_file() else 0
        if size > most:
            raise AdapterOverLimitError(
                f"{path.name} has {size:,} bytes; this server reads at most {most:,}"
                + (f" (lorakit serve {option})" if option else "")
            )
    try:
        fields = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    if isinstance(fields, dict):
        _check_ranks(fields, limits)
    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {key: f.get_slice(key).get_shape() for key in f.keys()}  # noqa: SIM118
    except Exception:  # safetensors' own error types; read_adapter names the problem
        return {}
    for key, shape in shapes.items():
        if (".lora_A." in key or ".lora_embedding_A." in key) and shape:
            _check_rank(shape[0], f"tensor {key}", limits)
        base = base_shapes.get(key.removeprefix(PREFIX).replace(".base_layer.", "."))
        if base and len(base) == len(shape) and shape[0] != base[0] and shape[1:] == base[1:]:
            limits.check_labels(shape[0], f"the adapter's head ({key.removeprefix(PREFIX)})")
    return shapes


def _check_ranks(fields: dict, limits: AdapterLimits) -> None:
    _check_rank(fields.get("r"), "r", limits)
    patterns = fields.get("rank_pattern")
    for r in patterns.values() if isinstance(patterns, dict) else ():
        _check_rank(r, "rank_pattern", limits)


def _check_rank(r, what: str, limits: AdapterLimits) -> None:
    if isinstance(r, int) and r > limits.max_rank:
        raise AdapterOverLimitError(
            f"the adapter's rank ({what}) is {r:,}; this server takes at most "
            f"{limits.max_rank:,} (lorakit serve --max-adapter-rank)"
        )
