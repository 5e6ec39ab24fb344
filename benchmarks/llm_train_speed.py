"""Tokens per second of one LoRA training step of SmolLM2-135M: lorakit against PEFT.

LoRA r=8, alpha 16 on q, k, v, o, gate, up and down projections (dropout 0); one step is forward,
backward and an AdamW step. Settings:

- "peft fp32" and "peft bf16" (``torch.autocast("cpu", torch.bfloat16)``): PEFT as a user runs it.
- "lorakit bf16": lorakit's loop with ``train.bf16`` (autocast, the frozen base held in bf16,
  ``lorakit.nn.frozen_base``), its dropout path (``lorakit.nn.fast_dropout``) and the loss of
  ``lorakit.nn.output_head``: the output head only on positions that carry a label.
- "lorakit bf16 full-head loss": the same with the model's own loss (``model(**batch).loss``,
  the head on every position), which shows what the labeled-positions loss adds.

Two batch shapes: "instruction", 16 x 96 tokens with the loss on the last 12 tokens of each row
(instruction tuning: the prompt carries no loss), and "domain", 16 x 128 with the loss everywhere.
Every row is full-length packed review text. All settings live in one process and are timed
round-robin (each setting of each shape once per round), so a change in the machine's load hits
all alike; the table gives the median. Before timing, each setting's loss of the same batch at
step 0 is checked against PEFT fp32's (lorakit's LoRA weights are a copy of PEFT's, B non-zero),
so both engines compute the same function and the timings measure equal work.

    python benchmarks/llm_train_speed.py     # table + benchmarks/results/llm_train_speed.json
    OMP_NUM_THREADS=1 python benchmarks/llm_train_speed.py --model /tmp/exp/smollm2 \\
        --steps 1 --warmup 0 --batch 2 --length 16 --out /tmp/llm_train_speed.json   # a check
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lorakit.nn.fast_dropout import fast_dropout
from lorakit.nn.frozen_base import bf16_frozen_base
from lorakit.nn.output_head import labeled_positions_loss
from lorakit.train.loop import model_loss

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    LLM_LORA_OPTIONS,
    RESULTS,
    causal_batch,
    causal_lm,
    copy_lora_weights,
    machine,
    markdown_table,
    packed_token_rows,
)

LossFn = Callable[[nn.Module, dict], torch.Tensor]


@dataclass(frozen=True)
class Setting:
    engine: str  # "peft" or "lorakit"
    bf16: bool  # under bf16 autocast
    loss: LossFn


SETTINGS = {
    "peft fp32": Setting("peft", False, model_loss),
    "peft bf16": Setting("peft", True, model_loss),
    "lorakit bf16": Setting("lorakit", True, labeled_positions_loss),
    "lorakit bf16 full-head loss": Setting("lorakit", True, model_loss),
}
# shape -> (rows, tokens per row, tokens per row that carry a label: None = all)
SHAPES = {"instruction": (16, 96, 12), "domain": (16, 128, None)}


def build_models(name: str) -> tuple[dict[str, nn.Module], object]:
    """({engine: model}, tokenizer): PEFT's and lorakit's LoRA on two copies of the model with
    the same LoRA weights, PEFT's initialisation and a small random B (so that the adapter
    changes the model's output and the loss check below checks it)."""
    import peft

    import lorakit.lora as lora

    base, tokenizer = causal_lm(name)
    torch.manual_seed(0)
    config = peft.LoraConfig(**LLM_LORA_OPTIONS, lora_dropout=0.0, task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for param_name, param in peft_model.named_parameters():
            if ".lora_B." in param_name:
                param.normal_(std=0.01)
    lorakit_model = lora.inject(base, lora.LoraConfig(**LLM_LORA_OPTIONS, task_type="CAUSAL_LM"))
    copy_lora_weights(peft_model, lorakit_model)
    return {"peft": peft_model.train(), "lorakit": lorakit_model.train()}, tokenizer


def shape_batches(tokenizer, rows: int | None, length: int | None) -> dict[str, dict]:
    """One batch per shape; ``rows`` and ``length`` replace every shape's own (a quick check)."""
    shaped = {}
    for shape, (shape_rows, shape_length, labeled) in SHAPES.items():
        n, width = rows or shape_rows, length or shape_length
        labeled = None if labeled is None else min(labeled, width // 2)
        shaped[shape] = causal_batch(packed_token_rows(tokenizer, n, width), labeled)
    return shaped


def loss_of(setting: Setting, model: nn.Module, batch: dict) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=setting.bf16):
        return setting.loss(model, batch)


class Stepper:
    """One setting's training step: its model (shared with the other settings of its engine) and
    its own AdamW."""

    def __init__(self, setting: Setting, model: nn.Module) -> None:
        self.setting, self.model = setting, model
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=1e-4)

    def step(self, batch: dict) -> float:
        loss = loss_of(self.setting, self.model, batch)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


