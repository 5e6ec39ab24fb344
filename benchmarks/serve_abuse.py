"""Attacks on a live `lorakit serve` while 16 clients send good requests, loopback only.

The server runs in its own process (`python -m lorakit.serve`, a tiny BERT with MiniLM's
tokenizer unless `--base minilm`) with two adapters, 2 and 5 labels. While the clients send good
requests, each attack runs in turn:

    bad_text        requests whose texts hold a lone UTF-16 surrogate         -> 422 each
    chunked_upload  a chunked body of --upload-mb MB with no Content-Length   -> 413, early
    base_adapter    loading an adapter that trains base biases (bias="all")  -> 422
    regex           target_modules "(.*.*)*Z" and "(.|..)*y.", catastrophic   -> 422 each
    huge_rank       an adapter with r = 20000                                  -> 422
    nan_weights     an adapter whose LoRA weights are NaN                      -> 422
    admin_no_key    loading an adapter without the API key                     -> 401

Reported: good requests that failed
(must be 0), peak server RSS during the chunked upload against its RSS at rest (within 100 MB),
the longest /healthz answer (under 200 ms), and whether the other adapters' outputs are
bit-identical before and after the attacks. Exits 1 when one of these fails.

    python benchmarks/serve_abuse.py      # table + benchmarks/results/serve_abuse.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, machine, markdown_table, minilm, minilm_path, wait_ready  # noqa: E402

KEY = "abuse-benchmark-key"
TEXTS = ["a wonderful, moving film", "dull", "the plot drags on and on without any point at all"]


# ---------------------------------------------------------------- the server and its files
def tiny_base(folder: Path) -> Path:
    """A 2-layer BERT (width 32) with MiniLM's tokenizer, saved as a model folder."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=128, num_labels=2,
    )  # fmt: skip
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def classifier(base: str, num_labels: int, seed: int):
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    if base == "minilm":
        model = minilm(num_labels)
    else:
        hf_logging.set_verbosity_error()
        model = AutoModelForSequenceClassification.from_pretrained(
            base, num_labels=num_labels, ignore_mismatched_sizes=True
        )
    torch.manual_seed(seed)
    with torch.no_grad():
        model.classifier.weight.normal_(0.0, 1.0)
    return model


def make_adapter(base: str, folder: Path, num_labels: int, seed: int, **options) -> Path:
    import lorakit.lora as lora

    settings = dict(
        r=8, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"],
        init_lora_weights=False,
    )  # fmt: skip
    config = lora.LoraConfig(**{**settings, **options})
    return lora.save_adapter(lora.inject(classifier(base, num_labels, seed), config), folder)


