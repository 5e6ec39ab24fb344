"""`lorakit serve` on a causal LM: OpenAI's API, adapters of different ranks mixed in one batch.

A tiny random Llama with SmolLM2's tokenizer and chat template, one instruct run trained on it,
and three more runs made from it with random adapters of other ranks and targets (so each one
answers differently from the base and from the others). Every greedy answer of the server,
whatever else shares its batch, must be the very tokens `lorakit generate` gives for that run.
"""

import asyncio
import json
import shutil
import threading
import time

import httpx
import openai
import pytest
import torch

import lorakit.api as lk
from lorakit.generate import generate
from lorakit.lora import LoraConfig, inject, lora_layers, save_adapter
from lorakit.models.causal_lm import load_causal_lm
from lorakit.serve.causal_registry import CausalRegistry
from lorakit.serve.decoding import BatchingSettings, ContinuousBatcher, Generation, Sampling
from lorakit.serve.openai_api import GenerationSettings, create_generation_app
from test_llm_generate import write_chats
from test_serve import LoopbackServer

KEY = "llm-key"
PROMPTS = [
    "Is this review fresh or rotten? A moving, funny film.",
    "Say hello.",
    "Summarize: the plot is thin, the actors are tired, and the ending arrives far too late.",
    "Fresh?",
    "Review 3: a dull film. Fresh or rotten?",
]
RANDOM_ADAPTERS = {  # name: (rank, targets)
    "r2": (2, ["q_proj", "v_proj"]),
    "r8": (8, "all-linear"),
    "r16": (16, ["o_proj", "down_proj", "up_proj"]),
}


@pytest.fixture(scope="module")
def runs(tiny_llama_dir, tmp_path_factory):
    """{name: run directory}: one trained run (r=8 all-linear, instruct) and three copies of it
    whose adapters are random, of other ranks and targets."""
    root = tmp_path_factory.mktemp("llm-serve")
    overrides = [f"model.name={tiny_llama_dir}", f"data.path={write_chats(root / 'chats.jsonl')}",
                 "data.max_length=64", "data.max_eval_samples=8", "train.max_steps=2",
                 "train.batch_size=8", "train.eval_batch_size=8", "train.bf16=false",
                 "train.checkpoint_every=0", "lora.r=4"]  # fmt: skip
    lk.train("instruct", out=root / "trained", overrides=overrides)
    runs = {"trained": root / "trained"}
    for seed, (name, (r, targets)) in enumerate(RANDOM_ADAPTERS.items()):
        run = root / name
        shutil.copytree(root / "trained", run)
        shutil.rmtree(run / "adapter")
        model, _ = load_causal_lm(tiny_llama_dir)
        torch.manual_seed(seed)
        config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False)
        save_adapter(inject(model, config), run / "adapter")
        runs[name] = run
    return runs


def greedy(run, prompt, max_tokens, raw=False):
    return lk.generate(run, prompt, max_new_tokens=max_tokens, temperature=0, raw=raw)


@pytest.fixture(scope="module")
def registry(tiny_llama_dir, runs):
    registry = CausalRegistry(str(tiny_llama_dir))
    for name, run in runs.items():
        registry.register(name, run)
    return registry


def decode_together(registry, jobs, mixed=True, later=(), max_tokens=12):
    """Texts of `jobs` [(adapter, prompt)], greedy, all admitted at the first step; `later` jobs
    join once the first ones have their first tokens."""
    tokenizer = registry.tokenizer
    batcher = ContinuousBatcher(
        registry.model, decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
        pad_id=registry.pad_id, prepare=registry.prepare, lock=registry.lock,
        mixed_batch=registry.mixed_batch, settings=BatchingSettings(mixed=mixed),
    )  # fmt: skip
    sizes = []
    batcher.hooks.on_step = sizes.append

    def submit(adapter, prompt):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        ids = tokenizer(ids, add_special_tokens=False)["input_ids"]
        stops = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
        return batcher.submit(Generation(adapter, ids, Sampling(max_tokens, temperature=0), stops))

    first = [submit(*job) for job in jobs]
    batcher.start()
    try:
        while later and any(g.first_token_at is None for g in first):
            time.sleep(0.005)
        rest = [submit(*job) for job in later]
        texts = [g.wait()[0] for g in first + rest]
    finally:
        batcher.stop()
    return texts, sizes


