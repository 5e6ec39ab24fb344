"""The training loop every pipeline shares, on ``accelerate.Accelerator``.

Model contract (as transformers models): ``model(**batch)`` returns an object with ``.logits``,
and ``.loss`` when the batch holds ``labels``. The loop trains only parameters that require
grad (AdamW), with linear warmup and decay, gradient clipping and accumulation; it evaluates every
``eval_every`` optimizer steps and at each epoch's end, keeps a copy of the best evaluation's
trainable weights (``lorakit.train.best``), stops early after ``early_stopping_patience``
evaluations without improvement, and logs every event to the run directory's ``metrics.jsonl``.
It returns the model holding the best weights.

The loop reads top to bottom in ``_Trainer.train``; its state is explicit: ``TrainState``
(where the loop is, and the best evaluation) and ``RunningLoss`` (the losses being averaged).

Given a ``checkpoint_dir`` it writes a checkpoint every ``checkpoint_every`` optimizer steps
(``lorakit.train.checkpoint``); given ``resume`` (a checkpoint folder) it restores the model,
optimizer, scheduler, RNG states and data position and continues as if it had never stopped.

Under several processes (``torchrun``, ``accelerate launch``, ``lorakit train --processes N``)
``batch_size`` stays the global batch: accelerate splits each batch among the processes
(``split_batches``), so the number of steps, the schedule and the logged step numbers are
those of one process. Losses and evaluations are reduced over all processes; only the main
process writes checkpoints. Each process logs to the ``run_dir`` it is given; ``lorakit.api``
gives every process but the main one a scratch folder.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from lorakit.config import ConfigError, TrainConfig
from lorakit.nn.checkpointing import (
    CheckpointingUnsupported,
    checkpointable_models,
    gradient_checkpointing,
)
from lorakit.nn.fast_dropout import fast_dropout
from lorakit.nn.frozen_base import bf16_frozen_base
from lorakit.rundir import RunDir
from lorakit.train import checkpoint as ckpt
from lorakit.train.best import BestEvaluation, load_into, trainable_tensors
from lorakit.train.metrics import evaluate

# (model, eval_loader, accelerator) -> figures; the float ones are logged, `metric` among them
EvaluateFn = Callable[[torch.nn.Module, Iterable, Accelerator], dict[str, Any]]
LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]


def model_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's own loss of a batch that holds its labels (transformers models)."""
    return model(**batch).loss


@dataclass
class TrainResult:
    best_step: int
    best_metrics: dict[str, float]
    steps: int
    train_seconds: float
    stopped_early: bool
    history: list[dict[str, Any]] = field(default_factory=list)


def make_accelerator(train: TrainConfig) -> Accelerator:
    # accelerate keeps one process-wide state and refuses a second Accelerator with other
    # settings; runs in one process (comparison tables, sweeps, tests) each get a fresh one.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision="bf16" if train.use_bf16 else "no",
        gradient_accumulation_steps=train.grad_accum_steps,
        # the global batch is `batch_size` whatever the number of processes. DDP needs no
        # find_unused_parameters: frozen weights (a modules_to_save head's original included)
        # are outside its reducer, and every LoRA and head tensor gets a gradient each step.
        dataloader_config=DataLoaderConfiguration(split_batches=True),
    )


