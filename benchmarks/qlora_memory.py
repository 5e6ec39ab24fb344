"""Quantized frozen bases (QLoRA): SmolLM2-135M + LoRA training with a bf16, int8 and NF4 base.

LoRA r=8, alpha 16 on q, k, v, o, gate, up and down; batch 8 x 512 tokens of packed review text,
the loss on every position; lorakit's loop with ``train.bf16`` in every setting. The settings:
- ``bf16``: the base loaded in fp32 and held in bf16 for the loop (``bf16_frozen_base``), the
  path a run without ``model.quantize`` takes;
- ``int8``, ``nf4``: ``model.quantize`` (``load_causal_lm(..., quantize=...)``): the Linears but
  the output head in bitsandbytes' int8 / NF4, embeddings and norms in full precision.
Each setting trains in a fresh process of its own, so its peak memory is that process's RSS
high-water mark (``ru_maxrss``: loading included, since a quantized run never holds the fp32
model whole), beside the RSS just before training and the median step time from the loop's own
log. The settings' processes alternate (bf16, int8, nf4, bf16, ...) ``--repeats`` times.

    python benchmarks/qlora_memory.py            # table + benchmarks/results/qlora_memory.json
    OMP_NUM_THREADS=1 python benchmarks/qlora_memory.py --quick --model TINY_LLAMA_FOLDER \\
        --out /tmp/qlora_memory.json         # a check: one step of 2 x 16 tokens per setting
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    LLM_LORA_OPTIONS,
    RESULTS,
    machine,
    markdown_table,
    measured_causal_training,
    rss_bytes,
)

SETTINGS = ("bf16", "int8", "nf4")  # the base; "bf16" is model.quantize = "none"


def train_one(args: argparse.Namespace) -> dict:
    """In this process: load the base as the setting says, train ``warmup + steps`` steps
    through the loop, and report step times and memory."""
    from transformers.utils import logging

    import lorakit.lora as lora
    import lorakit.train.loop  # noqa: F401 - imported before the runtime's RSS is taken
    import lorakit.train.metrics  # noqa: F401
    from lorakit.models.causal_lm import load_causal_lm

    logging.set_verbosity_error()
    runtime = rss_bytes()  # torch, transformers and lorakit imported, no model yet
    quantize = "none" if args.train_one == "bf16" else args.train_one
    model, tokenizer = load_causal_lm(args.model, quantize=quantize)
    lora.inject(model, lora.LoraConfig(**LLM_LORA_OPTIONS, task_type="CAUSAL_LM"))
    measured = measured_causal_training(
        model, tokenizer, args, bf16=True, gradient_checkpointing=args.gradient_checkpointing
    )
    return {"rss_runtime": runtime, **measured}


def train_in_subprocess(setting: str, args: argparse.Namespace) -> dict:
    command = [
        sys.executable, __file__, "--train-one", setting, "--model", args.model,
        "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
        "--length", str(args.length),
        *(["--gradient-checkpointing"] if args.gradient_checkpointing else []),
        *(["--threads", str(args.threads)] if args.threads else []),
    ]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure(args: argparse.Namespace) -> list[dict]:
    runs: dict[str, list[dict]] = {setting: [] for setting in SETTINGS}
    for _ in range(args.repeats):
        for setting in SETTINGS:
            runs[setting].append(train_in_subprocess(setting, args))
    rows = []
    for setting, measured in runs.items():
        rows.append({
            "base": setting,
            "step_s": statistics.median(s for run in measured for s in run["step_s"]),
            "peak_rss_mb": max(run["peak_rss"] for run in measured) / 2**20,
            "rss_before_training_mb":
                statistics.median(run["rss_before_training"] for run in measured) / 2**20,
            "above_runtime_mb":
                max(run["peak_rss"] - run["rss_runtime"] for run in measured) / 2**20,
            "runs": measured,
        })  # fmt: skip
    bf16 = rows[0]
    for row in rows:
        row["peak_rss_vs_bf16"] = row["peak_rss_mb"] / bf16["peak_rss_mb"]
        row["above_runtime_vs_bf16"] = row["above_runtime_mb"] / bf16["above_runtime_mb"]
        row["step_s_vs_bf16"] = row["step_s"] / bf16["step_s"]
    return rows


COLUMNS = {
    "base": "",
    "step_s": ".3f",
    "step_s_vs_bf16": ".2f",
    "peak_rss_mb": ",.0f",
    "peak_rss_vs_bf16": ".2f",
    "rss_before_training_mb": ",.0f",
    "above_runtime_mb": ",.0f",
    "above_runtime_vs_bf16": ".2f",
}
QUICK = {"steps": 1, "warmup": 0, "batch": 2, "length": 16, "repeats": 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="name or folder for load_causal_lm")
    parser.add_argument("--steps", type=int, default=3, help="measured steps per process")
    parser.add_argument("--warmup", type=int, default=1, help="steps before measuring")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=512, help="tokens per row")
    parser.add_argument("--repeats", type=int, default=2, help="processes per setting")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="train.gradient_checkpointing in every setting")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="a check: " + str(QUICK))
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--train-one", choices=SETTINGS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS / "qlora_memory.json")
    args = parser.parse_args()
    if args.quick:
        vars(args).update(QUICK)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.train_one:
        print(json.dumps(train_one(args)))
        return
    env = machine()
    rows = measure(args)
    result = {
        "model": args.model, "lora": LLM_LORA_OPTIONS, "batch": args.batch,
        "gradient_checkpointing": args.gradient_checkpointing,
        "length": args.length, "steps": args.steps, "warmup": args.warmup, "rows": rows,
        "machine": env, "load_average_after": list(os.getloadavg()),
    }  # fmt: skip
    print(markdown_table(rows, COLUMNS))
    checkpointing = ", gradient checkpointing" if args.gradient_checkpointing else ""
    print(f"\nbatch {args.batch} x {args.length}, train.bf16 in every setting{checkpointing}")
    print(f"load average before {env['load_average']}, after {result['load_average_after']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
