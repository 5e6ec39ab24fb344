"""Attacks on a live `lorakit serve` of a causal LM while 16 clients chat with it, loopback only.

The server runs in its own process (`python -m lorakit.serve`, a tiny random Llama with SmolLM2's
tokenizer and chat template unless `--base smollm2`) with two random adapters. Sixteen good
clients send greedy requests one after another, streaming and not, chat and plain completions, to
the adapters and the base, for `--seconds`; after `--rest` seconds each attack runs in turn:

    bad_text         prompts, message contents, stops holding a lone UTF-16 surrogate  -> 422 each
    huge_max_tokens  max_tokens 10**9; a prompt longer than the model's positions      -> 422 each
    huge_body        a chunked body of --upload-mb MB with no Content-Length           -> 413, early
    bad_params       n=2, logprobs, an unknown model, temperature -1, five stops        -> 4xx each
    disconnects      50 clients that stream max_tokens=200 and hang up at the first chunk:
                     the batch is back to the good clients' rows within a few steps
    admin_no_key     loading an adapter without the key -> 401; a DoRA adapter, one with
                     modules_to_save, a path outside the adapter root, with the key     -> 422 each

Every error answer must be OpenAI's shape, {"error": {"message": ...}}. Reported: good requests
that failed (must be 0), rows left running or queued once the clients stop (must be 0), peak
server RSS against its RSS at rest (the upload within 100 MB of it), the longest /healthz answer,
whether each good request's greedy answer, asked alone, is identical before and after the
attacks, and tracebacks in the server's log (must be none). Exits 1 when a check fails.

    python benchmarks/serve_llm_abuse.py      # table + benchmarks/results/serve_llm_abuse.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, machine, markdown_table, wait_ready  # noqa: E402
from serve_abuse import Watch, free_port  # noqa: E402

KEY = "llm-abuse-benchmark-key"
ADAPTERS = {"a1": (4, ["q_proj", "v_proj"]), "a2": (8, "all-linear")}  # name: (rank, targets)
PROMPTS = [
    "Is this review fresh or rotten? A moving, funny film.",
    "Say hello.",
    "Summarize: the plot is thin, the actors are tired, and the ending arrives far too late.",
]
GOOD_TOKENS = 12  # max_tokens of a good request
DISCONNECTING = 50
HASTY = 10  # clients that hang up before any answer
GONE = "gone"  # the adapter of the clients that hang up
SETTLE_STEPS = 10  # decoding steps the batch may take to drop the rows of hung-up clients


# ---------------------------------------------------------------- the server and its files
def tiny_base(folder: Path) -> Path:
    """A 2-layer random Llama (width 32, 512 positions) with SmolLM2's tokenizer and chat
    template, saved as a model folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lorakit.models.gguf import converted_folder, smollm2_gguf

    tokenizer = AutoTokenizer.from_pretrained(converted_folder(smollm2_gguf()))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def random_adapter(base: str, folder: Path, seed: int, r: int, targets, **options) -> Path:
    """An adapter of random A and B (so it answers otherwise than the base) saved to `folder`."""
    import lorakit.lora as lora
    from lorakit.models.causal_lm import load_causal_lm

    model, _ = load_causal_lm(base)
    torch.manual_seed(seed)
    config = lora.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, **options)
    model = lora.inject(model, config)
    for _, layer in lora.lora_layers(model):  # small: a real model's answers stay fluent
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
    return lora.save_adapter(model, folder)


def positions_of(base: str) -> int:
    from lorakit.models.causal_lm import load_causal_lm, max_positions

    return max_positions(load_causal_lm(base)[0])


def start_server(base: str, adapters: dict[str, Path], root: Path, port: int, log: Path,
                 extra: list[str]) -> subprocess.Popen:  # fmt: skip
    command = [sys.executable, "-m", "lorakit.serve", "--base", base, "--port", str(port),
               "--log-level", "warning", "--adapter-root", str(root), *extra]  # fmt: skip
    for name, path in adapters.items():
        command += ["--adapter", f"{name}={path}"]
    with log.open("wb") as out:
        return subprocess.Popen(command, env={**os.environ, "LORAKIT_API_KEY": KEY},
                                stdout=out, stderr=subprocess.STDOUT)  # fmt: skip