def test_a_mixed_batch_answers_each_request_as_its_run_alone(registry, runs):
    jobs = [("trained", PROMPTS[0]), ("r2", PROMPTS[1]), (None, PROMPTS[2]),
            ("r8", PROMPTS[3]), ("r16", PROMPTS[4])]  # fmt: skip
    texts, sizes = decode_together(registry, jobs)
    assert sizes[0] == 5  # all five decoded in one batch
    base, tokenizer = load_causal_lm(registry.base)
    for (adapter, prompt), text in zip(jobs, texts, strict=True):
        if adapter is None:
            expected = generate(base, tokenizer, prompt, 12, temperature=0, chat=True, stream=False)
        else:
            expected = greedy(runs[adapter], prompt, 12)
        assert text == expected, adapter
    assert len(set(texts[1:])) == 4  # the random adapters answer their own ways, not the base's


def test_requests_joining_a_running_batch_get_the_same_tokens(registry, runs):
    jobs = [("r16", PROMPTS[2]), ("trained", PROMPTS[1])]
    later = [("r2", PROMPTS[0]), ("r8", PROMPTS[4]), ("r16", PROMPTS[3])]
    texts, _ = decode_together(registry, jobs, later=later)
    for (adapter, prompt), text in zip(jobs + later, texts, strict=True):
        assert text == greedy(runs[adapter], prompt, 12), adapter


def test_one_forward_per_adapter_gives_the_same_tokens(registry):
    jobs = [("r2", PROMPTS[0]), ("r8", PROMPTS[1]), ("r2", PROMPTS[2]), (None, PROMPTS[3])]
    assert decode_together(registry, jobs, mixed=False)[0] == decode_together(registry, jobs)[0]


# ---------------------------------------------------------------- over HTTP
@pytest.fixture(scope="module")
def live(tiny_llama_dir, runs):
    settings = GenerationSettings(max_new_tokens=64, max_adapters=2)
    app = create_generation_app(
        str(tiny_llama_dir), {"trained": runs["trained"], "r8": runs["r8"]}, api_key=KEY,
        settings=settings, adapter_roots=[runs["r2"].parent],
    )  # fmt: skip
    with LoopbackServer(app) as server:
        yield server.url, app


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=f"{live[0]}/v1", api_key="anything", max_retries=0)


def test_the_openai_client_chats_with_an_adapter(client, runs):
    reply = client.chat.completions.create(
        model="r8", messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=12,
        temperature=0,
    )  # fmt: skip
    assert reply.choices[0].message.content == greedy(runs["r8"], PROMPTS[0], 12)
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 12 and reply.usage.prompt_tokens > 10
    assert reply.model == "r8" and reply.object == "chat.completion"


