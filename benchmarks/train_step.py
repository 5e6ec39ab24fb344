"""One training step of MiniLM (2-label head), batch 16 x 128 tokens of review text.

Variants: full fine-tuning, PEFT LoRA and lorakit LoRA (r=8, query/key/value, classifier
trained in full, AdamW), each in fp32 and under bf16 autocast. All variants live in one process
and are timed round-robin (one step of each, then the next round), so a change in the machine's
load hits every variant alike. Also: FLOPs per step (torch's FlopCounterMode), the machine's
matmul peak per dtype, peak memory per variant (RSS, in a fresh process per variant) and the
loss curves of lorakit and PEFT from the same start.

    python benchmarks/train_step.py            # table + benchmarks/results/train_step.json
    python benchmarks/train_step.py --threads 1 --profile "lorakit fp32"   # where the time goes
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from lorakit.nn.fast_dropout import fast_dropout
from lorakit.nn.frozen_base import bf16_frozen_base, set_model_dropout

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    RESULTS,
    copy_lora_weights,
    machine,
    markdown_table,
    matmul_peak_gflops,
    minilm,
    review_batches,
    with_lorakit,
    with_peft,
)

ENGINES = {"full": lambda model: model, "peft": with_peft, "lorakit": with_lorakit}
DTYPES = {"fp32": None, "bf16": torch.bfloat16}
# name -> (engine, dtype, the frozen model's own dropout: None keeps MiniLM's 0.1)
VARIANTS = {
    **{f"{engine} {dtype}": (engine, dtype, None) for dtype in DTYPES for engine in ENGINES},
    "lorakit fp32 torch-dropout": ("lorakit", "fp32", None),
    "peft fp32 dropout0": ("peft", "fp32", 0.0),
    "lorakit fp32 dropout0": ("lorakit", "fp32", 0.0),
    "lorakit bf16 dropout0": ("lorakit", "bf16", 0.0),
}
BATCH, SEQ_LEN = 16, 128


class Trainer:
    """A model and its AdamW, stepping under the variant's precision.

    lorakit takes lorakit's training path: dropout masks from the fast generator
    (``lorakit.nn.fast_dropout``; "torch-dropout" leaves PyTorch's), and under bf16
    (``train.bf16``) autocast with the frozen weights held in bf16 and matmul attention
    (``lorakit.nn.frozen_base``); PEFT and full fine-tuning get plain bf16 autocast.
    "dropout0" sets the frozen model's own dropout to 0 (``model.dropout = 0``); LoRA's is 0
    in every variant."""

    def __init__(self, variant: str) -> None:
        engine, dtype_name, dropout = VARIANTS[variant]
        self.autocast_dtype = DTYPES[dtype_name]
        model = minilm()
        if dropout is not None:
            set_model_dropout(model, dropout)
        self.model = ENGINES[engine](model)
        self.model.train()
        self._context = ExitStack()
        if engine == "lorakit" and self.autocast_dtype is not None:
            self._context.enter_context(bf16_frozen_base(self.model))
        if engine == "lorakit" and not variant.endswith("torch-dropout"):
            self._context.enter_context(fast_dropout(self.model))
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=1e-4)

    def step(self, batch: dict) -> float:
        dtype = self.autocast_dtype
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = self.model(**batch).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def flops(self, batch: dict) -> int:
        counter = FlopCounterMode(display=False)
        with counter:
            self.step(batch)
        return counter.get_total_flops()


# ---------------------------------------------------------------- peak memory, one process each
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def peak_memory_of(variant: str, steps: int = 3) -> int:
    """Highest RSS seen while `variant` is built and trains `steps` steps, minus RSS just
    before the model is loaded: weights, any bf16 copy of them, activations and optimizer."""
    batches = review_batches(steps, BATCH, SEQ_LEN)
    import transformers  # noqa: F401  (its import is not the variant's memory)

    before = _rss_bytes()
    trainer = Trainer(variant)
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_bytes())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    for batch in batches:
        trainer.step(batch)
    done.set()
    sampler.join()
    return peak - before


def peak_memory_in_subprocess(variant: str) -> int:
    out = subprocess.run(
        [sys.executable, __file__, "--memory-of", variant],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(out.strip().splitlines()[-1])


def profile_table(variant: str, rows: int = 20) -> str:
    """torch.profiler's operator table (self CPU time) for one step of `variant`, after warm-up."""
    from torch.profiler import ProfilerActivity, profile

    batches = review_batches(3, BATCH, SEQ_LEN)
    trainer = Trainer(variant)
    for batch in batches[:2]:
        trainer.step(batch)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.step(batches[2])
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


# ---------------------------------------------------------------- the loss-curve check
def loss_curves(steps: int = 20) -> dict[str, list[float]]:
    """lorakit (on its fp32 training path) and PEFT from the same weights and seed, dropout 0
    (the model's and LoRA's: with dropout on, the two engines draw different masks), lr high enough
    to move."""
    batches = review_batches(steps, BATCH, SEQ_LEN)
    models = {}
    for name, engine in (("peft", with_peft), ("lorakit", with_lorakit)):
        model = minilm()
        set_model_dropout(model, 0.0)
        models[name] = engine(model)
    copy_lora_weights(models["lorakit"], models["peft"])
    curves = {}
    for name, model in models.items():
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-3)
        torch.manual_seed(1)
        curve = []
        with fast_dropout(model) if name == "lorakit" else ExitStack():
            for batch in batches:
                loss = model(**batch).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                curve.append(loss.item())
        curves[name] = curve
    return curves


