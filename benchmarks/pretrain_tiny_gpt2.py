"""Pretrain lorakit's tiny GPT-2 on bbc-news (or reuse the cached one) and print its figures.

    python benchmarks/pretrain_tiny_gpt2.py                 # the cached default model
    python benchmarks/pretrain_tiny_gpt2.py --steps 50 --out /tmp/tiny   # a quick, separate run
    python benchmarks/pretrain_tiny_gpt2.py --bf16-check    # seconds per step, bf16 vs fp32

Prints held-out perplexity, training seconds and parameter count as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from lorakit.models.tiny_gpt2 import TinyGPT2Settings, tiny_gpt2_config
from lorakit.recipes.pretrain_tiny_gpt2 import ensure_tiny_gpt2


def seconds_per_step(bf16: bool, settings: TinyGPT2Settings, repeats: int = 3) -> float:
    """Mean time of one forward/backward/AdamW step on random tokens."""
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel(
        tiny_gpt2_config(
            settings.vocab_size,
            settings.n_layer,
            settings.n_embd,
            settings.n_head,
            settings.n_positions,
        )
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, settings.vocab_size, (settings.batch_size, settings.seq_len))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, help="optimizer steps (default: the cached model's)")
    parser.add_argument("--out", help="train into this folder instead of the cache")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument(
        "--bf16-check", action="store_true", help="time a step with and without bf16"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = TinyGPT2Settings()
    if args.steps:
        settings = dataclasses.replace(settings, steps=args.steps)
    if args.bf16_check:
        timings = {f"bf16={b}": seconds_per_step(b, settings) for b in (True, False)}
        print(json.dumps({"seconds_per_step": timings, "threads": torch.get_num_threads()}))
        return
    folder = ensure_tiny_gpt2(args.out, settings)
    figures = json.loads((folder / "pretraining.json").read_text())
    print(json.dumps({"folder": str(folder), **figures}, indent=2))


if __name__ == "__main__":
    main()
