"""Crash-safe training checkpoints: ``RUN_DIR/checkpoints/step-<N>/``.

A checkpoint holds everything the loop needs to continue as if it had never stopped:

``tensors.safetensors``
    ``model/<name>`` the trainable tensors, ``best/<name>`` those of the best evaluation,
    ``optimizer/<index>/<key>`` the optimizer's per-parameter state (AdamW's moments, step),
    ``rng/torch`` (and ``rng/cuda/<i>``) the torch RNG states, ``sampler/generator`` and
    ``sampler/torch`` the states at the start of the current epoch of the sampler's generator
    and of torch's global RNG (which orders a shuffle that has no generator of its own).
``state.json``
    the loop's position and counters (step, epoch, batches done in the epoch, running losses,
    best metrics, early-stopping counter, elapsed time, how much of ``metrics.jsonl`` was
    written), the optimizer's param groups, the scheduler's state, Python's and NumPy's RNG.

No pickle anywhere: tensors go through safetensors, everything else through JSON.

Writing is atomic: the files go to a hidden temporary folder next to the checkpoints, each
file is fsynced, the folder is renamed to ``step-<N>`` and the parent folder fsynced. A
``step-<N>`` folder is therefore always complete; a crash mid-write leaves only a ``.tmp-*``
folder, removed on the next write. The last ``keep`` checkpoints are kept. A write that fails
(disk full, permissions) removes its temporary folder, leaves the earlier checkpoints as they
were, and raises ``CheckpointError`` saying what failed and which checkpoint is still good:
training stops there rather than go on without the safety net the user asked for.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

TENSORS = "tensors.safetensors"
STATE = "state.json"
FORMAT = 1
_STEP_FOLDER = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message says which and what to do."""


@dataclass
class Checkpoint:
    """A checkpoint read back: its folder, tensors by group, and its JSON state."""

    path: Path
    tensors: dict[str, dict[str, torch.Tensor]]
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])


# ---------------------------------------------------------------- finding checkpoints


def checkpoint_steps(directory: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for child in directory.iterdir():
        match = _STEP_FOLDER.match(child.name)
        if match and (child / STATE).is_file() and (child / TENSORS).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def checkpoint_step(folder: str | Path) -> int:
    """The optimizer step a checkpoint folder (``step-<N>``) was written at."""
    match = _STEP_FOLDER.match(Path(folder).name)
    if match is None:
        raise ValueError(f"{folder} is not a checkpoint folder (step-<N>)")
    return int(match.group(1))


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest complete checkpoint folder in ``directory``, or None."""
    found = checkpoint_steps(directory)
    return found[-1][1] if found else None


# ---------------------------------------------------------------- RNG, optimizer, scheduler


def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The process's RNG states: torch (and CUDA) as tensors, Python and NumPy as JSON."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda/{i}"] = state
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    scalars = {
        "python": [version, list(internal), gauss_next],
        "numpy": [kind, keys.tolist(), position, has_gauss, gauss],
    }
    return tensors, scalars


def restore_rng(tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> None:
    """Put back what ``capture_rng`` took."""
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda/{i}"] for i in range(len(tensors)) if f"cuda/{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss_next = scalars["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, position, has_gauss, gauss = scalars["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, gauss))


def split_optimizer_state(
    state_dict: dict[str, Any],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer's state dict as tensors (``<index>/<key>``) plus JSON (param groups and
    any non-tensor per-parameter values)."""
    tensors, scalars = {}, {}
    for index, values in state_dict["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}/{key}"] = value
            else:
                scalars[f"{index}/{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def join_optimizer_state(tensors: dict[str, torch.Tensor], saved: dict[str, Any]) -> dict:
    """The inverse of ``split_optimizer_state``."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in [*tensors.items(), *saved["scalars"].items()]:
        index, key = name.split("/", 1)
        state.setdefault(int(index), {})[key] = value
    groups = [
        {k: tuple(v) if k == "betas" else v for k, v in group.items()}
        for group in saved["param_groups"]
    ]
    return {"state": state, "param_groups": groups}


# ---------------------------------------------------------------- writing and reading


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(
    directory: str | Path,
    step: int,
    groups: dict[str, dict[str, torch.Tensor]],
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write ``directory/step-<step>`` atomically; keep the newest ``keep``; return the folder.

    ``groups`` maps a group name (``model``, ``best``, ``optimizer``, ``rng``, ...) to tensors.
    """
    directory = Path(directory)
    final = directory / f"step-{step}"
    tmp: Path | None = None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob(".tmp-*"):  # left by a crash in the middle of a write
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=directory, prefix=f".tmp-step-{step}-"))
        flat = {
            f"{group}/{name}": tensor.detach().cpu().contiguous().clone()
            for group, tensors in groups.items()
            for name, tensor in tensors.items()
        }
        save_file(flat, str(tmp / TENSORS), metadata={"format": "pt"})
        _fsync(tmp / TENSORS)
        with open(tmp / STATE, "w", encoding="utf-8") as handle:
            json.dump({"format": FORMAT, "step": step, **state}, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        _fsync(tmp)
        if final.exists():  # the same step written again: swap, so one always exists
            aside = directory / f".tmp-replaced-step-{step}"
            os.replace(final, aside)
            os.replace(tmp, final)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync(directory)
    except (OSError, SafetensorError) as err:  # safetensors reports a full disk as its own error
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(directory)
        kept = (
            f"the previous checkpoint {previous} is intact; "
            if previous is not None
            else "there is no earlier checkpoint; "
        )
        raise CheckpointError(
            f"could not write checkpoint step-{step} in {directory}: {err}. Training stopped; "
            f"{kept}free space (or fix the folder's permissions) and continue with "
            f"`lorakit train --resume {directory.parent}`"
        ) from err
    for _, old in checkpoint_steps(directory)[: -max(keep, 1)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint folder written by ``write_checkpoint``."""
    path = Path(path)
    try:
        state = json.loads((path / STATE).read_text(encoding="utf-8"))
        flat = load_file(str(path / TENSORS))
    except (OSError, ValueError, SafetensorError) as err:
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({err}); delete that folder to resume from the "
            "one before it"
        ) from err
    if state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {state.get('format')!r}, not 1")
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        group, name = key.split("/", 1)
        tensors.setdefault(group, {})[name] = value
    return Checkpoint(path=path, tensors=tensors, state=state)
