"""`lorakit serve` against clients that send what they should not, on servers on 127.0.0.1.

One client's bad input never touches another's request: a text that cannot be tokenized is a 422
at the edge, a request that fails in a micro-batch fails alone (a 500 that tells nothing of the
server, its detail in the log) and its connection goes on. A body is counted as it streams, so a
chunked upload stops at the limit. An adapter never writes into the base every adapter shares.
"""

from __future__ import annotations

import http.client
import json
import logging
import select
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit.lora import LoraConfig, inject, save_adapter
from lorakit.serve import AdapterRegistry, ServeSettings, create_app
from lorakit.serve.batcher import MicroBatcher
from test_serve import TEXTS, LoopbackServer, assert_error, classifier, make_adapter, predict
from tiny_models import save_tiny_bert

KEY = "hardening-key"
AUTH = {"X-API-Key": KEY}
SETTINGS = ServeSettings(max_texts=4, max_text_chars=200, batch_window_ms=20)
GOOD = [[TEXTS[i % 3], TEXTS[(i + 1) % 3]] for i in range(48)]


def with_tensors(source: Path, folder: Path, extra: dict[str, torch.Tensor]) -> Path:
    """A copy of the adapter at `source` whose file also holds `extra`."""
    folder.mkdir()
    (folder / "adapter_config.json").write_bytes((source / "adapter_config.json").read_bytes())
    tensors = load_file(source / "adapter_model.safetensors")
    save_file({**tensors, **extra}, folder / "adapter_model.safetensors")
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hardening")
    base = save_tiny_bert(root / "tiny-bert")
    bias_all = classifier(base, 2, seed=7)  # lorakit's own save_adapter writes its biases
    config = LoraConfig(
        r=4, target_modules=["query", "value"], modules_to_save=["classifier"], bias="all"
    )
    inject(bias_all, config)
    with torch.no_grad():
        bias_all.bert.pooler.dense.bias.add_(1.0)  # as training would change it
    save_adapter(bias_all, root / "bias-all", base_model_name_or_path=str(base))
    other = make_adapter(base, root / "other", num_labels=2, seed=3)
    layer = "base_model.model.bert.encoder.layer.0.attention.self"
    return {
        "base": base,
        "sentiment": make_adapter(base, root / "sentiment", num_labels=2, seed=1),
        "topics": make_adapter(base, root / "topics", num_labels=5, seed=2),
        "other": other,
        "bias_all": root / "bias-all",
        "embedding": with_tensors(
            other,
            root / "embedding",
            {"base_model.model.bert.embeddings.word_embeddings.weight": torch.zeros(1, 1)},
        ),
        "base_head": with_tensors(  # the base's own head, beside the adapter's copy of it
            other,
            root / "base-head",
            {"base_model.model.classifier.original_module.weight": torch.zeros(2, 32)},
        ),
        "foreign_lora": with_tensors(  # another adapter's LoRA weights, by their name here
            other,
            root / "foreign-lora",
            {f"{layer}.query.lora_A.sentiment.weight": torch.zeros(4, 32)},
        ),
    }


@pytest.fixture(scope="module")
def app(files):
    adapters = {"sentiment": files["sentiment"], "topics": files["topics"]}
    return create_app(
        str(files["base"]), adapters, api_key=KEY, settings=SETTINGS,
        adapter_roots=[files["bias_all"].parent],
    )  # fmt: skip


@pytest.fixture(scope="module")
def live(app):
    with LoopbackServer(app) as running:
        yield running.url


@pytest.fixture
def client(live):
    with httpx.Client(base_url=live, timeout=60) as client:
        yield client


def ask_all(url: str, jobs: list, workers: int = 16) -> list[httpx.Response]:
    """Each job (adapter, texts) or raw body bytes, from `workers` clients at once."""

    def ask(job):
        with httpx.Client(base_url=url, timeout=60) as client:
            if isinstance(job, bytes):
                headers = {"Content-Type": "application/json"}
                return client.post("/v1/predict", content=job, headers=headers)
            return client.post("/v1/predict", json={"adapter": job[0], "texts": job[1]})

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(ask, jobs))


