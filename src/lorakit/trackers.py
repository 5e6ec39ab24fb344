"""Live experiment trackers beside ``metrics.jsonl``: TensorBoard when it is installed, wandb
when the config asks for it (``train.log_to``).

Every event a run logs (``RunDir.log``) also goes to each tracker, so lorakit's loop and the HF
``Trainer`` bridge report the same figures under the same names: ``train/loss``, ``train/lr``,
``validation/accuracy``, ``epoch/val_loss``, ``test/accuracy``, ... at the event's step.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from typing import Any

from lorakit.config import Config, ConfigError, to_toml

AUTO = "auto"
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
_NOT_FIGURES = {"step", "epoch", "time"}  # an event's coordinates, not what it measured


def resolve(log_to: list[str] | str) -> list[str]:
    """The trackers to start: ``"auto"`` is TensorBoard when installed, else none; a named one
    that is not installed is a ConfigError before any work."""
    if log_to == AUTO:
        return ["tensorboard"] if importlib.util.find_spec("tensorboard") else []
    for name in log_to:
        try:
            importlib.import_module(PACKAGES[name])
        except ImportError:
            raise ConfigError(
                f"train.log_to: {name!r} is not installed; pip install {PACKAGES[name]} "
                "(or drop it from train.log_to)"
            ) from None
    return list(dict.fromkeys(log_to))


def figures(record: dict[str, Any]) -> tuple[int | None, dict[str, float]]:
    """(step, {"<split or event>/<field>": value}) of one metrics.jsonl record."""
    prefix = record.get("split") or record["event"]
    values = {
        f"{prefix}/{key}": float(value)
        for key, value in record.items()
        if key not in _NOT_FIGURES
        and isinstance(value, (int, float))
        and not isinstance(value, bool)
    }
    step = record.get("step")
    return (int(step) if isinstance(step, (int, float)) else None), values


class Trackers:
    """The started trackers of one run; ``event`` sends them a record, ``finish`` closes them.

    torch's ``SummaryWriter`` and ``wandb`` are used directly: accelerate's tracker classes ask
    accelerate which process they are in, which set up its process state before the training
    loop did, so a data-parallel run trained unsharded in the main process.
    """

    def __init__(
        self, names: list[str], run_path: Path, config: Config, resumed_at: int | None = None
    ):
        """``resumed_at``: the step of the checkpoint a resumed run starts from; TensorBoard
        drops what the stopped run logged after it, as metrics.jsonl does."""
        self.writer = self.wandb_run = None
        self.last_step = resumed_at or 0
        try:
            if "tensorboard" in names:
                from torch.utils.tensorboard import SummaryWriter

                folder = run_path / "tensorboard"
                purge = None if resumed_at is None else resumed_at + 1
                self.writer = SummaryWriter(str(folder), purge_step=purge)
                if resumed_at is None:
                    self.writer.add_text("config", to_toml(config), 0)
                print(f"TensorBoard: tensorboard --logdir {folder}", flush=True)
            if "wandb" in names:
                import wandb

                self.wandb_run = wandb.init(
                    project=os.environ.get("WANDB_PROJECT", "lorakit"),
                    name=run_path.name,
                    dir=str(run_path),
                    config=config.model_dump(mode="json"),
                )
        except BaseException:
            self.finish()
            raise

    def event(self, record: dict[str, Any]) -> None:
        step, values = figures(record)
        # wandb drops a step below one it has seen; the test figures (logged at the best
        # step) are drawn at the end of training instead
        step = self.last_step = max(step or 0, self.last_step)
        if not values:
            return
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=step)

    def finish(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
        self.writer = self.wandb_run = None
