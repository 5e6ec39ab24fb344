"""One DoRA training step against the same LoRA step, in lorakit and in PEFT.

Four settings per model: lorakit LoRA, lorakit DoRA (``lora.use_dora = true``), PEFT LoRA and
PEFT DoRA. One step is forward, backward and an AdamW step of one full-length batch.

- "minilm": the ``sentiment`` recipe's classifier, fp32: MiniLM with its own dropout 0, LoRA
  r=8, alpha 16 on query/key/value with lora_dropout 0.1, the classifier trained whole; 16 x 128
  tokens of review text. With dropout in training DoRA rescales the base product of the
  dropped-out input (PEFT's rule), so both engines run one more product with W0 per layer.
- "smollm2": SmolLM2-135M in bf16 as ``benchmarks/llm_train_speed.py`` runs it: LoRA r=8, alpha
  16 on q, k, v, o, gate, up and down (dropout 0); lorakit as ``train.bf16`` runs (autocast, the
  frozen base held in bf16), PEFT under plain bf16 autocast; 16 x 128 tokens, loss everywhere.

lorakit runs its training path (``lorakit.nn.fast_dropout``; ``bf16_frozen_base`` under bf16).
Every setting of a model lives in one process and is timed round-robin (one step of each, then
the next round), so a change in the machine's load hits all alike; the table gives medians.
Before timing, each engine's LoRA and DoRA models get the same adapter weights (B random and
small, so DoRA's magnitude and norm differ) and their fp32 losses of the batch are checked
against each other in eval mode: the timings measure equal work.

The goal: lorakit DoRA at most 1.3 x lorakit LoRA, and faster than PEFT DoRA.

    python benchmarks/dora_step.py            # table + benchmarks/results/dora_step.json
    python benchmarks/dora_step.py --quick    # 2 rounds of 2 x 16 tokens: does it run
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lorakit.nn.fast_dropout import fast_dropout
from lorakit.nn.frozen_base import bf16_frozen_base, set_model_dropout
from lorakit.train.loop import model_loss

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    LLM_LORA_OPTIONS,
    LORA_OPTIONS,
    RESULTS,
    causal_batch,
    causal_lm,
    copy_lora_weights,
    machine,
    markdown_table,
    minilm,
    packed_token_rows,
    review_batches,
)

SETTINGS = ("lorakit LoRA", "lorakit DoRA", "peft LoRA", "peft DoRA")


@dataclass(frozen=True)
class ModelSpec:
    lora: dict  # LoraConfig fields both engines take
    bf16: bool


SPECS = {
    "minilm": ModelSpec(
        dict(**LORA_OPTIONS, lora_dropout=0.1, modules_to_save=["classifier"], task_type="SEQ_CLS"),
        bf16=False,
    ),
    "smollm2": ModelSpec(dict(**LLM_LORA_OPTIONS, lora_dropout=0.0, task_type="CAUSAL_LM"), True),
}


def load_base(model: str, smollm2: str) -> tuple[nn.Module, object]:
    """(fp32 model, tokenizer or None): MiniLM with its own dropout off, or SmolLM2."""
    if model == "minilm":
        base = minilm()
        set_model_dropout(base, 0.0)  # the sentiment recipe's model.dropout
        return base, None
    return causal_lm(smollm2)


def build_models(spec: ModelSpec, base: nn.Module) -> dict[str, nn.Module]:
    """{setting: model}: four copies of `base`; each engine's two share the same adapter weights
    (lorakit's random start, B ~ N(0, 0.01²)), copied into PEFT's."""
    import peft

    import lorakit.lora as lora

    models = {}
    for method, use_dora in (("LoRA", False), ("DoRA", True)):
        torch.manual_seed(0)
        ours = lora.inject(copy.deepcopy(base), lora.LoraConfig(**spec.lora, use_dora=use_dora))
        with torch.no_grad():
            for name, param in lora.adapter_parameters(ours).items():
                if ".lora_B." in name:
                    param.normal_(std=0.01)
        theirs = peft.get_peft_model(
            copy.deepcopy(base), peft.LoraConfig(**spec.lora, use_dora=use_dora)
        )
        copy_lora_weights(ours, theirs)
        models[f"lorakit {method}"], models[f"peft {method}"] = ours, theirs
    return models


def batch_of(model: str, tokenizer, rows: int, length: int) -> dict[str, torch.Tensor]:
    if model == "minilm":
        return review_batches(1, rows, length)[0]
    return causal_batch(packed_token_rows(tokenizer, rows, length))


@torch.no_grad()
def eval_losses(models: dict[str, nn.Module], batch: dict) -> dict[str, float]:
    """Each setting's fp32 loss of `batch` in eval mode (no dropout): the engines agree."""
    losses = {}
    for setting, model in models.items():
        losses[setting] = model_loss(model.eval(), batch).item()
        model.train()
    return losses


class Stepper:
    """One setting's training step: its model, its AdamW, its precision."""

    def __init__(self, model: nn.Module, bf16: bool) -> None:
        self.model, self.bf16 = model.train(), bf16
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=1e-4)

    def step(self, batch: dict) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            loss = model_loss(self.model, batch)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


