"""The training loop every pipeline shares, on ``accelerate.Accelerator``.

Model contract (as transformers models): ``model(**batch)`` returns an object with ``.logits``,
and ``.loss`` when the batch holds ``labels``. The loop trains only parameters that require
grad (AdamW), with linear warmup and decay, gradient clipping and accumulation; it evaluates every
``eval_every`` optimizer steps and at each epoch's end, hands the best model to the recipe's
``save_best(model, step)``, stops early after ``early_stopping_patience`` evaluations without
improvement, and logs every event to the run directory's ``metrics.jsonl``.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from lorakit.config import TrainConfig
from lorakit.rundir import RunDir

SaveBest = Callable[[torch.nn.Module, int], None]


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
        mixed_precision="bf16" if train.bf16 else "no",
        gradient_accumulation_steps=train.grad_accum_steps,
    )


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Iterable[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Classification loss and accuracy over a loader, with every prediction and label."""
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
) -> TrainResult:
    """Train ``model`` in place; return the best evaluation and where it happened.

    ``metric`` is maximised (``accuracy``), or minimised when it is ``loss``/``perplexity``.
    """
    if seed is not None:
        set_seed(seed)
    accelerator = make_accelerator(config)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(train_loader) / config.grad_accum_steps)
    total = steps_per_epoch * config.epochs
    if config.max_steps:
        total = min(total, config.max_steps)
    scheduler = get_linear_schedule_with_warmup(
        optimizer, round(config.warmup_ratio * total), max(total, 1)
    )
    model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, scheduler
    )
    minimise = metric in ("loss", "perplexity")
    best = {"step": 0, "value": math.inf if minimise else -math.inf, "metrics": {}}
    history: list[dict[str, Any]] = []
    bad_evals, step, stop = 0, 0, False
    started = time.monotonic()
    progress = _Progress(total, desc, config.log_every, show_progress)

    def log(event: str, **fields: Any) -> dict[str, Any]:
        epoch = round(step / steps_per_epoch, 4)
        record = {"step": step, "epoch": epoch, "time": round(time.monotonic() - started, 3)}
        record.update(fields)
        history.append({"event": event, **record})
        if run_dir is not None:
            run_dir.log(event, **record)
        return record

    def run_eval() -> dict[str, Any]:
        nonlocal bad_evals, stop
        result = evaluate(model, eval_loader)
        figures = {k: v for k, v in result.items() if isinstance(v, float)}
        log("eval", split="validation", **figures)
        value = figures[metric]
        if value < best["value"] if minimise else value > best["value"]:
            best.update(step=step, value=value, metrics=figures)
            bad_evals = 0
            if save_best is not None:
                save_best(accelerator.unwrap_model(model), step)
        else:
            bad_evals += 1
            stop = 0 < config.early_stopping_patience <= bad_evals
        progress.note(
            f"{desc}: step {step} " + " ".join(f"val_{k} {v:.4f}" for k, v in figures.items())
        )
        return figures

    model.train()
    for _epoch in range(config.epochs):
        epoch_loss, epoch_batches, log_loss, log_batches = 0.0, 0, 0.0, 0
        last_eval_step = -1
        figures: dict[str, Any] = {}
        for batch in train_loader:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            value = float(loss.detach())
            epoch_loss, epoch_batches = epoch_loss + value, epoch_batches + 1
            log_loss, log_batches = log_loss + value, log_batches + 1
            if not accelerator.sync_gradients:
                continue
            step += 1
            progress.update(step, loss=value, lr=scheduler.get_last_lr()[0])
            if step % config.log_every == 0:
                log("train", loss=log_loss / log_batches, lr=scheduler.get_last_lr()[0])
                log_loss, log_batches = 0.0, 0
            if config.eval_every and step % config.eval_every == 0:
                figures, last_eval_step = run_eval(), step
            if stop or step >= total:
                break
        if last_eval_step != step:
            figures = run_eval()
        val = {f"val_{k}": v for k, v in figures.items()}
        log("epoch", train_loss=epoch_loss / max(epoch_batches, 1), **val)
        if stop or step >= total:
            break
    progress.close()
    accelerator.unwrap_model(model, keep_fp32_wrapper=False)  # drops the bf16 autocast wrapper
    return TrainResult(
        best_step=best["step"],
        best_metrics=best["metrics"],
        steps=step,
        train_seconds=round(time.monotonic() - started, 3),
        stopped_early=stop,
        history=history,
    )
