"""A bounded load test of `lorakit serve`: 16 concurrent clients for 30 s, loopback only.

The server runs in its own process (`python -m lorakit.serve`, the real MiniLM base) with two
adapters on it: one with 2 labels (review snippets) and one with 5 (news openings). Unless
adapters are given, both are made here with random non-zero LoRA weights (r=8 on query, key,
value) and a head each: the speed of serving does not depend on what the weights learned.
Each client sends requests one after another, `--texts` texts each, to a randomly chosen
adapter. Reported: requests and texts per second, p50 / p99 latency, and the count of 5xx
(which must be zero; the script exits 1 otherwise).

    python benchmarks/serve_load.py        # table + benchmarks/results/serve_load.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, machine, markdown_table, minilm, wait_ready  # noqa: E402


def make_adapter(folder: Path, num_labels: int, seed: int) -> Path:
    import lorakit.lora as lora

    model = minilm(num_labels)
    torch.manual_seed(seed)
    config = lora.LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["query", "key", "value"],
        modules_to_save=["classifier"],
        init_lora_weights=False,
    )
    return lora.save_adapter(lora.inject(model, config), folder)


def texts_for(adapter: str) -> list[str]:
    from lorakit.data import load_dataset

    if adapter == "topics":
        return [t[:600] for t in load_dataset("bbc-news")["test"]["text"]]
    return list(load_dataset("rotten-tomatoes")["test"]["text"])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(adapters: dict[str, Path], port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "lorakit.serve", "--base", "minilm", "--port", str(port),
               "--host", "127.0.0.1", "--log-level", "warning"]  # fmt: skip
    for name, path in adapters.items():
        command += ["--adapter", f"{name}={path}"]
    return subprocess.Popen(command, env=os.environ.copy())


async def client(url, texts, per_request, until, rng, latencies, statuses, window) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        while time.monotonic() < until:
            adapter = rng.choice(sorted(texts))
            body = {"adapter": adapter, "texts": rng.sample(texts[adapter], per_request)}
            start = time.monotonic()
            try:
                response = await http.post("/v1/predict", json=body)
                status = response.status_code
            except httpx.HTTPError as error:
                status = type(error).__name__
            end = time.monotonic()
            if start >= window[0]:  # requests begun during warm-up are not counted
                latencies.append(end - start)
                statuses[status] += 1


async def load(url, texts, clients, seconds, per_request, warmup) -> dict:
    latencies: list[float] = []
    statuses: Counter = Counter()
    begin = time.monotonic()
    window = (begin + warmup, begin + warmup + seconds)
    rngs = [random.Random(i) for i in range(clients)]
    await asyncio.gather(
        *(
            client(url, texts, per_request, window[1], rng, latencies, statuses, window)
            for rng in rngs
        )
    )
    elapsed = time.monotonic() - window[0]
    cuts = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [float("nan")] * 99
    ok = statuses.get(200, 0)
    return {
        "clients": clients,
        "seconds": round(elapsed, 2),
        "texts_per_request": per_request,
        "requests": len(latencies),
        "ok": ok,
        "requests_per_s": ok / elapsed,
        "texts_per_s": ok * per_request / elapsed,
        "p50_ms": 1000 * cuts[49],
        "p99_ms": 1000 * cuts[98],
        "max_ms": 1000 * max(latencies, default=float("nan")),
        "status_5xx": sum(n for s, n in statuses.items() if isinstance(s, int) and s >= 500),
        "statuses": {str(s): n for s, n in statuses.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--warmup", type=float, default=3)
    parser.add_argument("--texts", type=int, default=4, help="texts per request")
    parser.add_argument("--out", type=Path, default=RESULTS / "serve_load.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        adapters = {
            "sentiment": make_adapter(Path(tmp, "sentiment"), 2, seed=1),
            "topics": make_adapter(Path(tmp, "topics"), 5, seed=2),
        }
        texts = {name: texts_for(name) for name in adapters}
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_server(adapters, port)
        try:
            wait_ready(url, server)
            load_before = os.getloadavg()
            result = asyncio.run(
                load(url, texts, args.clients, args.seconds, args.texts, args.warmup)
            )
            load_after = os.getloadavg()
        finally:
            server.terminate()
            server.wait(timeout=30)

    report = {
        "benchmark": "serve_load",
        "command": " ".join(["python benchmarks/serve_load.py", *sys.argv[1:]]),
        "machine": machine(),
        "base": "all-MiniLM-L6-v2 (fp32)",
        "adapters": {
            "sentiment": "2 labels, review snippets",
            "topics": "5 labels, news (600 chars)",
        },
        "load_average_before": load_before,
        "load_average_after": load_after,
        "result": result,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    columns = {"clients": "d", "seconds": ".1f", "texts_per_request": "d", "requests": "d",
               "requests_per_s": ".1f", "texts_per_s": ".1f", "p50_ms": ".0f", "p99_ms": ".0f",
               "max_ms": ".0f", "status_5xx": "d"}  # fmt: skip
    print(markdown_table([result], columns))
    print(f"statuses: {result['statuses']}; load average before {load_before}, after {load_after}")
    print(f"wrote {args.out}")
    return 1 if result["status_5xx"] else 0


if __name__ == "__main__":
    sys.exit(main())