def test_the_openai_client_streams_chat_chunks(client, runs):
    stream = client.chat.completions.create(
        model="trained", messages=[{"role": "user", "content": PROMPTS[1]}], max_tokens=12,
        temperature=0, stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == greedy(runs["trained"], PROMPTS[1], 12)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens >= 1


def test_the_openai_client_completes_text_streaming_or_not(client, runs):
    whole = client.completions.create(model="r8", prompt=PROMPTS[2], max_tokens=10, temperature=0)
    assert whole.choices[0].text == greedy(runs["r8"], PROMPTS[2], 10, raw=True)
    assert whole.usage.completion_tokens == 10 and whole.choices[0].finish_reason == "length"
    streamed = client.completions.create(
        model="r8", prompt=PROMPTS[2], max_tokens=10, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text


def test_a_stop_string_ends_the_text_before_it(client):
    whole = client.completions.create(model="r8", prompt=PROMPTS[2], max_tokens=10, temperature=0)
    text = whole.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = client.completions.create(
        model="r8", prompt=PROMPTS[2], max_tokens=10, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_a_seed_makes_sampling_repeatable(client):
    def sample(seed):
        return (
            client.completions.create(
                model="trained", prompt="Say", max_tokens=8, temperature=1.0, seed=seed
            )
            .choices[0]
            .text
        )

    assert sample(7) == sample(7)
    assert len({sample(seed) for seed in range(4)}) > 1


def test_models_lists_the_base_and_the_adapters(client, tiny_llama_dir):
    ids = [m.id for m in client.models.list()]
    assert ids == [tiny_llama_dir.name, "r8", "trained"]


def test_bad_requests_get_one_line_errors(client):
    with pytest.raises(openai.NotFoundError, match="no model named 'nope'.*trained"):
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    with pytest.raises(openai.UnprocessableEntityError, match="at most 64 tokens"):
        client.completions.create(model="r8", prompt="hi", max_tokens=100_000)
    with pytest.raises(openai.UnprocessableEntityError, match="n: not served|n must be 1"):
        client.completions.create(model="r8", prompt="hi", max_tokens=2, n=2)


def test_invalid_fields_are_named_as_the_client_wrote_them(live):
    url, _ = live

    def message(path, body: bytes) -> str:
        headers = {"Content-Type": "application/json"}
        answer = httpx.post(f"{url}{path}", content=body, headers=headers, timeout=30)
        assert answer.status_code == 422
        return answer.json()["error"]["message"]

    cut = message("/v1/completions", b'{"model": "r8", "prompt": "x \\ud83d"}')
    assert (
        cut.startswith("prompt: character 2 is half of a UTF-16 surrogate pair") and ";" not in cut
    )
    part = (b'{"model": "r8", "messages": [{"role": "user", "content": '
            b'[{"type": "text", "text": "\\ud83d"}]}]}')  # fmt: skip
    assert message("/v1/chat/completions", part).startswith("messages[0].content[0].text: char")
    n = message("/v1/completions", b'{"model": "r8", "prompt": "x", "n": 2}')
    assert n == "n: not served by lorakit; leave them out (n must be 1)"


def test_the_adapter_cache_evicts_and_reloads(live, client, runs):
    url, app = live
    registry = app.state.registry
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"lora_name": "r2", "lora_path": "r2"}
    answer = httpx.post(f"{url}/v1/load_lora_adapter", json=body, headers=headers, timeout=60)
    assert answer.status_code == 200, answer.text
    assert len(registry.loaded) == 2 and "r2" in registry.loaded  # max_adapters = 2
    for name in ("trained", "r8", "r2"):  # each comes back from disk when asked for
        reply = client.completions.create(
            model=name, prompt=PROMPTS[1], max_tokens=6, temperature=0
        )
        assert reply.choices[0].text == greedy(runs[name], PROMPTS[1], 6, raw=True)
    assert registry.evictions >= 2
    metrics = httpx.get(f"{url}/metrics").text
    assert 'lorakit_requests_total{endpoint="completions",model="r2"}' in metrics
    assert "lorakit_time_to_first_token_seconds_count" in metrics
    assert httpx.post(f"{url}/v1/load_lora_adapter", json=body).status_code == 401
    gone = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "r2"}, headers=headers)
    assert gone.status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="r2", prompt="hi", max_tokens=2)


def test_a_client_that_leaves_mid_stream_leaves_the_batch(live):
    url, app = live
    batcher = app.state.batcher
    body = {"model": "r8", "prompt": "Say", "max_tokens": 64, "stream": True, "temperature": 1}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as stream:
        for line in stream.iter_lines():
            if line.startswith("data: {"):
                break  # one chunk, then the client hangs up
    deadline = time.monotonic() + 10
    while batcher.running() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert batcher.running() == 0 and batcher.waiting() == 0
    assert json.loads(line.removeprefix("data: "))["object"] == "text_completion"
    ok = httpx.post(f"{url}/v1/completions", json={**body, "stream": False, "max_tokens": 3})
    assert ok.status_code == 200  # and the server goes on


def call_gone_client(app, path: str, body: dict) -> list[int]:
    """Calls `app` as uvicorn does for a client that hangs up once its request is sent: every
    `receive` after the body says the client is gone. The statuses the app answered with."""
    data = json.dumps(body).encode()
    messages = [{"type": "http.request", "body": data, "more_body": False}]
    sent = []

    async def receive():  # without suspending, as uvicorn's once its client is gone
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.start":
            sent.append(message["status"])

    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(),
        "query_string": b"", "root_path": "", "client": ("127.0.0.1", 9), "server": None,
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(data))],
    }  # fmt: skip
    asyncio.run(app(scope, receive, send))
    return sent


