"""Data-parallel training: the classic recipe's transfer in 2 processes on CPU (gloo)
against 1 process with the same global batch, from the same pretrained base."""

import json

import pytest

from lorakit import api
from lorakit.config import ConfigError

QUICK = [
    "pretrain.epochs=2",
    "pretrain.max_length=128",
    "data.max_train_samples=3000",
    "train.epochs=2",
    "train.batch_size=64",
    "train.log_every=10",
    "compare=false",
]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    return out, api.train("classic", out=out, overrides=QUICK)


@pytest.fixture(scope="module")
def two_processes(one_process, tmp_path_factory):
    out = tmp_path_factory.mktemp("two") / "run"
    base = one_process[0] / "base"
    summary = api.train(
        "classic", out=out, overrides=[*QUICK, f"model.pretrained={base}"], processes=2
    )
    return out, summary


def events(run, kind):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


def test_two_processes_match_one_with_the_same_global_batch(one_process, two_processes):
    (one, single), (two, double) = one_process, two_processes
    assert abs(double["test_accuracy"] - single["test_accuracy"]) <= 0.01
    # the same global batch: the same optimizer steps, logged once (by the main process)
    assert [e["step"] for e in events(two, "train")] == [e["step"] for e in events(one, "train")]
    assert [e["step"] for e in events(two, "epoch")] == [e["step"] for e in events(one, "epoch")]
    # validation figures cover the whole split, gathered from both processes
    val_one, val_two = events(one, "eval")[-1], events(two, "eval")[-1]
    assert abs(val_two["accuracy"] - val_one["accuracy"]) <= 0.02
    assert json.loads((two / "environment.json").read_text())["processes"] == 2


def test_adapter_from_two_processes_loads(two_processes):
    run, summary = two_processes
    assert summary["reload_identical"] is True
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert api.evaluate(run, split="test")["accuracy"] == summary["test_accuracy"]
    assert (run / "report.html").is_file()


def test_a_global_batch_that_does_not_split_is_refused(one_process, tmp_path):
    base = one_process[0] / "base"
    with pytest.raises(ConfigError, match="multiple of 2"):
        api.train(
            "classic", out=tmp_path / "run", processes=2,
            overrides=[*QUICK, f"model.pretrained={base}", "train.batch_size=63"],
        )  # fmt: skip
    with pytest.raises(ConfigError, match="1 or more"):
        api.train("classic", processes=0)
