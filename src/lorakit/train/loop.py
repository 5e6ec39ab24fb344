"""The training loop every pipeline shares, on ``accelerate.Accelerator``.

Model contract (as transformers models): ``model(**batch)`` returns an object with ``.logits``,
and ``.loss`` when the batch holds ``labels``. The loop trains only parameters that require
grad (AdamW), with linear warmup and decay, gradient clipping and accumulation; it evaluates every
``eval_every`` optimizer steps and at each epoch's end, hands the best model to the recipe's
``save_best(model, step)``, stops early after ``early_stopping_patience`` evaluations without
improvement, and logs every event to the run directory's ``metrics.jsonl``.

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
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from lorakit.config import ConfigError, TrainConfig
from lorakit.nn.fast_dropout import fast_dropout
from lorakit.nn.frozen_base import bf16_frozen_base
from lorakit.rundir import RunDir
from lorakit.train import checkpoint as ckpt

SaveBest = Callable[[torch.nn.Module, int], None]
# (model, eval_loader, accelerator) -> figures; the float ones are logged, `metric` among them
EvaluateFn = Callable[[torch.nn.Module, Iterable, Accelerator], dict[str, Any]]


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


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: Iterable[dict[str, torch.Tensor]],
    accelerator: Accelerator | None = None,
) -> dict[str, Any]:
    """Classification loss and accuracy over a loader, with every prediction and label.

    With an ``accelerator`` running several processes, each evaluates its shard and the
    figures cover the whole split (``gather_for_metrics`` drops the padding duplicates)."""
    if accelerator is not None and accelerator.num_processes > 1:
        return _evaluate_gathered(model, loader, accelerator)
    was_training = model.training
    model.eval()
    total_loss, count, predictions, labels = 0.0, 0, [], []
    device = next(model.parameters()).device
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model(**batch)
        size = len(batch["labels"])
        total_loss += float(out.loss) * size
        count += size
        predictions += out.logits.argmax(-1).tolist()
        labels += batch["labels"].tolist()
    model.train(was_training)
    if count == 0:
        raise ValueError("evaluation split is empty")
    accuracy = sum(p == t for p, t in zip(predictions, labels, strict=True)) / count
    return {
        "loss": total_loss / count,
        "accuracy": accuracy,
        "predictions": predictions,
        "labels": labels,
    }


def _evaluate_gathered(model, loader, accelerator: Accelerator) -> dict[str, Any]:
    was_training = model.training
    model.eval()
    losses, predictions, labels = [], [], []
    for batch in loader:
        logits = model(**batch).logits.float()
        loss = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
        gathered = accelerator.gather_for_metrics((loss, logits.argmax(-1), batch["labels"]))
        for kept, part in zip((losses, predictions, labels), gathered, strict=True):
            kept.append(part.cpu())
    model.train(was_training)
    if not losses:
        raise ValueError("evaluation split is empty")
    loss, predicted, truth = (torch.cat(parts) for parts in (losses, predictions, labels))
    return {
        "loss": float(loss.mean()),
        "accuracy": float((predicted == truth).float().mean()),
        "predictions": predicted.tolist(),
        "labels": truth.tolist(),
    }


class _Progress:
    """tqdm on a terminal; plain periodic lines otherwise (CI logs)."""

    def __init__(self, total: int, desc: str, every: int, enabled: bool):
        self.tty = enabled and sys.stdout.isatty()
        self.enabled, self.every, self.total, self.desc = enabled, every, total, desc
        self.bar = tqdm(total=total, desc=desc, file=sys.stdout) if self.tty else None

    def update(self, step: int, **shown: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
        elif self.enabled and (step % self.every == 0 or step == self.total):
            figures = " ".join(f"{k} {v:.4g}" for k, v in shown.items())
            print(f"{self.desc}: step {step}/{self.total} {figures}", flush=True)

    def note(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class _Position:
    """Where the loop is and what it has counted: all a checkpoint needs besides tensors."""

    step: int = 0
    epoch: int = 0
    batches_done: int = 0  # batches of `epoch` already trained
    epoch_loss: float = 0.0
    epoch_batches: int = 0
    log_loss: float = 0.0
    log_batches: int = 0
    last_eval_step: int = -1
    figures: dict[str, float] = field(default_factory=dict)
    best_step: int = 0
    best_value: float = math.nan
    best_metrics: dict[str, float] = field(default_factory=dict)
    bad_evals: int = 0
    stop: bool = False

    def start_epoch(self, epoch: int) -> None:
        self.epoch, self.batches_done = epoch, 0
        self.epoch_loss, self.epoch_batches, self.log_loss, self.log_batches = 0.0, 0, 0.0, 0
        self.last_eval_step, self.figures = -1, {}


def _sampler_generator(loader: torch.utils.data.DataLoader) -> torch.Generator | None:
    """The generator that orders the training batches (shuffle or length-grouped sampler)."""
    sampler = getattr(loader, "sampler", None)
    return getattr(sampler, "generator", None) or getattr(loader, "generator", None)


def _trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _copy_into(params: dict[str, torch.nn.Parameter], values: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, value in values.items():
            params[name].copy_(value)


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


def train_loop(
    model: torch.nn.Module,
    train_loader: torch.utils.data.DataLoader,
    eval_loader: torch.utils.data.DataLoader,
    config: TrainConfig,
    *,
    run_dir: RunDir | None = None,
    save_best: SaveBest | None = None,
    seed: int | None = None,
    metric: str = "accuracy",
    desc: str = "train",
    show_progress: bool = True,
    checkpoint_dir: str | Path | None = None,
    resume: str | Path | None = None,
    evaluate_fn: EvaluateFn | None = None,
) -> TrainResult:
    """Train ``model`` in place; return the best evaluation and where it happened.

    ``metric`` is maximised (``accuracy``), or minimised when it is ``loss``/``perplexity``.
    ``checkpoint_dir``: where to write checkpoints (every ``config.checkpoint_every`` steps);
    ``resume``: a checkpoint folder to continue from (the same model, data and config).
    ``evaluate_fn``: the validation figures (default: classification ``evaluate``).
    """
    if seed is not None:
        set_seed(seed)
    accelerator = make_accelerator(config)
    processes = accelerator.num_processes
    for name in ("batch_size", "eval_batch_size"):
        if getattr(config, name) % processes:
            raise ConfigError(
                f"train.{name}: {getattr(config, name)} cannot be split among {processes} "
                f"processes; it is the global batch, so make it a multiple of {processes}"
            )
    groups = parameter_groups(model, config.lr, config.lora_plus_ratio)
    params = [p for group in groups for p in group["params"]]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(train_loader) / config.grad_accum_steps)
    total = steps_per_epoch * config.epochs
    if config.max_steps:
        total = min(total, config.max_steps)
    scheduler = get_linear_schedule_with_warmup(
        optimizer, round(config.warmup_ratio * total), max(total, 1)
    )
    generator = _sampler_generator(train_loader)
    model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, scheduler
    )
    unwrapped = accelerator.unwrap_model(model)
    minimise = metric in ("loss", "perplexity")
    pos = _Position(best_value=math.inf if minimise else -math.inf)
    history: list[dict[str, Any]] = []
    best_weights: dict[str, torch.Tensor] = {}
    epoch_start: dict[str, torch.Tensor] = {}  # what decides the epoch's batch order
    writes = checkpoint_dir is not None and config.checkpoint_every > 0
    writes = writes and accelerator.is_main_process
    started = time.monotonic()

    restored = None
    if resume is not None:
        restored = ckpt.read_checkpoint(resume)
        trainable = _trainable(unwrapped)
        _check_fits(restored.tensors["model"], trainable, restored.path)
        _copy_into(trainable, restored.tensors["model"])
        saved = restored.state
        optimizer.load_state_dict(
            ckpt.join_optimizer_state(restored.tensors.get("optimizer", {}), saved["optimizer"])
        )
        scheduler.scheduler.load_state_dict(saved["scheduler"])
        pos = _Position(**saved["position"])
        best_weights = restored.tensors.get("best", {})
        if best_weights and save_best is not None:  # the recipe gets its best model back
            current = {n: p.detach().clone() for n, p in trainable.items()}
            _copy_into(trainable, best_weights)
            save_best(unwrapped, pos.best_step)
            _copy_into(trainable, current)
        _truncate_metrics(run_dir, saved["metrics_bytes"])
        if run_dir is not None:
            history = run_dir.read_metrics()
        started -= saved["elapsed"]

    progress = _Progress(total, desc, config.log_every, show_progress)
    if restored is not None and progress.bar is not None:
        progress.bar.update(pos.step)

    def mean_over_processes(value: float) -> float:
        if processes == 1:
            return value
        return float(accelerator.reduce(torch.tensor([value], device=accelerator.device), "mean"))

    def log(event: str, **fields: Any) -> dict[str, Any]:
        epoch = round(pos.step / steps_per_epoch, 4)
        record = {"step": pos.step, "epoch": epoch, "time": round(time.monotonic() - started, 3)}
        record.update(fields)
        history.append({"event": event, **record})
        if run_dir is not None:  # each process its own: lorakit.api gives workers a scratch one
            run_dir.log(event, **record)
        return record

    def run_eval() -> dict[str, Any]:
        result = (evaluate_fn or evaluate)(model, eval_loader, accelerator)
        figures = {k: v for k, v in result.items() if isinstance(v, float)}
        log("eval", split="validation", **figures)
        value = figures[metric]
        if value < pos.best_value if minimise else value > pos.best_value:
            pos.best_step, pos.best_value, pos.best_metrics = pos.step, value, figures
            pos.bad_evals = 0
            if writes:
                best_weights.update(
                    {n: p.detach().clone() for n, p in _trainable(unwrapped).items()}
                )
            if save_best is not None:
                save_best(unwrapped, pos.step)
        else:
            pos.bad_evals += 1
            pos.stop = 0 < config.early_stopping_patience <= pos.bad_evals
        progress.note(
            f"{desc}: step {pos.step} " + " ".join(f"val_{k} {v:.4f}" for k, v in figures.items())
        )
        return figures

    def write_checkpoint() -> None:
        rng_tensors, rng_scalars = ckpt.capture_rng()
        optimizer_tensors, optimizer_json = ckpt.split_optimizer_state(optimizer.state_dict())
        groups = {
            "model": _trainable(unwrapped),
            "best": best_weights,
            "optimizer": optimizer_tensors,
            "rng": rng_tensors,
        }
        groups["sampler"] = epoch_start
        metrics = None if run_dir is None else run_dir.path / "metrics.jsonl"
        state = {
            "position": asdict(pos),
            "optimizer": optimizer_json,
            "scheduler": scheduler.scheduler.state_dict(),
            "rng": rng_scalars,
            "elapsed": time.monotonic() - started,
            "metrics_bytes": metrics.stat().st_size if metrics and metrics.exists() else 0,
            "processes": processes,
        }
        ckpt.write_checkpoint(checkpoint_dir, pos.step, groups, state, config.keep_checkpoints)

    # for the loop only: under bf16 the frozen base is held in bf16 (lorakit.train.frozen_base);
    # dropout masks come from a fast generator (lorakit.train.fast_dropout)
    with (
        bf16_frozen_base(unwrapped) if config.use_bf16 else nullcontext(),
        fast_dropout(unwrapped) if config.fast_dropout else nullcontext(),
    ):
        model.train()
        for epoch in range(pos.epoch, config.epochs):
            resuming = restored is not None and epoch == restored.state["position"]["epoch"]
            if not resuming:
                pos.start_epoch(epoch)
            if resuming:
                # a sampler without its own generator draws its order from torch's global RNG
                torch.set_rng_state(restored.tensors["sampler"]["torch"])
                if generator is not None:
                    generator.set_state(restored.tensors["sampler"]["generator"])
            epoch_start = {"torch": torch.get_rng_state()}
            if generator is not None:
                epoch_start["generator"] = generator.get_state()
            batches = iter(train_loader)
            if resuming:
                for _ in range(pos.batches_done):  # the same order, replayed up to the checkpoint
                    next(batches, None)
                accelerator.step = pos.batches_done
                # dropout and everything else random continue exactly where they stopped
                ckpt.restore_rng(restored.tensors["rng"], restored.state["rng"])
            for batch in batches:
                with accelerator.accumulate(model):
                    loss = model(**batch).loss
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and config.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(params, config.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                value = float(loss.detach())
                pos.batches_done += 1
                pos.epoch_loss, pos.epoch_batches = pos.epoch_loss + value, pos.epoch_batches + 1
                pos.log_loss, pos.log_batches = pos.log_loss + value, pos.log_batches + 1
                if not accelerator.sync_gradients:
                    continue
                pos.step += 1
                progress.update(pos.step, loss=value, lr=scheduler.get_last_lr()[0])
                if pos.step % config.log_every == 0:
                    mean_loss = mean_over_processes(pos.log_loss / pos.log_batches)
                    log("train", loss=mean_loss, lr=scheduler.get_last_lr()[0])
                    pos.log_loss, pos.log_batches = 0.0, 0
                if config.eval_every and pos.step % config.eval_every == 0:
                    pos.figures, pos.last_eval_step = run_eval(), pos.step
                if pos.stop or pos.step >= total:
                    break
                if writes and pos.step % config.checkpoint_every == 0:
                    write_checkpoint()
            if pos.last_eval_step != pos.step:
                pos.figures = run_eval()
            val = {f"val_{k}": v for k, v in pos.figures.items()}
            train_loss = mean_over_processes(pos.epoch_loss / max(pos.epoch_batches, 1))
            log("epoch", train_loss=train_loss, **val)
            if pos.stop or pos.step >= total:
                break
    progress.close()
    accelerator.unwrap_model(model, keep_fp32_wrapper=False)  # drops the bf16 autocast wrapper
    return TrainResult(
        best_step=pos.best_step,
        best_metrics=pos.best_metrics,
        steps=pos.step,
        train_seconds=round(time.monotonic() - started, 3),
        stopped_early=pos.stop,
        history=history,
    )
