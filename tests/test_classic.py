"""The classic recipe end to end, on reduced epochs and a part of the training data."""

import json
from collections import Counter

import pytest

from lorakit import api
from lorakit.config import load_config
from lorakit.data import load_dataset

QUICK = [
    "pretrain.epochs=2",
    "pretrain.max_length=128",
    "data.max_train_samples=3000",
    "train.epochs=2",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("classic") / "run"
    summary = api.train("classic", out=out, overrides=QUICK)
    return out, summary


def test_pretrained_base_and_transfer_beat_the_majority_class(run):
    out, summary = run
    test = load_dataset("rotten-tomatoes")["test"]["label"]
    majority = max(Counter(test).values()) / len(test)
    assert summary["pretrain_test_accuracy"] > 0.85  # five topics: chance is 0.2
    assert summary["test_accuracy"] > majority + 0.08
    assert summary["trainable_params"] < 0.05 * summary["total_params"]
    assert (out / "base" / "model.safetensors").is_file()


def test_reloaded_adapter_gives_identical_predictions(run):
    out, summary = run
    assert summary["reload_identical"] is True
    assert summary["reload_test_accuracy"] == summary["test_accuracy"]
    # and through the public API, from the files alone
    assert api.evaluate(out, split="test")["accuracy"] == summary["test_accuracy"]


def test_run_directory_contract(run):
    out, summary = run
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["test_accuracy"] == summary["test_accuracy"]
    for key in (
        "recipe",
        "task",
        "dataset",
        "base_model",
        "engine",
        "test_loss",
        "train_seconds",
        "best_step",
        "seed",
        "adapter_bytes",
        "base_model_bytes",
        "labels",
    ):
        assert key in on_disk
    matrix = on_disk["confusion_matrix"]
    assert sum(map(sum, matrix)) == len(load_dataset("rotten-tomatoes")["test"])
    adapter = sorted(p.name for p in (out / "adapter").iterdir())
    assert adapter == ["adapter_config.json", "adapter_model.safetensors", "labels.json"]
    assert on_disk["base_model"] == "base"  # the run's own, relative to it
    assert on_disk["adapter_bytes"] < on_disk["base_model_bytes"] / 4
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"train", "eval", "epoch", "test"} <= {e["event"] for e in events}
    env = json.loads((out / "environment.json").read_text())
    assert env["finished"] and env["data_fingerprint"]
    # the written config repeats the run
    assert load_config(out / "config.toml").train.epochs == 2


def test_comparison_table(run):
    out, _ = run
    rows = json.loads((out / "comparison.json").read_text())
    settings = [row["setting"].split(":")[0] for row in rows]
    assert settings == ["default", "seed", "head only", "full fine-tuning"]
    by_name = dict(zip(settings, rows, strict=True))
    assert by_name["full fine-tuning"]["trainable_percent"] == 100.0
    assert by_name["head only"]["trainable_params"] == 128 * 2 + 2
    assert by_name["seed"]["trainable_params"] == 2 * 50 + 128 * 2 + 128 * 2 + 2
    assert all(0.5 < row["test_accuracy"] <= 1 for row in rows)
    assert "| full fine-tuning |" in (out / "comparison.md").read_text()