def measure(models: dict[str, nn.Module], spec: ModelSpec, batch: dict, steps: int, warmup: int):
    """Median seconds per step of every setting, timed round-robin."""
    steppers = {setting: Stepper(model, spec.bf16) for setting, model in models.items()}
    times: dict[str, list[float]] = {setting: [] for setting in models}
    with ExitStack() as stack:
        for setting, model in models.items():
            if setting.startswith("lorakit"):  # the loop's context: train.fast_dropout, bf16
                if spec.bf16:
                    stack.enter_context(bf16_frozen_base(model))
                stack.enter_context(fast_dropout(model))
        for round_ in range(warmup + steps):
            for setting, stepper in steppers.items():
                start = time.perf_counter()
                stepper.step(batch)
                if round_ >= warmup:
                    times[setting].append(time.perf_counter() - start)
    return {setting: statistics.median(seconds) for setting, seconds in times.items()}, times


def rows_of(model: str, batch: dict, medians: dict, times: dict, losses: dict) -> list[dict]:
    rows = []
    for setting in SETTINGS:
        rows.append({
            "model": model, "setting": setting,
            "batch": " x ".join(str(n) for n in batch["input_ids"].shape),
            "step_s": medians[setting], "step_s_min": min(times[setting]),
            "step_s_max": max(times[setting]),
            "vs_lorakit_lora": medians[setting] / medians["lorakit LoRA"],
            "vs_peft_dora": medians[setting] / medians["peft DoRA"],
            "eval_loss": losses[setting],
        })  # fmt: skip
    return rows


COLUMNS = {
    "model": "",
    "setting": "",
    "batch": "",
    "step_s": ".3f",
    "vs_lorakit_lora": ".2f",
    "vs_peft_dora": ".2f",
    "eval_loss": ".5f",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(SPECS), default=list(SPECS))
    parser.add_argument("--smollm2", default="smollm2", help="name or folder for load_causal_lm")
    parser.add_argument("--steps", type=int, default=10, help="measured rounds")
    parser.add_argument("--warmup", type=int, default=2, help="rounds before measuring")
    parser.add_argument("--batch", type=int, default=16, help="rows per batch")
    parser.add_argument("--length", type=int, default=128, help="tokens per row")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 2 x 16: does it run")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--out", type=Path, default=RESULTS / "dora_step.json")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup, args.batch, args.length = 2, 0, 2, 16
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging

    logging.set_verbosity_error()
    env = machine()
    rows, checks = [], {}
    for model in args.models:
        spec = SPECS[model]
        base, tokenizer = load_base(model, args.smollm2)
        models = build_models(spec, base)
        del base
        batch = batch_of(model, tokenizer, args.batch, args.length)
        losses = eval_losses(models, batch)
        checks[model] = {
            method: abs(losses[f"lorakit {method}"] - losses[f"peft {method}"])
            / abs(losses[f"peft {method}"])
            for method in ("LoRA", "DoRA")
        }
        medians, times = measure(models, spec, batch, args.steps, args.warmup)
        rows += rows_of(model, batch, medians, times, losses)
        del models
    result = {
        "settings": {model: SPECS[model].lora | {"bf16": SPECS[model].bf16} for model in args.models},
        "steps": args.steps, "warmup": args.warmup, "rows": rows,
        "eval_loss_rel_diff_lorakit_vs_peft": checks, "machine": env,
        "load_average_after": list(os.getloadavg()),
    }  # fmt: skip
    print(markdown_table(rows, COLUMNS))
    print("\ngoal: lorakit DoRA <= 1.3 x lorakit LoRA, and < 1.0 x PEFT DoRA")
    for model in args.models:
        dora_row = next(r for r in rows if r["model"] == model and r["setting"] == "lorakit DoRA")
        print(
            f"  {model}: lorakit DoRA = {dora_row['vs_lorakit_lora']:.2f} x lorakit LoRA, "
            f"{dora_row['vs_peft_dora']:.2f} x PEFT DoRA; eval loss lorakit vs PEFT, relative: "
            + ", ".join(f"{m} {d:.1e}" for m, d in checks[model].items())
        )
    print(f"load average before {env['load_average']}, after {result['load_average_after']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
