"""`lorakit serve` serving folders `lorakit merge` wrote beside the LoRA adapters of its base.

The base is test_serve's tiny BERT with a LoRA adapter on it; the merged models are a real
classic run merged by `lorakit merge` and a transformers classifier saved as a merged folder
is (its weights, its tokenizer, a merge.json). A merged model is a model of its own: it answers
as `lorakit predict MERGED_DIR` does and never changes what the adapters compute.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from lorakit import api
from lorakit.cli import main
from lorakit.merge import merge
from lorakit.serve import AdapterLimits, AdapterRegistry, ServeError, create_app
from lorakit.serve.batcher import MicroBatcher
from lorakit.serve.errors import AdapterLoadError, AdapterOverLimitError
from test_serve import KEY, LoopbackServer, assert_error, classifier, make_adapter, predict
from tiny_models import (
    save_tiny_bert,
    tiny_gpt2,
    train_small_classic,
)

AUTH = {"X-API-Key": KEY}
TEXTS = ["wonderful superb film", "dull tedious plot", "moving and funny", "an ordinary ending"]


def merged_transformers_classifier(base: Path, folder: Path) -> Path:
    """A BERT classifier saved as `lorakit merge` saves one: weights, tokenizer, merge.json."""
    model = classifier(base, num_labels=3, seed=7)
    model.config.id2label = {0: "bad", 1: "fine", 2: "good"}
    model.config.label2id = {"bad": 0, "fine": 1, "good": 2}
    with torch.no_grad():
        model.classifier.weight.normal_(0.0, 1.0)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    record = {"task": "classification", "loads_with": "AutoModelForSequenceClassification",
              "data": {"max_length": 64}, "eval_batch_size": 2}  # fmt: skip
    (folder / "merge.json").write_text(json.dumps(record))
    return folder


def merged_causal_lm(folder: Path) -> Path:
    tiny_gpt2().save_pretrained(folder)
    (folder / "merge.json").write_text(
        json.dumps({"task": "causal-lm", "loads_with": "AutoModelForCausalLM"})
    )
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    top = tmp_path_factory.mktemp("serve-merged")
    base = save_tiny_bert(top / "tiny-bert")
    root = top / "root"  # the adapter root: run-time loads come from here
    classic_run = train_small_classic(top / "classic")
    return {
        "base": base,
        "root": root,
        "sentiment": make_adapter(base, root / "sentiment", num_labels=2, seed=1),
        "glove": merge(classic_run, root / "glove"),
        "bert": merged_transformers_classifier(base, root / "bert-merged"),
        "causal": merged_causal_lm(root / "gpt2-merged"),
    }


@pytest.fixture(scope="module")
def server(files):
    adapters = {"sentiment": files["sentiment"], "glove": files["glove"]}  # --adapter NAME=DIR
    app = create_app(str(files["base"]), adapters, api_key=KEY, adapter_roots=[files["root"]])
    with LoopbackServer(app) as running, httpx.Client(base_url=running.url, timeout=60) as client:
        yield client


def load(client, name, path, **extra):
    body = {"name": name, "path": str(path), **extra}
    return client.post("/v1/adapters", json=body, headers=AUTH)


def assert_answers_as_lorakit_predict(client, name: str, folder: Path) -> None:
    response = client.post("/v1/predict", json={"adapter": name, "texts": TEXTS})
    assert response.status_code == 200, response.text
    served = response.json()["results"]
    for ours, theirs in zip(served, api.predict(folder, TEXTS), strict=True):
        assert set(ours) == {"label", "probability", "probabilities"}
        assert ours["label"] == theirs["label"]
        assert list(ours["probabilities"]) == list(theirs["probabilities"])
        assert ours["probability"] == pytest.approx(theirs["probability"], abs=1e-6)
        for label, p in theirs["probabilities"].items():
            assert ours["probabilities"][label] == pytest.approx(p, abs=1e-6)


# ---------------------------------------------------------------- serving
def test_a_merged_classic_model_given_at_start_answers_as_lorakit_predict(server, files):
    assert_answers_as_lorakit_predict(server, "glove", files["glove"])
    assert predict(server, "sentiment", TEXTS).shape == (len(TEXTS), 2)  # the adapter beside it


def test_a_merged_transformers_classifier_loads_at_run_time_and_answers_as_predict(server, files):
    response = load(server, "bert", "bert-merged")
    assert response.status_code == 201, response.text
    assert response.json()["kind"] == "merged" and response.json()["labels"] == [
        "bad", "fine", "good"
    ]  # fmt: skip
    try:
        assert_answers_as_lorakit_predict(server, "bert", files["bert"])
    finally:
        assert server.delete("/v1/adapters/bert", headers=AUTH).status_code == 200


def test_loading_and_unloading_a_merged_model_leaves_the_adapter_bit_identical(server, files):
    before = predict(server, "sentiment", TEXTS)
    assert load(server, "glove2", "glove").status_code == 201
    assert np.array_equal(predict(server, "sentiment", TEXTS), before)
    assert_answers_as_lorakit_predict(server, "glove2", files["glove"])
    deleted = server.delete("/v1/adapters/glove2", headers=AUTH)
    assert deleted.status_code == 200 and deleted.json()["kind"] == "merged"
    missing = server.post("/v1/predict", json={"adapter": "glove2", "texts": ["x"]})
    assert_error(missing, 404, "unknown_adapter", "glove, sentiment")
    assert np.array_equal(predict(server, "sentiment", TEXTS), before)


def test_the_listing_shows_merged_models_by_name_and_kind_without_paths(server, files):
    listed = server.get("/v1/adapters")
    assert str(files["root"]) not in listed.text and "glove/" not in listed.text
    described = {a["name"]: a for a in listed.json()["adapters"]}
    assert described["glove"] == {
        "name": "glove", "kind": "merged", "labels": ["bad", "good"], "num_labels": 2,
        "rank": None, "max_length": 64, "warnings": [],
    }  # fmt: skip
    assert described["sentiment"]["kind"] == "lora" and described["sentiment"]["rank"] == 4
    assert server.get("/healthz").json()["adapters"] == 2


def test_the_batcher_runs_merged_models_and_adapters_in_one_window(files):
    registry = AdapterRegistry(str(files["base"]))
    registry.load("sentiment", files["sentiment"])
    registry.load("glove", files["glove"])
    batcher = MicroBatcher(registry, window=0.2)
    batcher.start()
    try:
        jobs = [("glove", TEXTS[:2]), ("sentiment", TEXTS[:2]), ("glove", TEXTS[2:])]
        futures = [batcher.submit(name, texts) for name, texts in jobs]
        results = [future.result(timeout=60) for future in futures]
    finally:
        batcher.stop()
    expected = api.Predictor(files["glove"]).predict_proba(TEXTS)
    assert np.abs(np.concatenate([results[0][1], results[2][1]]) - expected).max() < 1e-6
    assert np.array_equal(results[1][1], registry.predict("sentiment", TEXTS[:2])[1])


# ---------------------------------------------------------------- refusals
def test_a_merged_causal_lm_is_refused_with_one_line(server, files):
    body = assert_error(load(server, "gpt2", "gpt2-merged"), 422, "adapter_does_not_fit",
                        "merged model gpt2-merged is a causal LM", "AutoModelForCausalLM")  # fmt: skip
    assert "\n" not in body["detail"] and str(files["root"]) not in body["detail"]
    names = [a["name"] for a in server.get("/v1/adapters").json()["adapters"]]
    assert names == ["glove", "sentiment"]


def test_a_merged_folder_linking_out_of_the_root_is_no_loadable_adapter(server, files, tmp_path):
    linked = files["root"] / "linked"
    shutil.copytree(files["glove"], linked)
    (tmp_path / "vocab.txt").write_text((linked / "vocab.txt").read_text())
    (linked / "vocab.txt").unlink()
    (linked / "vocab.txt").symlink_to(tmp_path / "vocab.txt")
    try:
        assert_error(load(server, "linked", "linked"), 422, "not_an_adapter", "not a loadable")
    finally:
        shutil.rmtree(linked)


@pytest.mark.parametrize(
    ("limits", "change", "message"),
    [
        ({"max_merged_bytes": 10_000}, {}, "has files of"),
        ({}, {"vocab_size": 10**12}, "the model that config.json of"),  # never allocated
        ({"max_labels": 1}, {}, "has 2 labels"),
    ],
)
def test_merged_models_over_the_limits_are_refused(files, tmp_path, limits, change, message):
    folder = shutil.copytree(files["glove"], tmp_path / "glove")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    registry = AdapterRegistry(str(files["base"]), limits=AdapterLimits(**limits))
    with pytest.raises(AdapterOverLimitError, match=message) as refused:
        registry.load("glove", folder)
    assert "lorakit serve --m" in str(refused.value) and registry.names() == []


def test_a_merged_folder_without_safetensors_weights_is_refused(files, tmp_path):
    folder = shutil.copytree(files["bert"], tmp_path / "bert")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    registry = AdapterRegistry(str(files["base"]))
    with pytest.raises(AdapterLoadError, match="no model.safetensors; .*safetensors only"):
        registry.load("bert", folder)


def test_a_merged_folder_as_the_base_points_at_adapter(files):
    with pytest.raises(ServeError, match="merged model .*--adapter NAME="):
        AdapterRegistry(str(files["glove"]))


def test_the_merged_limit_is_an_option_of_the_command(capsys):
    assert main(["serve", "--max-merged-bytes", "0"]) == 2
    err = capsys.readouterr().err
    assert "max_merged_bytes must be at least 1" in err and "Traceback" not in err