def edited(source: Path, folder: Path, config=None, tensors=None) -> Path:
    """A copy of an adapter folder with config fields and tensors changed by the callables."""
    folder.mkdir()
    fields = json.loads((source / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(config(fields) if config else fields))
    weights = load_file(source / "adapter_model.safetensors")
    save_file(tensors(weights) if tensors else weights, folder / "adapter_model.safetensors")
    return folder


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(base: str, adapters: dict[str, Path], root: Path, port: int, extra: list[str]):
    command = [sys.executable, "-m", "lorakit.serve", "--base", base, "--port", str(port),
               "--log-level", "warning", *extra]  # fmt: skip
    for name, path in adapters.items():
        command += ["--adapter", f"{name}={path}"]
    help_text = subprocess.run(
        [sys.executable, "-m", "lorakit.serve", "--help"], capture_output=True, text=True
    ).stdout
    if "--adapter-root" in help_text:  # where the server takes adapters from, when it asks
        command += ["--adapter-root", str(root)]
    return subprocess.Popen(command, env={**os.environ, "LORAKIT_API_KEY": KEY})


# ---------------------------------------------------------------- what runs beside the attacks
def rss_bytes(pid: int) -> int:
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss
    except ImportError:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0


@dataclass
class Watch:
    """Good clients, /healthz probes and RSS samples, each in the background."""

    url: str
    pid: int
    clients: int = 16
    good: dict = field(default_factory=lambda: {"ok": 0, "failed": 0, "errors": {}})
    health: list = field(default_factory=list)  # (time, seconds)
    rss: list = field(default_factory=list)  # (time, bytes)
    stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        self.threads = [
            threading.Thread(target=lambda: asyncio.run(self._good_clients())),
            threading.Thread(target=self._probe_health),
            threading.Thread(target=self._sample_rss),
        ]
        for thread in self.threads:
            thread.start()

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()

    async def _good_clients(self) -> None:
        async def one(i: int) -> None:
            async with httpx.AsyncClient(base_url=self.url, timeout=60) as http:
                while not self.stop.is_set():
                    body = {"adapter": ["sentiment", "topics"][i % 2], "texts": TEXTS[: 1 + i % 3]}
                    try:
                        status = (await http.post("/v1/predict", json=body)).status_code
                    except httpx.HTTPError as error:
                        status = type(error).__name__
                    if status == 200:
                        self.good["ok"] += 1
                    else:
                        self.good["failed"] += 1
                        errors = self.good["errors"]
                        errors[str(status)] = errors.get(str(status), 0) + 1

        await asyncio.gather(*(one(i) for i in range(self.clients)))

    def _probe_health(self) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as http:
            while not self.stop.is_set():
                start = time.monotonic()
                http.get("/healthz")
                self.health.append((start, time.monotonic() - start))
                time.sleep(0.02)

    def _sample_rss(self) -> None:
        while not self.stop.is_set():
            self.rss.append((time.monotonic(), rss_bytes(self.pid)))
            time.sleep(0.005)

    def peak_rss(self, start: float, end: float) -> int:
        return max((b for t, b in self.rss if start <= t <= end), default=0)

    def longest_health(self, start: float = 0, end: float = float("inf")) -> float:
        return max((s for t, s in self.health if start <= t <= end), default=0.0)


def outputs(url: str) -> dict:
    """Each adapter's answer for TEXTS, asked alone (no other request batched with it)."""
    with httpx.Client(base_url=url, timeout=60) as http:
        return {
            name: http.post("/v1/predict", json={"adapter": name, "texts": TEXTS}).json()
            for name in ("sentiment", "topics")
        }


# ---------------------------------------------------------------- the attacks
@dataclass
class Context:
    url: str
    base: str
    root: Path
    upload_mb: int


def post_raw(http: httpx.Client, body: bytes) -> int:
    headers = {"Content-Type": "application/json"}
    return http.post("/v1/predict", content=body, headers=headers).status_code


def bad_text(ctx: Context) -> dict:
    body = b'{"adapter": "topics", "texts": ["fine", "cut inside an emoji \\ud83d"]}'
    with httpx.Client(base_url=ctx.url, timeout=60) as http:
        statuses = [post_raw(http, body) for _ in range(32)]
    return {"expected": "422 each", "ok": all(s == 422 for s in statuses), "statuses": statuses[:3]}


def chunked_upload(ctx: Context) -> dict:
    host, port = ctx.url.removeprefix("http://").split(":")
    total, chunk = ctx.upload_mb * 2**20, 65_536
    piece = f"{chunk:x}\r\n".encode() + b" " * chunk + b"\r\n"
    sent, answer = 0, b""
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(
            b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        try:
            while sent < total and not select.select([sock], [], [], 0)[0]:
                sock.sendall(piece)
                sent += chunk
            if sent >= total:
                sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server answered and closed while this was sending
        try:
            answer = sock.recv(65_536)
        except OSError as error:
            answer = repr(error).encode()
    status = answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/") else "none"
    return {"expected": "413 before the whole body", "ok": status == "413" and sent < total,
            "status": status, "mb_sent": round(sent / 2**20, 1)}  # fmt: skip


def load_adapter(ctx: Context, name: str, path: Path, key: str | None = KEY) -> httpx.Response:
    headers = {"X-API-Key": key} if key else {}
    with httpx.Client(base_url=ctx.url, timeout=120) as http:
        return http.post("/v1/adapters", json={"name": name, "path": str(path)}, headers=headers)


def refused(ctx: Context, name: str, path: Path, expected: int = 422, key=KEY) -> dict:
    response = load_adapter(ctx, name, path, key)
    with httpx.Client(base_url=ctx.url, timeout=60) as http:  # never leave it loaded
        http.delete(f"/v1/adapters/{name}", headers={"X-API-Key": KEY})
    detail = response.json().get("detail", "") if response.status_code != 201 else ""
    return {"expected": str(expected), "ok": response.status_code == expected,
            "status": response.status_code, "detail": detail[:160]}  # fmt: skip


def base_adapter(ctx: Context) -> dict:
    path = make_adapter(ctx.base, ctx.root / "bias-all", 2, seed=7, bias="all")
    return refused(ctx, "bias_all", path)


def regex(ctx: Context) -> dict:
    results = []
    for i, pattern in enumerate(("(.*.*)*Z", "(.|..)*y.")):  # the second one backtracks in `regex`

        def catastrophic(fields, pattern=pattern):
            return {**fields, "target_modules": pattern}

        path = edited(ctx.root / "other", ctx.root / f"regex-{i}", catastrophic)
        results.append(refused(ctx, f"regex{i}", path))
    return {**results[-1], "ok": all(r["ok"] for r in results)}


def huge_rank(ctx: Context) -> dict:
    return refused(ctx, "huge", make_adapter(ctx.base, ctx.root / "huge", 2, seed=8, r=20_000))


def nan_weights(ctx: Context) -> dict:
    def poisoned(tensors):
        return {k: v.fill_(float("nan")) if "lora_B" in k else v for k, v in tensors.items()}

    path = edited(ctx.root / "other", ctx.root / "nan", tensors=poisoned)
    return refused(ctx, "nan", path)


def admin_no_key(ctx: Context) -> dict:
    return refused(ctx, "nokey", ctx.root / "other", expected=401, key=None)


ATTACKS: dict[str, Callable[[Context], dict]] = {
    "bad_text": bad_text,
    "chunked_upload": chunked_upload,
    "base_adapter": base_adapter,
    "regex": regex,
    "huge_rank": huge_rank,
    "nan_weights": nan_weights,
    "admin_no_key": admin_no_key,
}
DEFAULT_ATTACKS = list(ATTACKS)


# ---------------------------------------------------------------- the run
def run(args, root: Path) -> dict:
    base = "minilm" if args.base == "minilm" else str(tiny_base(root / "tiny-bert"))
    adapters = {
        "sentiment": make_adapter(base, root / "sentiment", 2, seed=1),
        "topics": make_adapter(base, root / "topics", 5, seed=2),
    }
    make_adapter(base, root / "other", 2, seed=3)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(base, adapters, root, port, args.server_arg or [])
    try:
        wait_ready(url, server)
        before = outputs(url)
        watch = Watch(url, server.pid, clients=args.clients)
        watch.start()
        time.sleep(args.rest)  # RSS at rest: under the good load, before any attack
        rest_end = time.monotonic()
        context = Context(url, base, root, args.upload_mb)
        rows = []
        for name in args.attacks:
            start = time.monotonic()
            result = ATTACKS[name](context)
            time.sleep(0.2)  # what the attack left in memory shows in the samples after it
            end = time.monotonic()
            rows.append({"attack": name, **result, "seconds": round(end - start, 2),
                         "peak_rss_mb": watch.peak_rss(start, end) / 2**20,
                         "longest_healthz_ms": 1000 * watch.longest_health(start, end)})  # fmt: skip
        time.sleep(0.5)
        watch.finish()
        after = outputs(url)
    finally:
        server.terminate()
        server.wait(timeout=30)
    rest = watch.peak_rss(0, rest_end) / 2**20
    upload = next((r["peak_rss_mb"] for r in rows if r["attack"] == "chunked_upload"), None)
    summary = {
        "good_requests_ok": watch.good["ok"],
        "good_requests_failed": watch.good["failed"],
        "good_failures": watch.good["errors"],
        "rest_rss_mb": rest,
        "upload_peak_rss_mb": upload,
        "upload_rss_growth_mb": None if upload is None else upload - rest,
        "longest_healthz_ms": 1000 * watch.longest_health(),
        "outputs_bit_identical": before == after,
    }
    checks = {
        "no good request failed": summary["good_requests_failed"] == 0,
        "upload RSS within 100 MB of rest": upload is None or upload - rest <= 100,
        "longest /healthz under 200 ms": summary["longest_healthz_ms"] < 200,
        "other adapters bit-identical": summary["outputs_bit_identical"],
        "every attack answered as expected": all(r["ok"] for r in rows),
    }
    return {"attacks": rows, "summary": summary, "checks": checks}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", choices=["tiny", "minilm"], default="tiny")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--upload-mb", type=int, default=500)
    parser.add_argument("--rest", type=float, default=2.0, help="seconds of load before attacks")
    parser.add_argument(
        "--attacks", nargs="+", default=DEFAULT_ATTACKS, choices=[*ATTACKS, "all"],
        help="which attacks (default: all of them)",
    )  # fmt: skip
    parser.add_argument("--server-arg", action="append", help="one more argument for the server")
    parser.add_argument("--out", type=Path, default=RESULTS / "serve_abuse.json")
    args = parser.parse_args()
    if "all" in args.attacks:
        args.attacks = list(ATTACKS)

    with tempfile.TemporaryDirectory() as tmp:
        result = run(args, Path(tmp))
    report = {
        "benchmark": "serve_abuse",
        "command": " ".join(["python benchmarks/serve_abuse.py", *sys.argv[1:]]),
        "machine": machine(),
        "base": args.base,
        "clients": args.clients,
        **result,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    columns = {"attack": "", "expected": "", "ok": "", "seconds": ".2f", "peak_rss_mb": ".0f",
               "longest_healthz_ms": ".0f"}  # fmt: skip
    print(markdown_table(result["attacks"], columns))
    for key, value in result["summary"].items():
        print(f"{key}: {value:.1f}" if isinstance(value, float) else f"{key}: {value}")
    for check, passed in result["checks"].items():
        print(f"{'ok  ' if passed else 'FAIL'} {check}")
    print(f"wrote {args.out}")
    return 0 if all(result["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
