"""`lorakit serve` through a real HTTP client, against servers started here on 127.0.0.1.

The base is a tiny random BERT with MiniLM's tokenizer; the adapters are made with the engine
(random non-zero LoRA weights and a head each), one with 2 labels and one with 5 on one base.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from transformers import AutoTokenizer, BertForSequenceClassification
from transformers.utils import logging as hf_logging

from lorakit import api
from lorakit.lora import LoraConfig, inject, load_adapter, save_adapter
from lorakit.serve import AdapterRegistry, ServeSettings, create_app, parse_adapter_options
from lorakit.serve.batcher import MicroBatcher
from lorakit.serve.errors import AdapterLoadError, ServeError
from tiny_models import save_tiny_bert

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

KEY = "s3cret-key"
WORDS = ["great", "bad", "okay"]
TEXTS = ["a wonderful, moving film", "dull", "the plot drags on and on without any point at all"]


def classifier(base: Path, num_labels: int, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return BertForSequenceClassification.from_pretrained(
            base, num_labels=num_labels, ignore_mismatched_sizes=True
        )
    finally:
        hf_logging.set_verbosity(verbosity)


def make_adapter(base: Path, folder: Path, num_labels: int, seed: int, head: bool = True) -> Path:
    model = classifier(base, num_labels, seed)
    with torch.no_grad():  # a head that separates the classes clearly (a random one barely does)
        model.classifier.weight.normal_(0.0, 1.0)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["query", "value"],
        modules_to_save=["classifier"] if head else None,
        init_lora_weights=False,  # random non-zero B: the adapter changes the outputs
    )
    save_adapter(inject(model, config), folder, base_model_name_or_path=str(base))
    return folder


def reference_probabilities(base: Path, adapter: Path, num_labels: int, texts) -> np.ndarray:
    """Base + adapter in this process, the plain way."""
    model = load_adapter(classifier(base, num_labels, seed=123), adapter).eval()
    tokenizer = AutoTokenizer.from_pretrained(base)
    batch = tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return torch.softmax(model(**batch).logits, dim=-1).numpy()


class LoopbackServer:
    """uvicorn in a thread, on a free port of 127.0.0.1."""

    def __init__(self, app) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]})

    def __enter__(self) -> LoopbackServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve")
    base = save_tiny_bert(root / "tiny-bert")
    run = root / "run-sentiment"  # a run directory: labels come from its summary.json
    make_adapter(base, run / "adapter", num_labels=2, seed=1)
    (run / "summary.json").write_text(json.dumps({"labels": ["negative", "positive"], "seed": 1}))
    (run / "config.toml").write_text("[data]\nmax_length = 64\n")
    return {
        "base": base,
        "run": run,
        "topics": make_adapter(base, root / "topics", num_labels=5, seed=2),
        "other": make_adapter(base, root / "other", num_labels=2, seed=3),
        "no_head": make_adapter(base, root / "no-head", num_labels=2, seed=4, head=False),
        "retrained": make_adapter(  # the same shapes, other base weights
            save_tiny_bert(root / "retrained-bert", seed=1), root / "retrained", 2, seed=6
        ),
        "wide": make_adapter(
            save_tiny_bert(root / "wide-bert", hidden=48), root / "wide", num_labels=2, seed=5
        ),
    }


@pytest.fixture(scope="module")
def server(files):
    settings = ServeSettings(max_texts=4, max_text_chars=200)
    app = create_app(
        str(files["base"]),
        {"sentiment": files["run"], "topics": files["topics"]},
        api_key=KEY,
        settings=settings,
        adapter_roots=[files["base"].parent],
    )
    with LoopbackServer(app) as running, httpx.Client(base_url=running.url, timeout=30) as client:
        yield client


def predict(client: httpx.Client, adapter: str, texts) -> np.ndarray:
    response = client.post("/v1/predict", json={"adapter": adapter, "texts": list(texts)})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["adapter"] == adapter and len(body["results"]) == len(texts)
    rows = []
    for result in body["results"]:
        labels = list(result["probabilities"])
        row = np.array([result["probabilities"][label] for label in labels])
        assert result["label"] == labels[int(row.argmax())]
        assert result["probability"] == pytest.approx(row.max())
        rows.append(row)
    return np.stack(rows)


def assert_error(response: httpx.Response, status: int, code: str, *fragments: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["error"] == code, body
    for fragment in fragments:
        assert fragment in body["detail"], body
    return body


# ---------------------------------------------------------------- predictions
def test_predictions_equal_the_in_process_model_for_2_and_5_labels(server, files):
    sentiment = predict(server, "sentiment", TEXTS)
    topics = predict(server, "topics", TEXTS)
    expected_2 = reference_probabilities(files["base"], files["run"] / "adapter", 2, TEXTS)
    expected_5 = reference_probabilities(files["base"], files["topics"], 5, TEXTS)
    assert np.abs(sentiment - expected_2).max() < 1e-5
    assert np.abs(topics - expected_5).max() < 1e-5
    body = server.post("/v1/predict", json={"adapter": "topics", "texts": ["x"]}).json()
    assert list(body["results"][0]["probabilities"]) == [f"LABEL_{i}" for i in range(5)]
    body = server.post("/v1/predict", json={"adapter": "sentiment", "texts": ["x"]}).json()
    assert list(body["results"][0]["probabilities"]) == ["negative", "positive"]


def test_concurrent_requests_for_two_adapters_get_their_own_answers(server):
    """Requests arriving together are batched (grouped by adapter): each still gets its rows."""
    alone = {name: predict(server, name, TEXTS) for name in ("sentiment", "topics")}
    jobs = [("sentiment", i % 3) if i % 2 else ("topics", i % 3) for i in range(24)]

    def ask(job):
        name, i = job
        return predict(server, name, [TEXTS[i]])[0]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, jobs))
    for (name, i), row in zip(jobs, answers, strict=True):
        assert np.abs(row - alone[name][i]).max() < 1e-5


def test_the_batcher_groups_waiting_requests_by_adapter(files):
    """Requests that wait while the model is busy run as one forward call per adapter."""
    registry = AdapterRegistry(str(files["base"]))
    registry.load("five", files["topics"])  # first: the base's own head has 2 outputs
    registry.load("two", files["other"])
    calls = []
    predict_one = registry.predict
    registry.predict = lambda name, texts: (
        calls.append((name, len(texts))) or predict_one(name, texts)
    )
    batcher = MicroBatcher(registry, window=0.001)
    batcher.start()
    try:
        with registry.lock:  # the model is busy: everything submitted now waits in the queue
            first = batcher.submit("two", TEXTS)
            time.sleep(0.2)  # the worker has taken `first` and waits for the lock
            waiting = [batcher.submit(["two", "five"][i % 2], [TEXTS[i % 3]]) for i in range(8)]
        rows = [future.result(timeout=30)[1] for future in [first, *waiting]]
    finally:
        batcher.stop()
    assert calls == [("two", 3), ("two", 4), ("five", 4)]
    assert all(len(r) == 1 for r in rows[1:]) and rows[0].shape == (3, 2)
    for i, row in enumerate(rows[1:]):
        alone = predict_one(["two", "five"][i % 2], [TEXTS[i % 3]])[1]
        assert np.abs(row - alone).max() < 1e-5


# ---------------------------------------------------------------- adapters at run time
def test_load_and_unload_at_run_time(server, files):
    before = predict(server, "sentiment", TEXTS)
    auth = {"Authorization": f"Bearer {KEY}"}
    body = {"name": "sentiment2", "path": str(files["other"]), "labels": ["neg", "pos"]}
    response = server.post("/v1/adapters", json=body, headers=auth)
    assert response.status_code == 201, response.text
    assert response.json()["labels"] == ["neg", "pos"]
    listed = server.get("/v1/adapters").json()
    assert [a["name"] for a in listed["adapters"]] == ["sentiment", "sentiment2", "topics"]
    assert all(a["warnings"] == [] for a in listed["adapters"])
    assert [(a["num_labels"], a["rank"]) for a in listed["adapters"]] == [(2, 4), (2, 4), (5, 4)]

    loaded = predict(server, "sentiment2", TEXTS)
    assert (
        np.abs(loaded - reference_probabilities(files["base"], files["other"], 2, TEXTS)).max()
        < 1e-5
    )
    assert np.abs(loaded - predict(server, "sentiment", TEXTS)).max() > 0.05  # another adapter

    response = server.delete("/v1/adapters/sentiment2", headers={"X-API-Key": KEY})
    assert response.status_code == 200 and response.json()["name"] == "sentiment2"
    missing = server.post("/v1/predict", json={"adapter": "sentiment2", "texts": ["x"]})
    assert_error(missing, 404, "unknown_adapter", "sentiment, topics")
    assert_error(server.delete("/v1/adapters/sentiment2", headers=auth), 404, "unknown_adapter")
    # loading and unloading another adapter left this one as it was
    assert np.abs(predict(server, "sentiment", TEXTS) - before).max() == 0


def test_the_api_key_guards_loading_and_unloading(server, files):
    body = {"name": "x", "path": str(files["other"])}
    assert_error(server.post("/v1/adapters", json=body), 401, "unauthorized", "X-API-Key")
    wrong = {"Authorization": "Bearer nope"}
    assert_error(
        server.post("/v1/adapters", json=body, headers=wrong), 401, "unauthorized", "wrong"
    )
    assert_error(server.delete("/v1/adapters/topics"), 401, "unauthorized")
    assert_error(
        server.delete("/v1/adapters/topics", headers={"X-API-Key": "no"}), 401, "unauthorized"
    )
    names = [a["name"] for a in server.get("/v1/adapters").json()["adapters"]]
    assert names == ["sentiment", "topics"]


def test_an_adapter_trained_on_other_base_weights_loads_with_a_warning(server, files):
    auth = {"X-API-Key": KEY}
    body = {"name": "retrained", "path": str(files["retrained"])}
    response = server.post("/v1/adapters", json=body, headers=auth)
    assert response.status_code == 201, response.text
    (warning,) = response.json()["warnings"]
    assert "fingerprint" in warning
    assert server.delete("/v1/adapters/retrained", headers=auth).status_code == 200


def test_unloading_every_adapter_and_loading_again_gives_the_same_outputs(files):
    registry = AdapterRegistry(str(files["base"]))
    first = registry.load("a", files["topics"])
    before = registry.predict("a", TEXTS)[1]
    registry.unload("a")
    assert registry.names() == []
    registry.load("a", files["topics"])
    assert np.abs(registry.predict("a", TEXTS)[1] - before).max() == 0
    assert first.labels == [f"LABEL_{i}" for i in range(5)]


def test_a_run_directory_of_the_real_pipeline_serves_as_lorakit_predict_does(files, tmp_path):
    rows = ["review,stars"] + [f'"{w} film {i}",{w}' for i in range(90) for w in [WORDS[i % 3]]]
    (tmp_path / "stars.csv").write_text("\n".join(rows) + "\n")
    run = tmp_path / "run"
    api.train("sentiment", out=run, overrides=[
        f"data.path={tmp_path / 'stars.csv'}", "data.text_column=review",
        "data.label_column=stars", f"model.name={files['base']}",
        "lora.target_modules=query,value", "train.epochs=1", "train.batch_size=32",
    ])  # fmt: skip
    registry = AdapterRegistry(str(files["base"]))
    info = registry.load("stars", run)
    assert info.labels == ["bad", "great", "okay"] and info.max_length == 128 and not info.warnings
    texts = ["great film 3", "bad film", "okay okay"]
    expected = [
        [r["probabilities"][label] for label in info.labels] for r in api.predict(run, texts)
    ]
    assert np.abs(registry.predict("stars", texts)[1] - np.array(expected)).max() < 1e-5


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("body", "status", "code", "fragment"),
    [
        ({"adapter": "nope", "texts": ["x"]}, 404, "unknown_adapter", "loaded adapters: sentiment, topics"),
        ({"adapter": "topics", "texts": ["x"] * 5}, 422, "too_many_texts", "at most 4"),
        ({"adapter": "topics", "texts": ["ok", "x" * 201]}, 422, "text_too_long", "texts[1] has 201"),
        ({"adapter": "topics", "texts": []}, 422, "invalid_input", "texts"),
        ({"adapter": "topics", "texts": "just one string"}, 422, "invalid_input", "texts"),
        ({"texts": ["x"]}, 422, "invalid_input", "adapter"),
        ('{"adapter": "topics", "texts": ["x"', 400, "malformed_json", "not valid JSON"),
        ("[1, 2]", 422, "invalid_input", "must be a JSON object"),
        ("", 400, "malformed_json", "no body"),
        (b"adapter=topics", 400, "malformed_json", "Content-Type: application/json"),
    ],
)  # fmt: skip
def test_bad_predict_input_gets_a_json_4xx_that_names_it(server, body, status, code, fragment):
    if isinstance(body, dict):
        response = server.post("/v1/predict", json=body)
    else:  # raw bytes are sent as a form would be, a str as JSON text
        kind = (
            "application/x-www-form-urlencoded" if isinstance(body, bytes) else "application/json"
        )
        response = server.post("/v1/predict", content=body, headers={"Content-Type": kind})
    assert_error(response, status, code, fragment)


def test_adapters_that_cannot_load_are_refused_and_the_server_goes_on(server, files, tmp_path):
    auth = {"X-API-Key": KEY}

    def load(name, path):
        return server.post("/v1/adapters", json={"name": name, "path": str(path)}, headers=auth)

    before = predict(server, "sentiment", TEXTS)
    assert_error(load("wide", files["wide"]), 422, "adapter_does_not_fit", "different base model")
    for path in (files["base"].parent / "missing", tmp_path, files["base"]):
        assert_error(load("x", path), 422, "not_an_adapter", "not a loadable adapter under")
    assert_error(load("nohead", files["no_head"]), 422, "adapter_does_not_fit", "modules_to_save")
    assert_error(load("a.b", files["other"]), 422, "adapter_does_not_fit", "not allowed")
    assert_error(
        load("topics", files["other"]), 409, "adapter_exists", "DELETE /v1/adapters/topics"
    )
    names = [a["name"] for a in server.get("/v1/adapters").json()["adapters"]]
    assert names == ["sentiment", "topics"]
    assert np.abs(predict(server, "sentiment", TEXTS) - before).max() == 0


def test_an_adapter_for_another_kind_of_base_names_both_bases(files, tmp_path):
    from lorakit.models.classic import TextClassifier

    classic = TextClassifier(50, 8, 5, hidden=16)
    classic.new_head(2)
    config = LoraConfig(r=2, target_modules=["fc1"], modules_to_save=["fc2"])
    recorded = str(tmp_path / "runs" / "classic" / "base")
    save_adapter(inject(classic, config), tmp_path / "classic", base_model_name_or_path=recorded)
    registry = AdapterRegistry(str(files["base"]))
    with pytest.raises(AdapterLoadError) as err:
        registry.load("c", tmp_path / "classic")
    message = str(err.value)
    assert f"made for the base model {recorded}" in message
    assert f"this server's base is {files['base'].resolve()}" in message
    assert "fc2" in message and "\n" not in message
    assert registry.names() == []


def test_health_openapi_and_unknown_routes(server, files):
    assert server.get("/healthz").json() == {
        "status": "ok",
        "base": str(files["base"].resolve()),
        "adapters": 2,
    }
    paths = server.get("/openapi.json").json()["paths"]
    assert {"/v1/predict", "/v1/adapters", "/v1/adapters/{name}", "/healthz"} <= set(paths)
    assert_error(server.get("/v2/nothing"), 404, "not_found", "/openapi.json")


# ---------------------------------------------------------------- startup
def test_startup_refuses_bad_adapters_before_serving(files):
    with pytest.raises(AdapterLoadError, match="different base model"):
        create_app(str(files["base"]), {"wide": files["wide"]})
    with pytest.raises(ServeError, match="NAME=DIR"):
        parse_adapter_options(["just-a-path"])
    assert parse_adapter_options(["a=x/y", "b = z"]) == {"a": "x/y", "b": "z"}
    with pytest.raises(ServeError, match="max_texts must be at least 1"):
        ServeSettings(max_texts=0)


def test_the_command_serves_on_loopback_by_default(files):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "lorakit.serve", "--base", str(files["base"]),
               "--adapter", f"sentiment={files['run']}", "--port", str(port)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    try:
        log = ""
        while "Uvicorn running on" not in log:
            line = process.stderr.readline()
            assert line, f"the server exited: {log}"
            log += line
        assert f"http://127.0.0.1:{port}" in log
        response = httpx.post(
            f"http://127.0.0.1:{port}/v1/predict", json={"adapter": "sentiment", "texts": ["hi"]}
        )
        assert response.status_code == 200
    finally:
        process.terminate()
        process.wait(timeout=20)
