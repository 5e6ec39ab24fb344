"""`trainer = "hf"`: the same run through transformers' `Trainer`, as the seeds do.

A callback writes the same `metrics.jsonl` events as lorakit's loop, keeps the best trainable
weights (`lorakit.train.best`) and stops early; so both trainers leave the same run directory
behind, and return the model holding the weights of its best evaluation.
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from lorakit.config import TrainConfig
from lorakit.nn.fast_dropout import fast_dropout
from lorakit.rundir import RunDir

from .best import BestEvaluation
from .loop import TrainResult, checkpointing_of, parameter_groups
from .metrics import accuracy


def _accuracy(prediction) -> dict[str, float]:
    logits, labels = prediction.predictions, prediction.label_ids
    logits = logits[0] if isinstance(logits, tuple) else logits
    return {"accuracy": accuracy(np.argmax(logits, axis=-1), labels)}


class _RunDirCallback(TrainerCallback):
    def __init__(self, run_dir, patience, steps_per_epoch):
        self.run_dir, self.steps_per_epoch = run_dir, steps_per_epoch
        self.started = time.monotonic()
        self.best = BestEvaluation("accuracy", patience)
        self.epoch_losses, self.last_eval = [], {}
        self.history: list[dict[str, Any]] = []
        self.model = None

    def _log(self, state, event: str, **fields) -> None:
        record = {"step": state.global_step,
                  "epoch": round(state.global_step / self.steps_per_epoch, 4),
                  "time": round(time.monotonic() - self.started, 3), **fields}  # fmt: skip
        self.history.append({"event": event, **record})
        if self.run_dir is not None:
            self.run_dir.log(event, **record)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.model = model

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            self.epoch_losses.append(logs["loss"])
            self._log(state, "train", loss=logs["loss"], lr=logs.get("learning_rate", 0.0))
            if not sys.stderr.isatty():  # tqdm is off: plain progress lines instead
                print(f"hf trainer: step {state.global_step}/{state.max_steps} "
                      f"loss {logs['loss']:.4g}", flush=True)  # fmt: skip

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        figures = {"loss": metrics["eval_loss"], "accuracy": metrics["eval_accuracy"]}
        self.last_eval = figures
        self._log(state, "eval", split="validation", **figures)
        self.best.update(self.model, state.global_step, figures)
        if self.best.should_stop:
            control.should_training_stop = True

    def on_epoch_end(self, args, state, control, **kwargs):
        # evaluation at the epoch's end runs after this hook; the epoch event follows it
        control.should_evaluate = True

    def epoch_event(self, state) -> None:
        losses = self.epoch_losses or [float("nan")]
        val = {f"val_{k}": v for k, v in self.last_eval.items()}
        self._log(state, "epoch", train_loss=float(np.mean(losses)), **val)
        self.epoch_losses = []


class _EpochEvents(TrainerCallback):
    """Writes the `epoch` event after the epoch's evaluation (callbacks run in order)."""

    def __init__(self, recorder: _RunDirCallback):
        self.recorder = recorder

    def on_evaluate(self, args, state, control, **kwargs):
        if abs(state.epoch - round(state.epoch)) < 1e-6 and state.epoch > 0:
            self.recorder.epoch_event(state)


def _training_arguments(
    config: TrainConfig, steps_per_epoch: int, seed: int, output_dir: str
) -> TrainingArguments:
    """lorakit's train section in the Trainer's terms."""
    total = steps_per_epoch * config.epochs
    if config.max_steps:
        total = min(total, config.max_steps)
    return TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.eval_batch_size,
        learning_rate=config.lr,
        weight_decay=config.weight_decay,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1,
        warmup_steps=round(config.warmup_ratio * total),
        lr_scheduler_type="linear",
        max_grad_norm=config.max_grad_norm if config.max_grad_norm > 0 else 1e9,
        gradient_accumulation_steps=config.grad_accum_steps,
        eval_strategy="steps" if config.eval_every else "epoch",
        eval_steps=config.eval_every or None,
        save_strategy="no",
        logging_steps=config.log_every,
        report_to=[],
        seed=seed,
        data_seed=seed,
        bf16=config.use_bf16,
        use_cpu=not torch.cuda.is_available(),
        train_sampling_strategy="group_by_length",
        dataloader_num_workers=config.num_workers,
        disable_tqdm=not sys.stderr.isatty(),  # our callback logs plain lines in CI logs
    )


def train_with_hf_trainer(
    model: torch.nn.Module,
    train_dataset,
    eval_dataset,
    collator,
    config: TrainConfig,
    *,
    run_dir: RunDir | None,
    seed: int,
    output_dir: str,
) -> TrainResult:
    """Train with `transformers.Trainer`; like `train_loop`, leave `model` holding the weights
    of its best evaluation and return the same result type."""
    steps_per_epoch = max(
        1, math.ceil(len(train_dataset) / config.batch_size / config.grad_accum_steps)
    )
    args = _training_arguments(config, steps_per_epoch, seed, output_dir)
    recorder = _RunDirCallback(run_dir, config.early_stopping_patience, steps_per_epoch)
    # lorakit's own switch rather than TrainingArguments': the same non-reentrant checkpointing
    # as the loop's, and the model as before afterwards
    checkpointing = checkpointing_of(model, config)
    optimizer = None  # the Trainer's own AdamW
    if config.lora_plus_ratio != 1:
        groups = parameter_groups(model, config.lr, config.lora_plus_ratio)
        optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        compute_metrics=_accuracy,
        callbacks=[recorder, _EpochEvents(recorder)],
        optimizers=(optimizer, None),
    )
    started = time.monotonic()
    with fast_dropout(model) if config.fast_dropout else nullcontext(), checkpointing:
        trainer.train()
    # under bf16 accelerate wrapped model.forward in autocast: take it off, so the test
    # evaluation after training computes in fp32 as every later reload does
    trainer.accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    if recorder.epoch_losses:  # stopped (early or max_steps) inside an epoch
        recorder.epoch_event(trainer.state)
    recorder.best.restore(model)
    return TrainResult(
        best_step=recorder.best.step,
        best_metrics=recorder.best.metrics,
        steps=trainer.state.global_step,
        train_seconds=round(time.monotonic() - started, 3),
        stopped_early=recorder.best.should_stop
        and trainer.state.global_step < trainer.state.max_steps,
        history=recorder.history,
    )