class _Progress:
    """tqdm on a terminal; plain periodic lines otherwise (CI logs)."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.tty = enabled and sys.stdout.isatty()
        self.enabled, self.total, self.desc = enabled, total, desc
        self.bar = tqdm(total=total, desc=desc, file=sys.stdout) if self.tty else None

    def update(self, step: int, lr: float, loss: float | None = None, window: int = 0) -> None:
        """One optimizer step done. ``loss``, when given, is the mean over the last ``window``
        steps (what metrics.jsonl logs as ``loss``), and is shown saying so."""
        if loss is None:
            if self.bar is not None:
                self.bar.update(1)
            return
        mean = f"{loss:.4g} (mean of the last {window} steps)"
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"loss {mean}, lr {lr:.4g}", refresh=False)
        elif self.enabled:
            print(f"{self.desc}: step {step}/{self.total} loss {mean} lr {lr:.4g}", flush=True)

    def skip_to(self, step: int) -> None:
        """Start the bar at ``step`` (a resumed run)."""
        if self.bar is not None:
            self.bar.update(step)

    def note(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class TrainState:
    """Where the loop is. With the running losses, all that a checkpoint saves besides tensors
    (its ``position``)."""

    best: BestEvaluation
    step: int = 0  # optimizer steps
    epoch: int = 0
    batches_done: int = 0  # batches of `epoch` already trained
    last_eval_step: int = -1  # the step of the epoch's latest evaluation
    figures: dict[str, float] = field(default_factory=dict)  # and its figures

    def start_epoch(self, epoch: int) -> None:
        self.epoch, self.batches_done, self.last_eval_step, self.figures = epoch, 0, -1, {}

    def position(self, losses: RunningLoss) -> dict[str, Any]:
        """The checkpoint's ``position``."""
        return {
            "step": self.step, "epoch": self.epoch, "batches_done": self.batches_done,
            **asdict(losses),
            "last_eval_step": self.last_eval_step, "figures": self.figures,
            "best_step": self.best.step, "best_value": self.best.value,
            "best_metrics": self.best.metrics, "bad_evals": self.best.bad_evals,
            "stop": self.best.should_stop,
        }  # fmt: skip

    @classmethod
    def from_position(cls, position: dict[str, Any], best: BestEvaluation) -> TrainState:
        """The state a checkpoint's ``position`` holds; ``best`` says the metric and patience."""
        best = replace(
            best, step=position["best_step"], value=position["best_value"],
            metrics=position["best_metrics"], bad_evals=position["bad_evals"],
        )  # fmt: skip
        names = ("step", "epoch", "batches_done", "last_eval_step", "figures")
        return cls(best, **{name: position[name] for name in names})


@dataclass
class RunningLoss:
    """Sums of the batch losses since the epoch began and since the last ``train`` event."""

    epoch_loss: float = 0.0
    epoch_batches: int = 0
    log_loss: float = 0.0
    log_batches: int = 0

    def add(self, loss: float) -> None:
        self.epoch_loss, self.epoch_batches = self.epoch_loss + loss, self.epoch_batches + 1
        self.log_loss, self.log_batches = self.log_loss + loss, self.log_batches + 1

    def epoch_mean(self) -> float:
        return self.epoch_loss / max(self.epoch_batches, 1)

    def log_mean(self) -> float:
        """The mean since the last ``take_log_mean``."""
        return self.log_loss / max(self.log_batches, 1)

    def take_log_mean(self) -> float:
        """The mean since the last call, which starts the next window."""
        mean = self.log_mean()
        self.log_loss, self.log_batches = 0.0, 0
        return mean

    @classmethod
    def from_position(cls, position: dict[str, Any]) -> RunningLoss:
        return cls(**{f.name: position[f.name] for f in fields(cls)})


def _sampler_generator(loader: torch.utils.data.DataLoader) -> torch.Generator | None:
    """The generator that orders the training batches (shuffle or length-grouped sampler)."""
    sampler = getattr(loader, "sampler", None)
    return getattr(sampler, "generator", None) or getattr(loader, "generator", None)


def _check_fits(saved: dict[str, torch.Tensor], params: dict[str, torch.nn.Parameter], where):
    if set(saved) != set(params) or any(saved[n].shape != params[n].shape for n in saved):
        raise ckpt.CheckpointError(
            f"checkpoint {where} does not fit this model (its trainable tensors differ); "
            "resume with the run's own config.toml, unchanged"
        )


def _truncate_metrics(run_dir: RunDir | None, size: int) -> None:
    """Drop what was logged after the checkpoint, so each step is logged once."""
    path = None if run_dir is None else run_dir.path / "metrics.jsonl"
    if path is not None and path.exists() and path.stat().st_size > size:
        with open(path, "r+b") as handle:
            handle.truncate(size)


def _check_global_batches(config: TrainConfig, processes: int) -> None:
    for name in ("batch_size", "eval_batch_size"):
        if getattr(config, name) % processes:
            raise ConfigError(
                f"train.{name}: {getattr(config, name)} cannot be split among {processes} "
                f"processes; it is the global batch, so make it a multiple of {processes}"
            )


