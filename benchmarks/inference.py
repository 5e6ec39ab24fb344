"""Inference with MiniLM (2-label head): latency at batch 1, throughput at batch 64 (128 tokens).

Models: the base model; base + unmerged adapter and the merged model, for lorakit and for PEFT
(r=8, query/key/value, the same non-zero adapter weights in both). All in one process, timed
round-robin, eval mode under `torch.inference_mode`.

    python benchmarks/inference.py            # table + benchmarks/results/inference.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    RESULTS,
    copy_lora_weights,
    machine,
    markdown_table,
    minilm,
    review_batches,
    with_lorakit,
    with_peft,
)

import lorakit.lora as lora  # noqa: E402

SEQ_LEN = 128


def models() -> dict[str, torch.nn.Module]:
    base = minilm()
    lorakit_model = with_lorakit(copy.deepcopy(base))
    with torch.no_grad():  # a trained-looking adapter: B is zero at initialisation
        for name, param in lorakit_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)
    peft_model = with_peft(copy.deepcopy(base))
    copy_lora_weights(lorakit_model, peft_model)
    found = {
        "base": base,
        "lorakit unmerged": lorakit_model,
        "lorakit merged": lora.merge_and_unload(copy.deepcopy(lorakit_model)),
        "peft unmerged": peft_model,
        "peft merged": copy.deepcopy(peft_model).merge_and_unload(),
    }
    for model in found.values():
        model.eval()
    return found


def measure(repeats: int, warmup: int) -> dict:
    batches = {1: review_batches(1, 1, SEQ_LEN)[0], 64: review_batches(1, 64, SEQ_LEN)[0]}
    for batch in batches.values():
        batch.pop("labels")
    found = models()
    with torch.inference_mode():
        one = batches[1]
        agreement = {
            engine: (
                found[f"{engine} merged"](**one).logits - found[f"{engine} unmerged"](**one).logits
            )
            .abs()
            .max()
            .item()
            for engine in ("lorakit", "peft")
        }
        times: dict[tuple[str, int], list[float]] = {(n, b): [] for n in found for b in batches}
        for i in range(warmup + repeats):
            for size, batch in batches.items():
                for name, model in found.items():
                    start = time.perf_counter()
                    model(**batch)
                    if i >= warmup:
                        times[(name, size)].append(time.perf_counter() - start)
    rows = []
    base_1 = statistics.median(times[("base", 1)])
    base_64 = statistics.median(times[("base", 64)])
    for name in found:
        latency = statistics.median(times[(name, 1)])
        batch_s = statistics.median(times[(name, 64)])
        rows.append(
            {
                "model": name,
                "latency_ms_batch1": latency * 1e3,
                "latency_vs_base": latency / base_1,
                "seq_per_s_batch64": 64 / batch_s,
                "batch64_time_vs_base": batch_s / base_64,
            }
        )
    return {"rows": rows, "merged_vs_unmerged_max_abs_logit_diff": agreement, "repeats": repeats}


COLUMNS = {
    "model": "",
    "latency_ms_batch1": ".1f",
    "latency_vs_base": ".3f",
    "seq_per_s_batch64": ".1f",
    "batch64_time_vs_base": ".3f",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--out", type=Path, default=RESULTS / "inference.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging

    logging.set_verbosity_error()
    env = machine()
    result = measure(args.repeats, args.warmup)
    result.update(machine=env, load_average_after=list(os.getloadavg()))
    print(markdown_table(result["rows"], COLUMNS))
    print(
        f"merged vs unmerged, max |logit diff|: {result['merged_vs_unmerged_max_abs_logit_diff']}"
    )
    print(f"load average before {env['load_average']}, after {result['load_average_after']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