# ---------------------------------------------------------------- the benchmark
def measure(steps: int, warmup: int, memory: bool) -> dict:
    batches = review_batches(steps + warmup, BATCH, SEQ_LEN)
    trainers = {variant: Trainer(variant) for variant in VARIANTS}
    peaks = {"fp32": matmul_peak_gflops(torch.float32), "bf16": matmul_peak_gflops(torch.bfloat16)}
    times: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    for i, batch in enumerate(batches):
        for variant, trainer in trainers.items():
            start = time.perf_counter()
            trainer.step(batch)
            if i >= warmup:
                times[variant].append(time.perf_counter() - start)
    for dtype in peaks:  # the better of before and after, in case the load changed
        peaks[dtype] = max(peaks[dtype], matmul_peak_gflops(DTYPES[dtype] or torch.float32))
    rows = []
    for variant, trainer in trainers.items():
        seconds = statistics.median(times[variant])
        flops = trainer.flops(batches[0])
        gflops = flops / seconds / 1e9
        dtype = VARIANTS[variant][1]
        rows.append(
            {
                "variant": variant,
                "step_s": seconds,
                "step_s_min": min(times[variant]),
                "step_s_max": max(times[variant]),
                "gflop_per_step": flops / 1e9,
                "gflop_s": gflops,
                "share_of_peak": gflops / peaks[dtype],
                "peak_rss_delta_mb": (
                    peak_memory_in_subprocess(variant) / 2**20 if memory else float("nan")
                ),
            }
        )
    reference = next(r["step_s"] for r in rows if r["variant"] == "peft fp32")
    for row in rows:
        row["ratio_to_peft_fp32"] = row["step_s"] / reference
    return {"rows": rows, "matmul_peak_gflop_s": peaks, "steps": steps, "warmup": warmup}


COLUMNS = {
    "variant": "",
    "step_s": ".3f",
    "ratio_to_peft_fp32": ".2f",
    "peak_rss_delta_mb": ".0f",
    "gflop_per_step": ".1f",
    "gflop_s": ".1f",
    "share_of_peak": ".0%",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="measured steps per variant")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-variant RSS runs")
    parser.add_argument("--profile", metavar="VARIANT", help='e.g. "lorakit fp32": op table')
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS / "train_step.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_of:
        print(peak_memory_of(args.memory_of))
        return
    from transformers.utils import logging

    logging.set_verbosity_error()
    if args.profile:
        print(profile_table(args.profile))
        return
    env = machine()
    result = measure(args.steps, args.warmup, memory=not args.no_memory)
    curves = loss_curves()
    worst = max(abs(a - b) / abs(b) for a, b in zip(curves["lorakit"], curves["peft"], strict=True))
    result.update(machine=env, load_average_after=list(os.getloadavg()))
    result.update(loss_curves=curves, loss_curve_max_rel_diff=worst)
    print(markdown_table(result["rows"], COLUMNS))
    peaks = result["matmul_peak_gflop_s"]
    print(f"\nmatmul peak: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s")
    print(f"loss curves lorakit vs PEFT, first 20 steps: max relative difference {worst:.2e}")
    print(f"load average before {env['load_average']}, after {result['load_average_after']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