# ---------------------------------------------------------------- good requests
@dataclass(frozen=True)
class Job:
    model: str
    endpoint: str  # "chat" or "completions"
    stream: bool
    prompt: str

    def body(self) -> dict:
        body = {"model": self.model, "max_tokens": GOOD_TOKENS, "temperature": 0,
                "stream": self.stream}  # fmt: skip
        if self.endpoint == "chat":
            return {**body, "messages": [{"role": "user", "content": self.prompt}]}
        return {**body, "prompt": self.prompt}

    def path(self) -> str:
        return "/v1/chat/completions" if self.endpoint == "chat" else "/v1/completions"


def good_jobs(base_name: str) -> list[Job]:
    """Every model, endpoint and way of answering, each with a prompt of its own."""
    combos = product([*ADAPTERS, base_name], ("chat", "completions"), (False, True))
    return [Job(*combo, PROMPTS[i % len(PROMPTS)]) for i, combo in enumerate(combos)]


class BadAnswer(Exception):
    pass


def _text_of(job: Job, choice: dict) -> str:
    if job.endpoint == "chat":
        return (choice.get("delta") or choice.get("message") or {}).get("content") or ""
    return choice.get("text") or ""


async def ask(http: httpx.AsyncClient, job: Job) -> str:
    """The answer's text; BadAnswer when the answer is not a whole, well-formed one."""
    if not job.stream:
        response = await http.post(job.path(), json=job.body())
        if response.status_code != 200:
            raise BadAnswer(str(response.status_code))
        choice = response.json()["choices"][0]
        if choice["finish_reason"] not in ("stop", "length"):
            raise BadAnswer(f"finish_reason {choice['finish_reason']}")
        return _text_of(job, choice)
    text, finish, done = [], None, False
    async with http.stream("POST", job.path(), json=job.body()) as response:
        if response.status_code != 200:
            raise BadAnswer(str(response.status_code))
        async for line in response.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise BadAnswer("error event")
                for choice in chunk["choices"]:
                    text.append(_text_of(job, choice))
                    finish = choice.get("finish_reason") or finish
    if not done or finish not in ("stop", "length"):
        raise BadAnswer("stream cut short")
    return "".join(text)


def answers_alone(url: str, jobs: list[Job]) -> dict[str, str]:
    """Each job's answer asked alone, one after another."""

    async def all_of_them():
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            return {repr(job): await ask(http, job) for job in jobs}

    return asyncio.run(all_of_them())


# ---------------------------------------------------------------- what runs beside the attacks
@dataclass
class ChatWatch(Watch):
    """`Watch` (good clients, /healthz probes, RSS samples) whose clients ask `jobs` in turn and
    count the answers unlike `alone`, the same request's answer asked alone."""

    jobs: list[Job] = field(default_factory=list)
    alone: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.good["unlike_alone"] = 0

    async def _good_clients(self) -> None:
        async def one(i: int) -> None:
            async with httpx.AsyncClient(base_url=self.url, timeout=60) as http:
                turn = i
                while not self.stop.is_set():
                    job = self.jobs[turn % len(self.jobs)]
                    turn += 1
                    try:
                        text = await ask(http, job)
                    except Exception as error:  # noqa: BLE001 - each way of failing counts
                        self.good["failed"] += 1
                        name = str(error) if isinstance(error, BadAnswer) else type(error).__name__
                        self.good["errors"][name] = self.good["errors"].get(name, 0) + 1
                        continue
                    self.good["ok"] += 1
                    self.good["unlike_alone"] += text != self.alone[repr(job)]

        await asyncio.gather(*(one(i) for i in range(self.clients)))


def gauges(http: httpx.Client) -> dict[str, float]:
    """Running rows, queue length and decoding steps so far, from /metrics."""
    text = http.get("/metrics").text
    names = {"running": "lorakit_running_requests", "queue": "lorakit_queue_length",
             "steps": "lorakit_batch_size_count"}  # fmt: skip
    found = {}
    for key, name in names.items():
        match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
        found[key] = float(match.group(1)) if match else float("nan")
    return found


def metric(http: httpx.Client, name: str, model: str) -> float:
    """A counter of /metrics summed over the series of `model`."""
    pattern = rf'^{name}{{[^}}]*model="{re.escape(model)}"[^}}]*}} (\S+)$'
    return sum(float(v) for v in re.findall(pattern, http.get("/metrics").text, re.MULTILINE))


