"""Gradient checkpointing: SmolLM2-135M + LoRA training steps with and without, time and memory.

LoRA r=8, alpha 16 on q, k, v, o, gate, up and down; batch 8 x 512 tokens of packed review text,
the loss on every position. Each setting trains in lorakit's loop (``train_loop`` with
``train.bf16``, ``train.fast_dropout`` and the labeled-positions loss) with
``train.gradient_checkpointing`` false or true, in a fresh process of its own, so that its peak
memory is the process's RSS high-water mark (``getrusage(RUSAGE_SELF).ru_maxrss``; torch keeps
no allocator statistics on the CPU). The table gives that peak, the RSS just before training
(model, LoRA and data loaded, weights read) and the difference: what training adds (activations,
the bf16 copy of the frozen weights, the output head's logits, the optimizer). Step time: the
median of the measured steps, from the loop's own per-step log. The settings' processes
alternate (off, on, off, on, ...) ``--repeats`` times.

    python benchmarks/gradient_checkpointing.py   # table + benchmarks/results/<this name>.json
    OMP_NUM_THREADS=1 python benchmarks/gradient_checkpointing.py --model /tmp/exp/smollm2 \\
        --steps 1 --warmup 0 --batch 2 --length 16 --out /tmp/gradient_checkpointing.json  # a check
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
    causal_lm,
    machine,
    markdown_table,
    measured_causal_training,
)

SETTINGS = {"off": False, "on": True}  # train.gradient_checkpointing


def train_one(args: argparse.Namespace) -> dict:
    """In this process: build the model and data, train ``warmup + steps`` steps through the
    loop, and report step times and memory."""
    import lorakit.lora as lora

    model, tokenizer = causal_lm(args.model)
    lora.inject(model, lora.LoraConfig(**LLM_LORA_OPTIONS, task_type="CAUSAL_LM"))
    return measured_causal_training(
        model, tokenizer, args, bf16=not args.fp32,
        gradient_checkpointing=SETTINGS[args.train_one],
    )  # fmt: skip


def train_in_subprocess(setting: str, args: argparse.Namespace) -> dict:
    command = [
        sys.executable, __file__, "--train-one", setting, "--model", args.model,
        "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
        "--length", str(args.length), *(["--fp32"] if args.fp32 else []),
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
        peak = max(run["peak_rss"] for run in measured)
        peak_before = max(run["peak_rss_before_training"] for run in measured)
        before = statistics.median(run["rss_before_training"] for run in measured)
        rows.append({
            "gradient_checkpointing": setting,
            "step_s": statistics.median(s for run in measured for s in run["step_s"]),
            "peak_rss_mb": peak / 2**20,
            "rss_before_training_mb": before / 2**20,
            "peak_rss_before_training_mb": peak_before / 2**20,
            "training_adds_mb": (peak - before) / 2**20,
            "runs": measured,
        })  # fmt: skip
    off = rows[0]
    for row in rows:
        row["step_s_vs_off"] = row["step_s"] / off["step_s"]
        row["training_adds_vs_off"] = row["training_adds_mb"] / off["training_adds_mb"]
    return rows


COLUMNS = {
    "gradient_checkpointing": "",
    "step_s": ".3f",
    "step_s_vs_off": ".2f",
    "peak_rss_mb": ",.0f",
    "rss_before_training_mb": ",.0f",
    "training_adds_mb": ",.0f",
    "training_adds_vs_off": ".2f",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="name or folder for load_causal_lm")
    parser.add_argument("--steps", type=int, default=3, help="measured steps per process")
    parser.add_argument("--warmup", type=int, default=1, help="steps before measuring")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=512, help="tokens per row")
    parser.add_argument("--repeats", type=int, default=2, help="processes per setting")
    parser.add_argument("--fp32", action="store_true", help="train.bf16 = false")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--train-one", choices=SETTINGS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS / "gradient_checkpointing.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.train_one:
        print(json.dumps(train_one(args)))
        return
    env = machine()
    rows = measure(args)
    result = {
        "model": args.model, "lora": LLM_LORA_OPTIONS, "batch": args.batch,
        "length": args.length, "bf16": not args.fp32, "steps": args.steps,
        "warmup": args.warmup, "rows": rows, "machine": env,
        "load_average_after": list(os.getloadavg()),
    }  # fmt: skip
    print(markdown_table(rows, COLUMNS))
    print(f"\nbatch {args.batch} x {args.length}, {'fp32' if args.fp32 else 'bf16'}")
    print(f"load average before {env['load_average']}, after {result['load_average_after']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