# ---------------------------------------------------------------- texts that cannot be tokenized
def test_a_lone_surrogate_is_refused_at_the_edge_naming_the_text(client):
    body = b'{"adapter": "topics", "texts": ["fine", "cut inside an emoji \\ud83d"]}'
    response = client.post(
        "/v1/predict", content=body, headers={"Content-Type": "application/json"}
    )
    assert_error(response, 422, "invalid_input", "texts[1]", "surrogate", "U+D83D")
    # a whole emoji, escaped as JSON does it, is one character and fine
    emoji = b'{"adapter": "topics", "texts": ["\\ud83d\\ude00 great"]}'
    response = client.post(
        "/v1/predict", content=emoji, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("body", "status", "code", "fragment"),
    [
        (b'{"adapter": "topics", "texts": ["\xff\xfe"]}', 400, "malformed_json", "UTF-8"),
        (b'{"adapter": "\\ud800", "texts": ["x"]}', 422, "invalid_input", "adapter: character 0"),
        (b'{"adapter": "topics", "texts": ["x"], "\\udc00": 1}', 422, "invalid_input", ""),
    ],
)
def test_bodies_that_are_not_unicode_get_a_json_4xx(client, body, status, code, fragment):
    response = client.post(
        "/v1/predict", content=body, headers={"Content-Type": "application/json"}
    )
    assert_error(response, status, code, fragment)


def test_bad_texts_among_16_clients_fail_alone(live):
    good = [("sentiment" if i % 2 else "topics", texts) for i, texts in enumerate(GOOD)]
    bad = b'{"adapter": "topics", "texts": ["ok", "\\udfff"]}'
    jobs = [job for pair in zip(good, [bad] * len(good), strict=True) for job in pair]
    responses = ask_all(live, jobs)
    for job, response in zip(jobs, responses, strict=True):
        if isinstance(job, bytes):
            assert_error(response, 422, "invalid_input", "texts[1]")
        else:
            assert response.status_code == 200, response.text


# ---------------------------------------------------------------- a failure inside a micro-batch
class PoisonedTokenizer:
    """The registry's tokenizer, failing on any batch that holds a text with POISON in it."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, texts, **kwargs):
        if any("POISON" in text for text in texts):
            raise RuntimeError("tokenizer exploded at /srv/secret/model")
        return self.tokenizer(texts, **kwargs)


@pytest.fixture(scope="module")
def poisoned(files):
    registry = AdapterRegistry(str(files["base"]), batch_size=SETTINGS.batch_size)
    registry.load("sentiment", files["sentiment"])
    registry.tokenizer = PoisonedTokenizer(registry.tokenizer)
    with LoopbackServer(create_app(registry, settings=SETTINGS)) as running:
        yield running.url, registry


def test_a_request_that_fails_in_a_batch_fails_alone(files):
    """The batcher runs a failed group's requests one by one: only the culprit gets the error."""
    registry = AdapterRegistry(str(files["base"]))
    registry.load("two", files["other"])
    registry.tokenizer = PoisonedTokenizer(registry.tokenizer)
    batcher = MicroBatcher(registry, window=0.001)
    batcher.start()
    try:
        with registry.lock:  # everything submitted now waits and then runs as one group
            first = batcher.submit("two", ["warm up"])
            time.sleep(0.2)
            futures = [batcher.submit("two", [TEXTS[i % 3]]) for i in range(6)]
            poison = batcher.submit("two", ["POISON"])
            futures += [batcher.submit("two", [TEXTS[i % 3]]) for i in range(6)]
        first.result(timeout=30)
        for i, future in enumerate(futures):
            alone = registry.predict("two", [TEXTS[i % 6 % 3]])[1]
            assert np.array_equal(future.result(timeout=30)[1], alone)
        with pytest.raises(RuntimeError, match="exploded"):
            poison.result(timeout=30)
    finally:
        batcher.stop()


def test_a_failing_request_gets_a_generic_500_and_the_log_has_the_detail(poisoned, caplog):
    url, _ = poisoned
    jobs = [("sentiment", texts) for texts in GOOD]
    jobs[::6] = [("sentiment", ["fine", "POISON"])] * len(jobs[::6])
    with caplog.at_level(logging.ERROR, logger="lorakit.serve"):
        responses = ask_all(url, jobs)
    ids = []
    for job, response in zip(jobs, responses, strict=True):
        if "POISON" not in job[1]:
            assert response.status_code == 200, response.text
            continue
        body = assert_error(response, 500, "internal_error", "request id")
        assert "exploded" not in response.text and "secret" not in response.text
        assert response.headers["X-Request-ID"] in body["detail"]
        ids.append(response.headers["X-Request-ID"])
    logged = caplog.text
    assert "exploded at /srv/secret/model" in logged
    assert all(request_id in logged for request_id in ids)