def drained(http: httpx.Client, most: int, timeout: float) -> dict:
    """Polls /metrics until at most `most` rows run and none wait (or `timeout` s pass): the
    last gauges."""
    deadline = time.monotonic() + timeout
    while True:
        now = gauges(http)
        if (now["running"] <= most and now["queue"] == 0) or time.monotonic() > deadline:
            return now
        time.sleep(0.01)


# ---------------------------------------------------------------- the attacks
@dataclass
class Context:
    url: str
    base: str
    base_name: str
    root: Path
    positions: int
    upload_mb: int
    clients: int


def openai_shaped(response: httpx.Response) -> bool:
    try:
        error = response.json()["error"]
        return isinstance(error, dict) and bool(error.get("message"))
    except (ValueError, KeyError, TypeError):
        return False


def expect(responses: list[httpx.Response], status: int | Callable[[int], bool]) -> dict:
    """Whether every answer has `status` (or passes it) in OpenAI's error shape."""
    good = status if callable(status) else (lambda s: s == status)
    ok = all(good(r.status_code) and openai_shaped(r) for r in responses)
    wrong = [r for r in responses if not (good(r.status_code) and openai_shaped(r))]
    detail = (wrong or responses)[0].text[:160] if responses else ""
    return {"ok": ok, "statuses": sorted({r.status_code for r in responses}), "detail": detail}


def post_raw(http: httpx.Client, path: str, body: bytes) -> httpx.Response:
    return http.post(path, content=body, headers={"Content-Type": "application/json"})


def bad_text(ctx: Context) -> dict:
    model = json.dumps(ctx.base_name)
    bodies = [
        ("/v1/completions", f'{{"model": {model}, "prompt": "cut inside an emoji \\ud83d"}}'),
        ("/v1/completions", '{"model": "a1", "prompt": ["\\udc00 the other half"]}'),
        ("/v1/completions", '{"model": "a2", "prompt": "fine", "stop": ["\\ud83d"]}'),
        ("/v1/chat/completions",
         '{"model": "a1", "messages": [{"role": "user", "content": "hi \\ud83d"}]}'),
        ("/v1/chat/completions", '{"model": "a2", "messages": [{"role": "user", "content": '
         '[{"type": "text", "text": "\\ud83d"}]}]}'),
        ("/v1/chat/completions",
         '{"model": "\\ud83d", "messages": [{"role": "user", "content": "hi"}]}'),
    ]  # fmt: skip
    with httpx.Client(base_url=ctx.url, timeout=60) as http:
        responses = [post_raw(http, path, body.encode()) for _ in range(8) for path, body in bodies]
    return {"expected": "422 each", **expect(responses, 422)}


def huge_max_tokens(ctx: Context) -> dict:
    chat = {"model": "a1", "messages": [{"role": "user", "content": "hi"}]}
    words = " a" * (ctx.positions + 8)  # one token each: more tokens than the model has positions
    near = " a" * (ctx.positions - 8)
    bodies = [
        ("/v1/completions", {"model": "a2", "prompt": "hi", "max_tokens": 10**9}),
        ("/v1/completions", {"model": ctx.base_name, "prompt": "hi", "max_tokens": 10**30}),
        ("/v1/chat/completions", {**chat, "max_tokens": 10**9}),
        ("/v1/chat/completions", {**chat, "max_completion_tokens": 10**9}),
        ("/v1/completions", {"model": "a1", "prompt": words}),
        ("/v1/completions", {"model": "a2", "prompt": near, "max_tokens": 64, "stream": True}),
        ("/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": words}]}),
    ]
    with httpx.Client(base_url=ctx.url, timeout=60) as http:
        responses = [http.post(path, json=body) for path, body in bodies]
    return {"expected": "422 each", **expect(responses, 422)}


def huge_body(ctx: Context) -> dict:
    """A chunked upload without Content-Length, then one that declares a terabyte: 413 both,
    before the body is read."""
    host, port = ctx.url.removeprefix("http://").split(":")
    total, chunk = ctx.upload_mb * 2**20, 65_536
    piece = f"{chunk:x}\r\n".encode() + b" " * chunk + b"\r\n"
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    sent, answers = 0, []
    for declared in (False, True):
        with socket.create_connection((host, int(port)), timeout=60) as sock:
            length = b"Content-Length: 1000000000000\r\n" if declared else b""
            sock.sendall(head + (length or b"Transfer-Encoding: chunked\r\n") + b"\r\n")
            try:
                while not declared and sent < total and not _readable(sock):
                    sock.sendall(piece)
                    sent += chunk
                if not declared and sent >= total:
                    sock.sendall(b"0\r\n\r\n")
            except OSError:
                pass  # the server answered and closed while this was sending
            answers.append(_whole_answer(sock))
    statuses = [_status(answer) for answer in answers]
    shaped = all(_openai_shaped_raw(answer) for answer in answers)
    return {"expected": "413 early", "ok": statuses == ["413", "413"] and sent < total and shaped,
            "statuses": statuses, "detail": f"{sent / 2**20:.1f} MB sent; "
            + answers[0].partition(b"\r\n\r\n")[2][:120].decode(errors="replace")}  # fmt: skip


