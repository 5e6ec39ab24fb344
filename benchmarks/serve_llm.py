"""Serving many adapters of SmolLM2: tokens/s and time to first token, 16 clients, loopback only.

The server runs in its own process (`python -m lorakit.serve --base smollm2`) with four adapters
made here (r=8 on every linear layer of the attention and MLP, random non-zero weights: serving
speed does not depend on what the weights learned). Each of `--clients` clients streams chat
completions one after another for `--seconds` (after `--warmup`), `--max-tokens` new tokens each
(`ignore_eos`, so every answer has the same length), greedy, on prompts from the Rotten Tomatoes
test reviews. Four settings, one server each, in this order:

    base      every request to the base model
    one       every request to one adapter
    mixed     requests spread evenly over the four adapters, mixed in each batch (the default)
    grouped   the same, with one forward per adapter in each step (`--batching grouped`)

Reported for each: tokens/s, requests, p50 / p99 time to first token, and the ratios the design
is judged by (mixed / one, mixed / grouped, one / base).

    python benchmarks/serve_llm.py      # table + benchmarks/results/serve_llm.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import LLM_LORA_OPTIONS, RESULTS, machine, markdown_table, wait_ready  # noqa: E402
from serve_load import free_port  # noqa: E402

ADAPTERS = ("a1", "a2", "a3", "a4")
SETTINGS = {  # name: (adapters requests go to, --batching)
    "base": ((None,), "mixed"),
    "one": (ADAPTERS[:1], "mixed"),
    "mixed": (ADAPTERS, "mixed"),
    "grouped": (ADAPTERS, "grouped"),
}


def make_adapters(folder: Path, base: str) -> dict[str, Path]:
    import lorakit.lora as lora
    from lorakit.models.causal_lm import load_causal_lm

    adapters = {}
    for seed, name in enumerate(ADAPTERS):
        model, _ = load_causal_lm(base)
        torch.manual_seed(seed)
        config = lora.LoraConfig(**LLM_LORA_OPTIONS, init_lora_weights="gaussian")
        model = lora.inject(model, config)
        for _, layer in lora.lora_layers(model):  # B non-zero, small: answers stay fluent
            torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
        adapters[name] = lora.save_adapter(model, folder / name)
    return adapters


def prompts() -> list[str]:
    from lorakit.data import load_dataset

    reviews = load_dataset("rotten-tomatoes")["test"]["text"]
    return [f"Is this review positive or negative? {review}" for review in reviews[:400]]


def start_server(adapters: dict[str, Path], port: int, batching: str, bf16: bool):
    command = [sys.executable, "-m", "lorakit.serve", "--base", "smollm2", "--port", str(port),
               "--log-level", "warning", "--batching", batching, "--max-batch", "32"]  # fmt: skip
    command += ["--bf16"] if bf16 else []
    for name, path in adapters.items():
        command += ["--adapter", f"{name}={path}"]
    return subprocess.Popen(command, env=os.environ.copy())


async def client(url, models, texts, max_tokens, window, rng, record) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        while time.monotonic() < window[1]:
            body = {
                "model": rng.choice(models), "max_tokens": max_tokens, "temperature": 0,
                "messages": [{"role": "user", "content": rng.choice(texts)}], "stream": True,
                "ignore_eos": True, "stream_options": {"include_usage": True},
            }  # fmt: skip
            start, first, tokens, status = time.monotonic(), None, 0, None
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                status = response.status_code
                async for line in response.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if (
                        first is None
                        and chunk["choices"]
                        and chunk["choices"][0]["delta"].get("content")
                    ):
                        first = time.monotonic()
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
            end = time.monotonic()
            if start >= window[0]:  # requests begun during warm-up are not counted
                record.append({"status": status, "ttft": (first or end) - start, "tokens": tokens,
                               "end": end})  # fmt: skip


async def load(url, models, texts, clients, seconds, warmup, max_tokens) -> dict:
    record: list[dict] = []
    begin = time.monotonic()
    window = (begin + warmup, begin + warmup + seconds)
    await asyncio.gather(*(
        client(url, models, texts, max_tokens, window, random.Random(i), record)
        for i in range(clients)
    ))  # fmt: skip
    elapsed = max(r["end"] for r in record) - window[0] if record else float("nan")
    ttft = sorted(r["ttft"] for r in record)
    cuts = statistics.quantiles(ttft, n=100) if len(ttft) > 1 else [float("nan")] * 99
    ok = [r for r in record if r["status"] == 200]
    return {
        "requests": len(record),
        "failed": len(record) - len(ok),
        "seconds": round(elapsed, 1),
        "tokens": sum(r["tokens"] for r in ok),
        "tokens_per_s": sum(r["tokens"] for r in ok) / elapsed,
        "ttft_p50_ms": 1000 * cuts[49],
        "ttft_p99_ms": 1000 * cuts[98],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--warmup", type=float, default=10)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--bf16", action="store_true", help="hold the base in bfloat16")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--out", type=Path, default=RESULTS / "serve_llm.json")
    args = parser.parse_args()

    texts = prompts()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(Path(tmp), "smollm2")
        for name in args.settings.split(","):
            models, batching = SETTINGS[name]
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            server = start_server(adapters, port, batching, args.bf16)
            try:
                wait_ready(url, server, timeout=600)
                served = [m or "smollm2" for m in models]
                result = asyncio.run(load(url, served, texts, args.clients, args.seconds,
                                          args.warmup, args.max_tokens))  # fmt: skip
            finally:
                server.terminate()
                server.wait(timeout=60)
            rows.append({"setting": name, "batching": batching, "adapters": len(served), **result})
            print(markdown_table(rows[-1:], {"setting": "s", "tokens_per_s": ".1f"}), flush=True)
    by = {row["setting"]: row["tokens_per_s"] for row in rows}
    ratios = {}
    for top, bottom in (("mixed", "one"), ("mixed", "grouped"), ("one", "base")):
        if top in by and bottom in by:
            ratios[f"{top}/{bottom}"] = round(by[top] / by[bottom], 3)
    report = {
        "benchmark": "serve_llm",
        "command": " ".join(["python benchmarks/serve_llm.py", *sys.argv[1:]]),
        "machine": machine(),
        "base": f"SmolLM2-135M-Instruct ({'bf16' if args.bf16 else 'fp32'})",
        "adapters": "4 random adapters, r=8, alpha=16, every attention and MLP projection",
        "clients": args.clients,
        "max_tokens": args.max_tokens,
        "rows": rows,
        "ratios": ratios,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    columns = {"setting": "s", "batching": "s", "adapters": "d", "requests": "d", "failed": "d",
               "tokens_per_s": ".1f", "ttft_p50_ms": ".0f", "ttft_p99_ms": ".0f"}  # fmt: skip
    print(markdown_table(rows, columns))
    print("ratios of tokens/s:", ratios)
    print(f"wrote {args.out}")
    return 1 if any(row["failed"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
