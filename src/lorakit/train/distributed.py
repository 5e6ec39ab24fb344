"""Data-parallel training in several processes, on torch.distributed's own launcher.

``lorakit train ... --processes N`` starts ``python -m torch.distributed.run --standalone
--nproc-per-node N -m lorakit.cli train ...`` (what ``torchrun`` runs); each process reads
``RANK`` / ``WORLD_SIZE`` from its environment, and accelerate sets up the process group (gloo on
CPU, NCCL on GPUs). ``accelerate launch -m lorakit.cli train ...`` and ``torchrun -m lorakit.cli
train ...`` do the same with the user's own launcher settings.

Only the main process (rank 0) writes the run directory; every other process works in a scratch
folder of its own, removed at its end, so the recipes stay unaware of how many processes run.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path


class DistributedError(RuntimeError):
    """The training processes did not finish; the message says how to see why."""


def world_size() -> int:
    """How many processes train together (1 outside a distributed launch)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank (0 outside a distributed launch)."""
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def launch_command(processes: int, train_args: Sequence[str]) -> list[str]:
    """The command that runs ``lorakit train *train_args`` in ``processes`` processes."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={processes}", "-m", "lorakit.cli", "train", *train_args,
    ]  # fmt: skip


def launch(processes: int, train_args: Sequence[str]) -> None:
    """Run ``lorakit train`` in ``processes`` processes on this machine; wait for them."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # N processes on N cores: one thread each
    done = subprocess.run(launch_command(processes, train_args), env=env, check=False)
    if done.returncode != 0:
        raise DistributedError(
            f"training in {processes} processes failed (exit code {done.returncode}); the "
            "failing process's error is printed above"
        )


@contextlib.contextmanager
def worker_scratch() -> Iterator[Path]:
    """A scratch run folder for a process other than the main one, its prints silenced."""
    with (
        tempfile.TemporaryDirectory(prefix=f"lorakit-rank{rank()}-") as folder,
        open(os.devnull, "w") as quiet,
        contextlib.redirect_stdout(quiet),
    ):
        yield Path(folder) / "run"