def lorakit_path(stack: ExitStack, model: nn.Module) -> None:
    """The loop's context under ``train.bf16`` and ``train.fast_dropout`` (both on)."""
    stack.enter_context(bf16_frozen_base(model))
    stack.enter_context(fast_dropout(model))


@torch.no_grad()
def step0_losses(models: dict[str, nn.Module], shaped: dict[str, dict]) -> dict[str, dict]:
    """Each setting's loss of each shape's batch before any step, and lorakit fp32's (its
    labeled-positions loss outside the bf16 path), against PEFT fp32's."""
    losses: dict[str, dict[str, float]] = {shape: {} for shape in shaped}
    for shape, batch in shaped.items():
        reference = loss_of(SETTINGS["peft fp32"], models["peft"], batch).item()
        plain = labeled_positions_loss(models["lorakit"], batch).item()
        losses[shape] = {"peft fp32": reference, "lorakit fp32": plain}
    with ExitStack() as stack:
        lorakit_path(stack, models["lorakit"])
        for shape, batch in shaped.items():
            for name, setting in SETTINGS.items():
                if name != "peft fp32":
                    losses[shape][name] = loss_of(setting, models[setting.engine], batch).item()
    return {
        shape: {
            name: {"loss": value, "rel_diff": abs(value - row["peft fp32"]) / row["peft fp32"]}
            for name, value in row.items()
        }
        for shape, row in losses.items()
    }


# ---------------------------------------------------------------- the benchmark
def measure(models: dict[str, nn.Module], shaped: dict[str, dict], steps: int, warmup: int):
    """Median seconds per step of every (shape, setting), timed round-robin."""
    steppers = {
        name: Stepper(setting, models[setting.engine]) for name, setting in SETTINGS.items()
    }
    times: dict[tuple[str, str], list[float]] = {
        (shape, name): [] for shape in shaped for name in SETTINGS
    }
    with ExitStack() as stack:
        lorakit_path(stack, models["lorakit"])
        for round_ in range(warmup + steps):
            for (shape, name), seconds in times.items():
                start = time.perf_counter()
                steppers[name].step(shaped[shape])
                if round_ >= warmup:
                    seconds.append(time.perf_counter() - start)
    rows = []
    for (shape, name), seconds in times.items():
        batch = shaped[shape]
        labels = batch["labels"][:, 1:]
        step_s = statistics.median(seconds)
        rows.append({
            "shape": shape, "setting": name,
            "batch": f"{batch['input_ids'].shape[0]} x {batch['input_ids'].shape[1]}",
            "labeled_tokens": int((labels != -100).sum()),
            "step_s": step_s, "step_s_min": min(seconds), "step_s_max": max(seconds),
            "tokens_per_s": batch["input_ids"].numel() / step_s,
        })  # fmt: skip
    for row in rows:
        best_peft = max(
            r["tokens_per_s"]
            for r in rows
            if r["shape"] == row["shape"] and SETTINGS[r["setting"]].engine == "peft"
        )
        row["vs_best_peft"] = row["tokens_per_s"] / best_peft
    return rows


COLUMNS = {
    "shape": "",
    "setting": "",
    "batch": "",
    "labeled_tokens": "d",
    "step_s": ".3f",
    "tokens_per_s": ",.0f",
    "vs_best_peft": ".2f",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="name or folder for load_causal_lm")
    parser.add_argument("--steps", type=int, default=10, help="measured rounds")
    parser.add_argument("--warmup", type=int, default=2, help="rounds before measuring")
    parser.add_argument("--batch", type=int, help="rows of every shape (default: the shape's)")
    parser.add_argument("--length", type=int, help="tokens per row of every shape")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--out", type=Path, default=RESULTS / "llm_train_speed.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    env = machine()
    models, tokenizer = build_models(args.model)
    shaped = shape_batches(tokenizer, args.batch, args.length)
    check = step0_losses(models, shaped)
    rows = measure(models, shaped, args.steps, args.warmup)
    result = {
        "model": args.model, "lora": LLM_LORA_OPTIONS, "steps": args.steps,
        "warmup": args.warmup, "rows": rows, "step0_losses": check, "machine": env,
        "load_average_after": list(os.getloadavg()),
    }  # fmt: skip
    print(markdown_table(rows, COLUMNS))
    print("\nloss at step 0, relative difference to PEFT fp32 (same LoRA weights):")
    for shape, losses in check.items():
        shown = ", ".join(f"{name} {v['rel_diff']:.1e}" for name, v in losses.items())
        print(f"  {shape}: PEFT fp32 {losses['peft fp32']['loss']:.4f}; {shown}")
    print(f"load average before {env['load_average']}, after {result['load_average_after']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