def test_a_stream_whose_client_left_before_its_first_token_leaves_the_batch(live, monkeypatch):
    """The response never starts (its client is gone when the first token comes), and the row
    leaves the batch all the same, rather than decoding max_tokens for nobody."""
    _, app = live
    batcher, submitted = app.state.batcher, []
    submit = batcher.submit
    monkeypatch.setattr(batcher, "submit", lambda g: submitted.append(g) or submit(g))
    body = {"model": "r8", "prompt": "Say", "max_tokens": 64, "stream": True, "ignore_eos": True}
    call_gone_client(app, "/v1/completions", body)
    assert len(submitted) == 1 and submitted[0].cancelled.is_set()
    deadline = time.monotonic() + 10
    while batcher.running() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(submitted[0].tokens) < 64


def test_a_whole_answer_whose_client_left_is_no_server_error(live, caplog):
    _, app = live
    chat = {"model": "r8", "messages": [{"role": "user", "content": "Say"}], "max_tokens": 64,
            "ignore_eos": True}  # fmt: skip
    for path, body in (
        ("/v1/chat/completions", chat),
        ("/v1/completions", {**chat, "prompt": "Say"}),
    ):
        with caplog.at_level("ERROR", logger="lorakit.serve"):
            statuses = call_gone_client(app, path, body)
        assert 500 not in statuses and not caplog.records, path


def test_the_body_limit_and_internal_errors_answer_in_openai_shape(live, monkeypatch):
    url, app = live
    too_long = {"model": "r8", "prompt": "a" * 400_000}
    answer = httpx.post(f"{url}/v1/completions", json=too_long, timeout=30)
    assert answer.status_code == 413
    assert "at most" in answer.json()["error"]["message"]

    def broken():
        raise RuntimeError("a bug")

    monkeypatch.setattr(app.state.registry, "names", broken)
    answer = httpx.get(f"{url}/v1/models", timeout=30)
    assert answer.status_code == 500
    assert "request id" in answer.json()["error"]["message"]


def test_concurrent_clients_of_many_adapters(live, runs):
    url, _ = live
    jobs = [(name, prompt) for name in ("trained", "r8") for prompt in PROMPTS[:3]]
    results = {}

    def ask(job):
        body = {"model": job[0], "prompt": job[1], "max_tokens": 8, "temperature": 0}
        results[job] = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()

    threads = [threading.Thread(target=ask, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for (name, prompt), answer in results.items():
        assert answer["choices"][0]["text"] == greedy(runs[name], prompt, 8, raw=True)


def test_smollm2_mixed_batch_matches_each_adapter_alone(smollm2_folder, tmp_path):
    """The real model: two adapters and the base in one batch, each answer what `lorakit
    generate`'s function gives base + that adapter alone."""
    from lorakit.lora import load_adapter

    adapters = {}
    for seed, (r, targets) in enumerate([(4, ["q_proj", "v_proj"]), (8, "all-linear")]):
        model, _ = load_causal_lm(smollm2_folder)
        torch.manual_seed(seed)
        config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets)
        model = inject(model, config)
        for _, layer in lora_layers(model):  # small random updates: fluent, but not the base's
            torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
        adapters[f"s{seed}"] = save_adapter(model, tmp_path / f"s{seed}")
    registry = CausalRegistry(str(smollm2_folder))
    for name, folder in adapters.items():
        registry.register(name, folder)
    prompts = ["Name three colours.", "Is this review fresh or rotten? A dull, tired film.",
               "Write one sentence about the sea."]  # fmt: skip
    jobs = list(zip(["s0", None, "s1"], prompts, strict=True))
    texts, sizes = decode_together(registry, jobs, max_tokens=16)
    assert sizes[0] == 3
    for (name, prompt), text in zip(jobs, texts, strict=True):
        model, tokenizer = load_causal_lm(smollm2_folder)
        if name:
            model = load_adapter(model, adapters[name])
        expected = generate(model.eval(), tokenizer, prompt, 16, temperature=0, chat=True,
                            stream=False)  # fmt: skip
        assert text == expected, name
    assert len(set(texts)) == 3


def test_one_token_answers_end_at_their_prefill(client, runs):
    for stream in (False, True):
        reply = client.completions.create(
            model="r8", prompt=PROMPTS[0], max_tokens=1, temperature=0, stream=stream
        )
        chunks = list(reply) if stream else [reply]
        assert "".join(c.choices[0].text for c in chunks) == greedy(runs["r8"], PROMPTS[0], 1, True)
        assert [c.choices[0].finish_reason for c in chunks].count("length") == 1