def _readable(sock: socket.socket) -> bool:
    import select

    return bool(select.select([sock], [], [], 0)[0])


def _whole_answer(sock: socket.socket) -> bytes:
    answer = b""
    try:
        while len(answer) < 65_536:
            data = sock.recv(65_536)
            if not data:
                break
            answer += data
            if b"\r\n\r\n" in answer and answer.endswith(b"}"):
                break
    except OSError as error:
        answer = answer or repr(error).encode()
    return answer


def _status(answer: bytes) -> str:
    return answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/") else "none"


def _openai_shaped_raw(answer: bytes) -> bool:
    try:
        error = json.loads(answer.partition(b"\r\n\r\n")[2])["error"]
        return isinstance(error, dict) and bool(error.get("message"))
    except (ValueError, KeyError, TypeError):
        return False


def bad_params(ctx: Context) -> dict:
    bad = [{"n": 2}, {"logprobs": True}, {"model": "no-such-model"}, {"temperature": -1},
           {"stop": ["a", "b", "c", "d", "e"]}, {"top_p": 0}, {"max_tokens": 0},
           {"messages": [], "prompt": []}]  # fmt: skip
    chat = {"model": "a1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    plain = {"model": "a2", "prompt": "hi", "max_tokens": 4}
    with httpx.Client(base_url=ctx.url, timeout=60) as http:
        responses = [
            http.post(path, json={**body, **change})
            for change in bad
            for path, body in (("/v1/chat/completions", chat), ("/v1/completions", plain))
        ]
    return {"expected": "4xx each", **expect(responses, lambda s: 400 <= s < 500)}


def disconnects(ctx: Context) -> dict:
    """`DISCONNECTING` clients stream 200 tokens each and hang up at the first chunk, then
    `HASTY` more hang up as soon as their request is sent (streaming or not), all to an adapter
    of their own. Their rows must leave within a few decoding steps: the batch is back to the
    good clients' rows, and they decoded a few tokens each, not 200."""

    def request(i: int, stream: bool) -> tuple[str, dict]:
        body = {"model": GONE, "max_tokens": 200, "temperature": 0, "ignore_eos": True,
                "stream": stream}  # fmt: skip
        prompt = PROMPTS[i % len(PROMPTS)]
        if i % 2:
            return "/v1/chat/completions", {
                **body,
                "messages": [{"role": "user", "content": prompt}],
            }
        return "/v1/completions", {**body, "prompt": prompt}

    async def at_first_chunk(i: int) -> bool:
        path, body = request(i, stream=True)
        async with httpx.AsyncClient(base_url=ctx.url, timeout=60) as http:
            async with http.stream("POST", path, json=body) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        return response.status_code == 200  # and the client hangs up
        return False

    async def all_of_them():
        return await asyncio.gather(*(at_first_chunk(i) for i in range(DISCONNECTING)))

    with httpx.Client(base_url=ctx.url, timeout=60) as http:
        started = asyncio.run(all_of_them())
        first = settling(http, ctx.clients, DISCONNECTING)
        for i in range(HASTY):
            at_once(ctx, *request(i, stream=i % 2 == 0))
        hasty = settling(http, ctx.clients, DISCONNECTING + HASTY)
    first["tokens"] /= DISCONNECTING
    hasty["tokens"] = (hasty["tokens"] - first["tokens"] * DISCONNECTING) / HASTY
    ok = all(started) and all(
        phase["ok"] and phase["steps"] <= SETTLE_STEPS and phase["tokens"] <= SETTLE_STEPS
        for phase in (first, hasty)
    )

    def said(phase):
        return (f"{phase['rows']} rows, {phase['left']} after {phase['steps']} steps, "
                f"{phase['tokens']:.1f} tokens a request")  # fmt: skip

    return {"expected": f"<= {ctx.clients} rows in {SETTLE_STEPS} steps", "ok": ok,
            "statuses": [200] if all(started) else [],
            "detail": f"at the first chunk: {said(first)}; at once: {said(hasty)}"}  # fmt: skip


def at_once(ctx: Context, path: str, body: dict) -> None:
    """Sends a request and hangs up before any answer."""
    host, port = ctx.url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n")  # fmt: skip
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(head.encode() + data)


def settling(http: httpx.Client, clients: int, requests: int) -> dict:
    """Once the server has `requests` requests for GONE: the decoding steps until no more rows
    run than the good clients have and none waits, and the tokens GONE got once nothing of it
    decodes any more (its count still for a second)."""
    deadline = time.monotonic() + 30
    while metric(http, "lorakit_requests_total", GONE) < requests and time.monotonic() < deadline:
        time.sleep(0.01)
    then = gauges(http)
    now = drained(http, clients, timeout=30)
    tokens = metric(http, "lorakit_generated_tokens_total", GONE)
    while time.monotonic() < deadline:
        time.sleep(1)
        tokens, before = metric(http, "lorakit_generated_tokens_total", GONE), tokens
        if tokens == before:
            break
    return {"ok": now["running"] <= clients and now["queue"] == 0, "rows": int(then["running"]),
            "left": int(now["running"]), "steps": int(now["steps"] - then["steps"]),
            "tokens": tokens}  # fmt: skip


def admin_no_key(ctx: Context) -> dict:
    dora = random_adapter(ctx.base, ctx.root / "dora", 5, 4, ["q_proj"], use_dora=True)
    saved = random_adapter(ctx.base, ctx.root / "saved", 6, 4, ["q_proj"],
                           modules_to_save=["lm_head"])  # fmt: skip
    key = {"Authorization": f"Bearer {KEY}"}
    attempts = [  # (body, headers, expected status)
        ({"lora_name": "nokey", "lora_path": "a1"}, {}, 401),
        ({"lora_name": "nokey", "lora_path": "a1"}, {"Authorization": "Bearer wrong"}, 401),
        ({"lora_name": "dora", "lora_path": dora.name}, key, 422),
        ({"lora_name": "saved", "lora_path": saved.name}, key, 422),
        ({"lora_name": "outside", "lora_path": "/etc"}, key, 422),
        ({"lora_name": "outside", "lora_path": "../../.."}, key, 422),
    ]
    with httpx.Client(base_url=ctx.url, timeout=120) as http:
        responses = [http.post("/v1/load_lora_adapter", json=body, headers=headers)
                     for body, headers, _ in attempts]  # fmt: skip
        served = {card["id"] for card in http.get("/v1/models").json()["data"]}
    ok = all(
        r.status_code == expected and openai_shaped(r)
        for r, (_, _, expected) in zip(responses, attempts, strict=True)
    )
    result = expect(responses, lambda s: True)
    leaked = served - {*ADAPTERS, GONE, ctx.base_name}
    return {**result, "expected": "401, 401, 422 x4", "ok": ok and not leaked,
            "detail": f"served after: {sorted(served)}; " + result["detail"]}  # fmt: skip


ATTACKS: dict[str, Callable[[Context], dict]] = {
    "bad_text": bad_text,
    "huge_max_tokens": huge_max_tokens,
    "huge_body": huge_body,
    "bad_params": bad_params,
    "disconnects": disconnects,
    "admin_no_key": admin_no_key,
}


# ---------------------------------------------------------------- the run
def tracebacks(log: Path) -> list[str]:
    """The last line of each traceback in the server's log (the exception)."""
    lines = log.read_text(errors="replace").splitlines()
    found, inside = [], False
    for line in lines:
        if line.startswith("Traceback"):
            inside = True
        elif inside and line and not line.startswith((" ", "\t")):
            found.append(line[:200])
            inside = False
    return found


def run(args, root: Path) -> dict:
    base = "smollm2" if args.base == "smollm2" else str(tiny_base(root / "tiny-llama"))
    adapters = {
        name: random_adapter(base, root / name, seed, r, targets)
        for seed, (name, (r, targets)) in enumerate({**ADAPTERS, GONE: (4, "all-linear")}.items())
    }
    port, log = free_port(), root / "server.log"
    url = f"http://127.0.0.1:{port}"
    server = start_server(base, adapters, root, port, log, args.server_arg or [])
    try:
        wait_ready(url, server)
        base_name = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        jobs = good_jobs(base_name)
        before = answers_alone(url, jobs)
        watch = ChatWatch(url, server.pid, clients=args.clients, jobs=jobs, alone=before)
        begin = time.monotonic()
        watch.start()
        time.sleep(args.rest)  # RSS at rest: under the good load, before any attack
        rest_end = time.monotonic()
        context = Context(url, base, base_name, root, positions_of(base), args.upload_mb,
                          args.clients)  # fmt: skip
        rows = []
        for name in args.attacks:
            start = time.monotonic()
            result = ATTACKS[name](context)
            time.sleep(0.2)  # what the attack left in memory shows in the samples after it
            end = time.monotonic()
            rows.append({"attack": name, **result, "seconds": round(end - start, 2),
                         "peak_rss_mb": watch.peak_rss(start, end) / 2**20,
                         "longest_healthz_ms": 1000 * watch.longest_health(start, end)})  # fmt: skip
        time.sleep(max(0.5, args.seconds - (time.monotonic() - begin)))
        watch.finish()
        with httpx.Client(base_url=url, timeout=60) as http:
            left = drained(http, 0, timeout=10)
        after = answers_alone(url, jobs)
        alive = server.poll() is None
    finally:
        server.terminate()
        server.wait(timeout=30)
    errors = tracebacks(log)
    rest = watch.peak_rss(0, rest_end) / 2**20
    upload = next((r["peak_rss_mb"] for r in rows if r["attack"] == "huge_body"), None)
    summary = {
        "good_requests_ok": watch.good["ok"],
        "good_requests_failed": watch.good["failed"],
        "good_failures": watch.good["errors"],
        "good_answers_unlike_alone": watch.good["unlike_alone"],
        "rows_left_running": int(left["running"] + left["queue"]),
        "rest_rss_mb": rest,
        "peak_rss_mb": watch.peak_rss(0, float("inf")) / 2**20,
        "upload_peak_rss_mb": upload,
        "longest_healthz_ms": 1000 * watch.longest_health(),
        "answers_identical_before_after": before == after,
        "server_tracebacks": errors[:5],
    }
    checks = {
        "no good request failed": summary["good_requests_failed"] == 0,
        "no row left running or queued": summary["rows_left_running"] == 0,
        "upload RSS within 100 MB of rest": upload is None or upload - rest <= 100,
        "greedy answers identical before and after": summary["answers_identical_before_after"],
        "every attack answered as expected": all(r["ok"] for r in rows),
        "server alive, no traceback in its log": alive and not errors,
    }
    return {"attacks": rows, "summary": summary, "checks": checks}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60,
                        help="the good clients run this long at least (the attacks within)")  # fmt: skip
    parser.add_argument("--rest", type=float, default=2.0, help="seconds of load before attacks")
    parser.add_argument("--upload-mb", type=int, default=500)
    parser.add_argument(
        "--attacks", nargs="+", default=list(ATTACKS), choices=[*ATTACKS, "all"],
        help="which attacks (default: all of them)",
    )  # fmt: skip
    parser.add_argument("--server-arg", action="append", help="one more argument for the server")
    parser.add_argument("--out", type=Path, default=RESULTS / "serve_llm_abuse.json")
    args = parser.parse_args()
    if "all" in args.attacks:
        args.attacks = list(ATTACKS)

    with tempfile.TemporaryDirectory() as tmp:
        result = run(args, Path(tmp))
    report = {
        "benchmark": "serve_llm_abuse",
        "command": " ".join(["python benchmarks/serve_llm_abuse.py", *sys.argv[1:]]),
        "machine": machine(),
        "base": args.base,
        "clients": args.clients,
        **result,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    columns = {"attack": "", "expected": "", "ok": "", "statuses": "", "seconds": ".2f",
               "peak_rss_mb": ".0f", "longest_healthz_ms": ".0f"}  # fmt: skip
    table = [{**row, "statuses": " ".join(map(str, row.get("statuses", [])))} for row in
             result["attacks"]]  # fmt: skip
    print(markdown_table(table, columns))
    for row in result["attacks"]:
        if not row["ok"]:
            print(f"{row['attack']}: {row['detail']}")
    for key, value in result["summary"].items():
        print(f"{key}: {value:.1f}" if isinstance(value, float) else f"{key}: {value}")
    for check, passed in result["checks"].items():
        print(f"{'ok  ' if passed else 'FAIL'} {check}")
    print(f"wrote {args.out}")
    return 0 if all(result["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