def test_the_connection_of_a_failed_request_goes_on(poisoned):
    url, _ = poisoned
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    headers = {"Content-Type": "application/json"}

    def post(texts):
        body = json.dumps({"adapter": "sentiment", "texts": texts})
        connection.request("POST", "/v1/predict", body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()

    try:
        assert post(["POISON"])[0] == 500
        sock = connection.sock
        status, body = post(["fine"])  # on the same keep-alive connection
        assert status == 200, body
        assert connection.sock is sock
    finally:
        connection.close()


# ---------------------------------------------------------------- the body limit, as it streams
class CountingApp:
    """Counts the request body bytes the app below it reads."""

    def __init__(self, app) -> None:
        self.app = app
        self.read = 0

    async def __call__(self, scope, receive, send):
        async def counting():
            message = await receive()
            self.read += len(message.get("body", b""))
            return message

        await self.app(scope, counting, send)


def send_chunked(url: str, total: int, chunk: int = 65_536) -> tuple[bytes, int]:
    """POSTs `total` bytes in chunks without Content-Length; stops when an answer comes.
    Returns (the answer, bytes sent)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        piece = f"{chunk:x}\r\n".encode() + b" " * chunk + b"\r\n"
        sent = 0
        while sent < total and not select.select([sock], [], [], 0)[0]:
            try:
                sock.sendall(piece)
            except OSError:
                break
            sent += chunk
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < 40:
            data = sock.recv(65_536)
            if not data:
                break
            answer += data
        return answer, sent


def test_a_chunked_body_over_the_limit_stops_at_the_limit(files):
    counting = CountingApp(create_app(str(files["base"]), settings=SETTINGS))
    limit = SETTINGS.max_body_bytes()
    total = 200 * 1024 * 1024
    with LoopbackServer(counting) as running:
        stalls = []
        probing, done = threading.Event(), threading.Event()

        def probe_health():
            with httpx.Client(base_url=running.url, timeout=30) as client:
                while not done.is_set():
                    start = time.monotonic()
                    assert client.get("/healthz").status_code == 200
                    stalls.append(time.monotonic() - start)
                    probing.set()

        prober = threading.Thread(target=probe_health)
        prober.start()
        try:
            assert probing.wait(timeout=30)
            answer, sent = send_chunked(running.url, total)
        finally:
            done.set()
            prober.join()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), answer[:300]
    assert json.loads(body)["error"] == "body_too_large"
    assert f"{limit:,}" in json.loads(body)["detail"]
    assert counting.read <= limit + 65_536  # the app stopped reading at the limit
    assert sent < total / 4
    assert stalls and max(stalls) < 1.0


def test_a_declared_length_over_the_limit_is_refused_before_reading(files):
    counting = CountingApp(create_app(str(files["base"]), settings=SETTINGS))
    with LoopbackServer(counting) as running, httpx.Client(base_url=running.url) as client:
        body = b" " * (SETTINGS.max_body_bytes() + 1)
        response = client.post("/v1/predict", content=body)
        assert_error(response, 413, "body_too_large", f"{len(body):,} bytes")
        assert counting.read == 0
        assert client.get("/healthz").status_code == 200


# ---------------------------------------------------------------- the shared base
BASE_CHANGING = {
    "bias_all": "bias='all'",
    "embedding": "bert.embeddings.word_embeddings.weight",
    "base_head": "classifier.original_module.weight",
    "foreign_lora": "lora_A.sentiment.weight",
}


def base_state(model) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def test_an_adapter_that_carries_base_tensors_is_refused_and_changes_nothing(
    app, live, client, files
):
    model = app.state.registry.model
    before = {name: predict(client, name, TEXTS) for name in ("sentiment", "topics")}
    weights = base_state(model)
    during, stop = [], threading.Event()

    def keep_predicting():
        with httpx.Client(base_url=live, timeout=60) as other:
            while not stop.is_set():
                during.extend((name, predict(other, name, TEXTS)) for name in before)

    worker = threading.Thread(target=keep_predicting)
    worker.start()
    try:
        for name, fragment in BASE_CHANGING.items():
            response = client.post(
                "/v1/adapters", json={"name": name, "path": str(files[name])}, headers=AUTH
            )
            assert_error(response, 422, "adapter_does_not_fit", fragment, "base")
            assert_error(
                client.delete(f"/v1/adapters/{name}", headers=AUTH), 404, "unknown_adapter"
            )
        # an adapter that loads, then goes: the others are as they were after it too
        loaded = client.post(
            "/v1/adapters", json={"name": "other", "path": str(files["other"])}, headers=AUTH
        )
        assert loaded.status_code == 201, loaded.text
        assert client.delete("/v1/adapters/other", headers=AUTH).status_code == 200
    finally:
        stop.set()
        worker.join()
    assert during
    for name, rows in during:
        assert np.array_equal(rows, before[name])
    for name in before:
        assert np.array_equal(predict(client, name, TEXTS), before[name])
    after = base_state(model)
    assert after.keys() == weights.keys()
    assert all(torch.equal(after[name], weights[name]) for name in weights)