def parameter_groups(model: torch.nn.Module, lr: float, lora_plus_ratio: float = 1.0) -> list[dict]:
    """The optimizer's parameter groups: every trainable parameter at ``lr``, except, for LoRA+
    (``lora_plus_ratio`` > 1), the B matrices at ``lr * lora_plus_ratio``. B maps the rank-r code
    to the layer's full width, and LoRA+ shows that with one lr it learns too slowly."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters")
    if lora_plus_ratio == 1:
        return [{"params": [p for _, p in named], "lr": lr}]
    is_b = [".lora_B." in name or ".lora_embedding_B." in name for name, _ in named]
    if not any(is_b):
        raise ConfigError(
            f"train.lora_plus_ratio: {lora_plus_ratio} needs LoRA B matrices to train, and this "
            "model has none; set train.lora_plus_ratio = 1"
        )
    return [
        {"params": [p for (_, p), b in zip(named, is_b, strict=True) if not b], "lr": lr},
        {"params": [p for (_, p), b in zip(named, is_b, strict=True) if b],
         "lr": lr * lora_plus_ratio},
    ]  # fmt: skip


def checkpointing_of(model: torch.nn.Module, config: TrainConfig) -> AbstractContextManager:
    """``train.gradient_checkpointing`` for the length of training (both trainers); a model that
    cannot is a ConfigError before anything trains."""
    if not config.gradient_checkpointing:
        return nullcontext()
    try:
        checkpointable_models(model)
    except CheckpointingUnsupported as err:
        raise ConfigError(
            f"train.gradient_checkpointing: {err}; set train.gradient_checkpointing = false"
        ) from None
    return gradient_checkpointing(model)


def planned_steps(batches_per_epoch: int, config: TrainConfig) -> tuple[int, int]:
    """(optimizer steps per epoch, steps in all) of a run whose epoch is ``batches_per_epoch``
    training batches: one step per ``grad_accum_steps`` batches, ``max_steps`` at most."""
    per_epoch = math.ceil(batches_per_epoch / config.grad_accum_steps)
    total = per_epoch * config.epochs
    return per_epoch, min(total, config.max_steps) if config.max_steps else total


def train_loop(
    model: torch.nn.Module,
    train_loader: torch.utils.data.DataLoader,
    eval_loader: torch.utils.data.DataLoader,
    config: TrainConfig,
    *,
    run_dir: RunDir | None = None,
    seed: int | None = None,
    metric: str = "accuracy",
    desc: str = "train",
    show_progress: bool = True,
    checkpoint_dir: str | Path | None = None,
    resume: str | Path | None = None,
    evaluate_fn: EvaluateFn | None = None,
    loss_fn: LossFn | None = None,
) -> TrainResult:
    """Train ``model`` in place and leave it holding the weights of its best evaluation.

    ``metric`` is maximised (``accuracy``), or minimised when it is ``loss``/``perplexity``.
    ``checkpoint_dir``: where to write checkpoints (every ``config.checkpoint_every`` steps);
    ``resume``: a checkpoint folder to continue from (the same model, data and config).
    ``evaluate_fn``: the validation figures (default: classification ``evaluate``).
    ``loss_fn(model, batch)``: the training loss (default: the model's own, ``model(**batch).loss``).
    """
    if seed is not None:
        set_seed(seed)
    checkpointing = checkpointing_of(model, config)
    trainer = _Trainer(
        model, train_loader, eval_loader, config, run_dir=run_dir, metric=metric,
        evaluate_fn=evaluate_fn or evaluate, checkpoint_dir=checkpoint_dir, desc=desc,
        show_progress=show_progress, loss_fn=loss_fn or model_loss,
    )  # fmt: skip
    if resume is not None:
        trainer.resume(resume)
    # for the loop only: under bf16 the frozen base is held in bf16 (lorakit.nn.frozen_base);
    # dropout masks come from a fast generator (lorakit.nn.fast_dropout); blocks recompute
    # their activations in the backward pass (lorakit.nn.checkpointing)
    with (
        bf16_frozen_base(trainer.unwrapped) if config.use_bf16 else nullcontext(),
        fast_dropout(trainer.unwrapped) if config.fast_dropout else nullcontext(),
        checkpointing,
    ):
        trainer.train()
    return trainer.finish()


class _Trainer:
    """One run of the loop: its parts, prepared by accelerate, and its state. ``train`` is the
    loop; the other methods are its steps."""

    def __init__(self, model, train_loader, eval_loader, config: TrainConfig, *, run_dir,
                 metric, evaluate_fn, checkpoint_dir, desc, show_progress, loss_fn):  # fmt: skip
        self.config, self.run_dir, self.evaluate_fn = config, run_dir, evaluate_fn
        self.loss_fn = loss_fn
        self.accelerator = make_accelerator(config)
        _check_global_batches(config, self.accelerator.num_processes)
        groups = parameter_groups(model, config.lr, config.lora_plus_ratio)
        self.params = [p for group in groups for p in group["params"]]
        optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
        self.steps_per_epoch, self.total = planned_steps(len(train_loader), config)
        scheduler = get_linear_schedule_with_warmup(
            optimizer, round(config.warmup_ratio * self.total), max(self.total, 1)
        )
        self.generator = _sampler_generator(train_loader)
        self.model, self.optimizer, self.train_loader, self.eval_loader, self.scheduler = (
            self.accelerator.prepare(model, optimizer, train_loader, eval_loader, scheduler)
        )
        self.unwrapped = self.accelerator.unwrap_model(self.model)
        # only the main process writes checkpoints; 0: none
        writes = checkpoint_dir is not None and self.accelerator.is_main_process
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_every = config.checkpoint_every if writes else 0
        self.state = TrainState(BestEvaluation(metric, config.early_stopping_patience))
        self.losses = RunningLoss()
        self.epoch_start: dict[str, torch.Tensor] = {}  # what decides the epoch's batch order
        self.restored: ckpt.Checkpoint | None = None  # until the resumed epoch has started
        self.history: list[dict[str, Any]] = []
        self.progress = _Progress(self.total, desc, show_progress)
        self.started = time.monotonic()

    @property
    def finished(self) -> bool:
        return self.state.best.should_stop or self.state.step >= self.total

    def train(self) -> None:
        """Epochs of optimizer steps, with logs, evaluations and checkpoints on the way."""
        self.model.train()
        for epoch in range(self.state.epoch, self.config.epochs):
            for batch in self.epoch_batches(epoch):
                loss = self.train_step(batch)
                self.losses.add(loss)
                self.state.batches_done += 1
                if not self.accelerator.sync_gradients:
                    continue  # accumulating: the optimizer steps every grad_accum_steps batches
                self.state.step += 1
                self.after_step()
                if self.finished:
                    break
                if self.checkpoint_every and self.state.step % self.checkpoint_every == 0:
                    self.save_checkpoint()
            self.end_epoch()
            if self.finished:
                break

    def epoch_batches(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        """The epoch's batches; a resumed epoch in the same order, from where it stopped."""
        restored, self.restored = self.restored, None
        if restored is None:
            self.state.start_epoch(epoch)
            self.losses = RunningLoss()
        else:  # a sampler without its own generator draws its order from torch's global RNG
            torch.set_rng_state(restored.tensors["sampler"]["torch"])
            if self.generator is not None:
                self.generator.set_state(restored.tensors["sampler"]["generator"])
        self.epoch_start = {"torch": torch.get_rng_state()}
        if self.generator is not None:
            self.epoch_start["generator"] = self.generator.get_state()
        batches = iter(self.train_loader)
        if restored is not None:
            for _ in range(self.state.batches_done):  # replayed up to the checkpoint
                next(batches, None)
            self.accelerator.step = self.state.batches_done
            # dropout and everything else random continue exactly where they stopped
            ckpt.restore_rng(restored.tensors["rng"], restored.state["rng"])
        return batches

    def train_step(self, batch: dict[str, torch.Tensor]) -> float:
        """Forward and backward; the optimizer steps once the accumulated batches are in."""
        with self.accelerator.accumulate(self.model):
            loss = self.loss_fn(self.model, batch)
            self.accelerator.backward(loss)
            if self.accelerator.sync_gradients and self.config.max_grad_norm > 0:
                self.accelerator.clip_grad_norm_(self.params, self.config.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad()
        return float(loss.detach())

    def after_step(self) -> None:
        step, lr = self.state.step, self.scheduler.get_last_lr()[0]
        every = self.config.log_every
        window = step % every or every  # the steps since the last logged one
        if step % every == 0:
            loss = self.mean_over_processes(self.losses.take_log_mean())
            self.log("train", loss=loss, lr=lr)
            self.progress.update(step, lr, loss, window)
        elif step == self.total:  # the last step shows the steps since the last log
            self.progress.update(step, lr, self.mean_over_processes(self.losses.log_mean()), window)
        else:
            self.progress.update(step, lr)
        if self.config.eval_every and step % self.config.eval_every == 0:
            self.evaluate()

    def end_epoch(self) -> None:
        if self.state.last_eval_step != self.state.step:
            self.evaluate()
        val = {f"val_{k}": v for k, v in self.state.figures.items()}
        self.log("epoch", train_loss=self.mean_over_processes(self.losses.epoch_mean()), **val)

    def evaluate(self) -> None:
        """Log the validation figures; keep the weights when they are the best."""
        result = self.evaluate_fn(self.model, self.eval_loader, self.accelerator)
        figures = {k: v for k, v in result.items() if isinstance(v, float)}
        self.log("eval", split="validation", **figures)
        self.state.best.update(self.unwrapped, self.state.step, figures)
        self.state.figures, self.state.last_eval_step = figures, self.state.step
        shown = " ".join(f"val_{k} {v:.4f}" for k, v in figures.items())
        self.progress.note(f"{self.progress.desc}: step {self.state.step} {shown}")

    def log(self, event: str, **values: Any) -> None:
        record = {
            "step": self.state.step,
            "epoch": round(self.state.step / self.steps_per_epoch, 4),
            "time": round(time.monotonic() - self.started, 3),
            **values,
        }
        self.history.append({"event": event, **record})
        # each process logs to its own run_dir: lorakit.api gives workers a scratch one
        if self.run_dir is not None:
            self.run_dir.log(event, **record)

    def mean_over_processes(self, value: float) -> float:
        if self.accelerator.num_processes == 1:
            return value
        tensor = torch.tensor([value], device=self.accelerator.device)
        return float(self.accelerator.reduce(tensor, "mean"))

    def save_checkpoint(self) -> None:
        rng_tensors, rng_scalars = ckpt.capture_rng()
        optimizer_tensors, optimizer_json = ckpt.split_optimizer_state(self.optimizer.state_dict())
        groups = {
            "model": trainable_tensors(self.unwrapped),
            "best": self.state.best.weights,
            "optimizer": optimizer_tensors,
            "rng": rng_tensors,
            "sampler": self.epoch_start,
        }
        metrics = None if self.run_dir is None else self.run_dir.path / "metrics.jsonl"
        state = {
            "position": self.state.position(self.losses),
            "optimizer": optimizer_json,
            "scheduler": self.scheduler.scheduler.state_dict(),
            "rng": rng_scalars,
            "elapsed": time.monotonic() - self.started,
            "metrics_bytes": metrics.stat().st_size if metrics and metrics.exists() else 0,
            "processes": self.accelerator.num_processes,
        }
        keep = self.config.keep_checkpoints
        ckpt.write_checkpoint(self.checkpoint_dir, self.state.step, groups, state, keep)

    def resume(self, folder: str | Path) -> None:
        """Continue from a checkpoint: weights, optimizer, schedule, position, best, log."""
        restored = ckpt.read_checkpoint(folder)
        trainable = trainable_tensors(self.unwrapped)
        _check_fits(restored.tensors["model"], trainable, restored.path)
        load_into(self.unwrapped, restored.tensors["model"])
        saved = restored.state
        self.optimizer.load_state_dict(
            ckpt.join_optimizer_state(restored.tensors.get("optimizer", {}), saved["optimizer"])
        )
        self.scheduler.scheduler.load_state_dict(saved["scheduler"])
        self.state = TrainState.from_position(saved["position"], self.state.best)
        self.state.best.weights = restored.tensors.get("best", {})
        self.losses = RunningLoss.from_position(saved["position"])
        _truncate_metrics(self.run_dir, saved["metrics_bytes"])
        if self.run_dir is not None:
            self.history = self.run_dir.read_metrics()
        self.started -= saved["elapsed"]
        self.progress.skip_to(self.state.step)
        self.progress.note(f"{self.progress.desc}: resuming from step {self.state.step} of "
                           f"{self.total}")  # fmt: skip
        self.restored = restored

    def finish(self) -> TrainResult:
        """Close the progress bar, take the model out of accelerate, put the best weights back."""
        self.progress.close()
        self.accelerator.unwrap_model(self.model, keep_fp32_wrapper=False)  # the bf16 autocast
        self.state.best.restore(self.unwrapped)
        return TrainResult(
            best_step=self.state.best.step,
            best_metrics=self.state.best.metrics,
            steps=self.state.step,
            train_seconds=round(time.monotonic() - self.started, 3),
            # early only when steps were left: patience running out at the last evaluation is
            # the end of the planned run, not a stop
            stopped_early=self.state.best.should_stop and self.state.step < self.total,
            history=self.history,
        )
