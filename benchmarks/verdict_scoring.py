"""Verdict scoring: log P(" fresh") and log P(" rotten") after each validation prompt.

Two scorers on the same model (the cached tiny GPT-2) and the same 1,295 validation prompts of
the `instruct` recipe in its plain format (`causal.chat = "off"`), timed round-robin:
- "full logits": right-padded `eos prompt answer eos` rows of the whole split (what lorakit did
  before `ChoiceScorer`): every position of every row through the output head.
- "ChoiceScorer": prompts batched by length, left-padded, the output head only at the answer.
Both must pick the same verdict for every prompt; the table gives the largest score difference.

    python benchmarks/verdict_scoring.py     # table + benchmarks/results/verdict_scoring.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, machine, markdown_table  # noqa: E402

from lorakit.data import load_dataset  # noqa: E402
from lorakit.data.causal import (  # noqa: E402
    VERDICT_CHOICES,
    instruction_dataset,
    rotten_tomatoes_verdicts,
)
from lorakit.models.causal_lm import ChoiceScorer, load_causal_lm  # noqa: E402
from lorakit.recipes.pretrain_tiny_gpt2 import ensure_base_model  # noqa: E402


@torch.no_grad()
def full_logits_scores(model, tokenizer, prompts, max_length: int, batch_size: int):
    """The straightforward scorer: whole rows, every position's logits."""
    columns = []
    for choice in VERDICT_CHOICES:
        rows = instruction_dataset(tokenizer, prompts, [choice] * len(prompts), max_length)
        scores = []
        for start in range(0, rows.num_rows, batch_size):
            batch = rows[start : start + batch_size]
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits.float()
            targets = batch["labels"][:, 1:]
            counted = targets != -100
            log_probs = -torch.nn.functional.cross_entropy(
                logits[:, :-1].transpose(1, 2), targets.clamp(min=0), reduction="none"
            )
            log_probs = log_probs * counted
            last = counted.long().cumsum(1).argmax(1)  # the closing eos: not part of the answer
            log_probs[torch.arange(len(last)), last] = 0.0
            scores.append(log_probs.sum(1))
        columns.append(torch.cat(scores))
    return torch.stack(columns, dim=1).double()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    model, tokenizer = load_causal_lm(ensure_base_model("tiny-gpt2"))
    model.eval()
    max_length = int(model.config.n_positions)
    pairs = rotten_tomatoes_verdicts(load_dataset("rotten-tomatoes"))["validation"]
    prompts = list(pairs["prompt"])

    def time_it(fn):
        started = time.perf_counter()
        result = fn()
        return time.perf_counter() - started, result

    times = {"full logits": [], "ChoiceScorer (with tokenizing)": []}
    for _ in range(args.repeats):  # round-robin, so a busy moment hits both
        seconds, reference = time_it(
            lambda: full_logits_scores(model, tokenizer, prompts, max_length, args.batch_size)
        )
        times["full logits"].append(seconds)
        seconds, scores = time_it(
            lambda: ChoiceScorer(tokenizer, prompts, VERDICT_CHOICES, max_length, args.batch_size)(
                model
            )
        )
        times["ChoiceScorer (with tokenizing)"].append(seconds)
    same = bool((reference.argmax(1) == scores.argmax(1)).all())
    max_diff = float((reference - scores).abs().max())
    baseline = min(times["full logits"])
    rows = [
        {
            "scorer": name,
            "seconds": min(values),
            "speedup": baseline / min(values),
            "prompts": len(prompts),
        }
        for name, values in times.items()
    ]
    print(markdown_table(rows, {"scorer": "", "seconds": ".2f", "speedup": ".2f", "prompts": "d"}))
    print(f"same verdict for every prompt: {same}; largest score difference {max_diff:.2e}")
    result = {
        "machine": machine(),
        "repeats": args.repeats,
        "batch_size": args.batch_size,
        "rows": rows,
        "all_seconds": times,
        "same_verdicts": same,
        "max_abs_score_difference": max_diff,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "verdict_scoring.json").write_text(json.dumps(result, indent=2) + "\n")
    if not same:
        raise SystemExit("the scorers disagree on a verdict")


if __name__ == "__main__":
    main()
