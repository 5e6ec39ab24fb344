"""The run directory: atomic summary, flushed metrics, config round trip, comparison table."""

import json
import os

import pytest

from lorakit.config import ConfigError, load_config
from lorakit.recipes import recipe_path
from lorakit.rundir import RunDir, write_json_atomic


def test_summary_is_replaced_atomically(tmp_path):
    run = RunDir(tmp_path / "run")
    run.write_summary({"test_accuracy": 0.5})
    with pytest.raises(TypeError):
        run.write_summary({"test_accuracy": 0.9, "bad": object()})  # fails half-way through
    assert run.read_summary() == {"test_accuracy": 0.5}
    assert sorted(os.listdir(run.path)) == ["summary.json"]  # no temporary file left


def test_write_json_atomic_never_leaves_partial_file(tmp_path):
    target = tmp_path / "x.json"
    with pytest.raises(TypeError):
        write_json_atomic(target, {"a": {1, 2}})
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_metrics_lines_are_on_disk_at_once(tmp_path):
    run = RunDir(tmp_path / "run")
    run.log("train", step=1, epoch=0.1, time=0.0, loss=1.0, lr=0.1)
    # read by another handle before anything is closed or finished
    lines = (run.path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == {
        "event": "train",
        "step": 1,
        "epoch": 0.1,
        "time": 0.0,
        "loss": 1.0,
        "lr": 0.1,
    }


def test_config_round_trip_and_existing_run_refused(tmp_path):
    config = load_config(recipe_path("classic"), ["train.epochs=2", "out=somewhere"])
    run = RunDir(tmp_path / "run")
    run.write_config(config)
    again = load_config(run.path / "config.toml")
    assert again == config.model_copy(update={"out": None})
    with pytest.raises(ConfigError, match="already holds a run"):
        RunDir(tmp_path / "run")


@pytest.mark.parametrize("out", ["taken", "taken/run"])
def test_out_blocked_by_a_file_is_a_config_error(tmp_path, out):
    (tmp_path / "taken").write_text("mine")
    with pytest.raises(ConfigError, match="cannot make the folder .* choose another --out"):
        RunDir(tmp_path / out)
    assert (tmp_path / "taken").read_text() == "mine"


def test_environment_records_versions_seed_and_times(tmp_path):
    run = RunDir(tmp_path / "run")
    run.start_environment(seed=3, data_fingerprint="abc")
    run.finish_environment()
    env = json.loads((run.path / "environment.json").read_text())
    for key in ("torch", "transformers", "peft", "datasets", "accelerate", "python", "cpu"):
        assert env[key]
    assert env["seed"] == 3 and env["data_fingerprint"] == "abc"
    assert env["started"] <= env["finished"]


def test_comparison_table(tmp_path):
    run = RunDir(tmp_path / "run")
    rows = [{"setting": "a", "trainable_params": 1200, "test_accuracy": 0.75}]
    table = run.write_comparison(
        rows + [{"setting": "b", "trainable_params": 5, "test_accuracy": 0.5}]
    )
    assert "| a | 1,200 | 0.7500 |" in table
    assert json.loads((run.path / "comparison.json").read_text())[0] == rows[0]
    with pytest.raises(ValueError, match="same keys"):
        run.write_comparison(rows + [{"setting": "c"}])
