"""`lorakit sweep`: grids, key resolution, and a tiny real sweep on `classic`."""

import csv
import json
import shutil

import pandas as pd
import pytest

from lorakit import api
from lorakit.config import ConfigError, resolve_key
from lorakit.report.sweep import QUALITY_VS_COST_PNG, pareto_front, setting_summary
from lorakit.sweep import combination_name, combinations, parse_grid, sweep

TINY = ["pretrain.epochs=1", "train.epochs=1", "data.max_train_samples=300"]


def test_short_keys_resolve_to_dotted_keys():
    assert resolve_key("r") == "lora.r"
    assert resolve_key("lora_alpha") == "lora.lora_alpha"
    assert resolve_key("target_modules") == "lora.target_modules"
    assert resolve_key("lr") == "train.lr"  # not pretrain.lr: pretraining is shared
    assert resolve_key("pretrain.lr") == "pretrain.lr"
    assert resolve_key("seed") == "seed"


@pytest.mark.parametrize(
    ("key", "named"),
    [
        ("name", ["data.name", "model.name"]),  # ambiguous: the choices are listed
        ("rank", ["lora.r"]),  # unknown: an example of a real key
        ("lora", ["lora.r", "lora.lora_alpha"]),  # a section, not a setting
        ("lora.rank", ["lora.r"]),
    ],
)
def test_bad_keys_name_the_choices(key, named):
    with pytest.raises(ConfigError) as err:
        resolve_key(key)
    assert repr(key) in str(err.value)
    for choice in named:
        assert choice in str(err.value)


def test_parse_grid_values_and_list_separator():
    grid = parse_grid(["r=1,2,4", "target_modules=query|query,value", "lr=1e-3,5e-4"])
    assert grid == {
        "lora.r": [1, 2, 4],
        "lora.target_modules": [["query"], ["query", "value"]],
        "train.lr": [1e-3, 5e-4],
    }
    assert parse_grid(["target_modules=query,value"]) == {
        "lora.target_modules": [["query"], ["value"]]
    }
    assert parse_grid(["target_modules=all-linear"]) == {"lora.target_modules": ["all-linear"]}
    assert len(combinations(grid)) == 12
    assert combination_name(combinations(grid)[-1]) == "r=4,target_modules=query+value,lr=0.0005"


def test_parse_grid_reports_every_bad_item():
    with pytest.raises(ConfigError) as err:
        parse_grid(["r", "name=a,b", "lora_alpha="])
    lines = err.value.problems
    assert any("'r'" in line and "KEY=V1,V2" in line for line in lines)
    assert any("ambiguous" in line for line in lines)
    assert any("'lora_alpha='" in line for line in lines)


def test_invalid_combinations_stop_the_sweep_before_any_run(tmp_path):
    out = tmp_path / "sweep"
    with pytest.raises(ConfigError) as err:
        sweep("classic", {"r": [2, 0, -1], "batch_size": [0]}, out=out, overrides=TINY)
    message = str(err.value)
    assert "[r=0,batch_size=0] lora.r" in message
    assert "[r=-1,batch_size=0]" in message
    assert "train.batch_size" in message
    assert not out.exists()


def test_sweep_folder_must_be_new(tmp_path):
    (tmp_path / "old.txt").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        sweep("classic", {"r": [1]}, out=tmp_path, overrides=TINY)


def test_sweep_folder_under_a_file_is_refused(tmp_path):
    (tmp_path / "taken").write_text("x")
    with pytest.raises(ConfigError, match="cannot make the sweep folder"):
        sweep("classic", {"r": [1]}, out=tmp_path / "taken" / "sweep", overrides=TINY)


def test_classic_sweep_survives_a_failing_combination(tmp_path, capsys):
    out = tmp_path / "sweep"
    grid = parse_grid(["r=1,2", "target_modules=fc1|nothing"])
    assert sweep("classic", grid, out=out, overrides=TINY) == out

    with open(out / "sweep.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["lora.r"], r["lora.target_modules"], r["status"]) for r in rows] == [
        ("1", "fc1", "ok"), ("1", "nothing", "failed"), ("2", "fc1", "ok"), ("2", "nothing", "failed"),
    ]  # fmt: skip
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(0.0 <= float(r["test_accuracy"]) <= 1.0 for r in ok)
    assert int(ok[1]["trainable_params"]) > int(ok[0]["trainable_params"])  # r=2 > r=1
    failed = [r for r in rows if r["status"] == "failed"]
    assert all("matched no module" in r["error"] and "fc1" in r["error"] for r in failed)
    assert (out / "r=1,target_modules=nothing" / "error.txt").is_file()

    # pretrained once, and shared from a folder of the sweep's own
    settings = json.loads((out / "sweep.json").read_text())
    assert settings["succeeded"] == 2 and settings["failed"] == 2
    assert settings["shared_base"] == str((out / "shared-base").resolve())
    second = json.loads((out / "r=2,target_modules=fc1" / "summary.json").read_text())
    assert second["base_model"] == "../shared-base"  # beside the run: the sweep folder can move
    assert "pretrain_seconds" not in second
    assert not (out / "r=2,target_modules=fc1" / "comparison.json").exists()  # compare=false

    assert "2 of 4 runs succeeded" in (out / "sweep.md").read_text()
    for plot in ("metric_vs_trainable_params.png", "metric_vs_r.png"):
        assert (out / "plots" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.html").read_text()
    assert "data:image/png;base64," in report and "nothing" in report
    progress = capsys.readouterr().out
    assert "sweep [2/4] r=1,target_modules=nothing: FAILED" in progress
    assert "sweep [4/4] r=2,target_modules=nothing" in progress

    # deleting the run that pretrained the base, or moving the sweep, breaks no other run
    shutil.rmtree(out / "r=1,target_modules=fc1")
    moved = shutil.move(out, tmp_path / "moved")
    assert api.evaluate(moved / "r=2,target_modules=fc1")["accuracy"] == second["test_accuracy"]


def test_setting_summary_means_each_setting_over_its_seeds():
    table = pd.DataFrame({
        "lora.r": [1, 1, 1, 2, 2, 2, 4],
        "status": ["ok"] * 6 + ["failed"],
        "seed": [42, 43, 44, 42, 43, 44, 42],
        "test_accuracy": [0.8, 0.9, 1.0, 0.7, 0.7, 0.7, None],
        "trainable_params": [10, 10, 10, 20, 20, 20, None],
        "seconds_per_step": [0.1, 0.2, 0.3, 0.2, 0.2, 0.2, None],
    })  # fmt: skip
    settings = setting_summary(table, "test_accuracy")
    assert list(settings["setting"]) == ["r=1", "r=2"]  # the failed r=4 has no figure
    first, second = settings.iloc[0], settings.iloc[1]
    assert first["runs"] == 3 and first["test_accuracy"] == pytest.approx(0.9)
    assert first["test_accuracy_std"] == pytest.approx(0.1)  # sample standard deviation
    assert (first["test_accuracy_min"], first["test_accuracy_max"]) == (0.8, 1.0)
    assert first["seconds_per_step"] == pytest.approx(0.2)
    assert second["test_accuracy_std"] == pytest.approx(0.0, abs=1e-12)
    assert second["trainable_params"] == 20


def test_setting_summary_of_single_runs_has_no_spread():
    table = pd.DataFrame({"lora.r": [1, 2], "status": ["ok", "ok"], "seed": [42, 42],
                          "test_perplexity": [9.0, 8.0], "trainable_params": [1, 2]})  # fmt: skip
    settings = setting_summary(table, "test_perplexity")
    assert list(settings["runs"]) == [1, 1]
    assert settings["test_perplexity_std"].isna().all()


def test_pareto_front_keeps_the_best_quality_for_its_cost():
    table = pd.DataFrame(
        {
            "cost": [1, 2, 2, 3, 4, 5, None],
            "accuracy": [0.5, 0.7, 0.6, 0.7, 0.9, 0.9, 1.0],
        }
    )
    # 2/0.6 is beaten by 2/0.7, 3/0.7 by 2/0.7, 5/0.9 by 4/0.9; no cost: no place on the front
    assert list(pareto_front(table, "cost", "accuracy")) == [
        True, True, False, False, True, False, False,
    ]  # fmt: skip
    perplexity = table.rename(columns={"accuracy": "perplexity"})
    assert list(pareto_front(perplexity, "cost", "perplexity", lower_is_better=True)) == [
        True, False, False, False, False, False, False,
    ]  # fmt: skip
    ties = pd.DataFrame({"cost": [1, 1], "accuracy": [0.5, 0.5]})
    assert list(pareto_front(ties, "cost", "accuracy")) == [True, True]


def test_seeds_must_be_positive_and_not_also_in_the_grid(tmp_path):
    with pytest.raises(ConfigError, match="seeds"):
        sweep("classic", {"r": [1]}, out=tmp_path / "a", overrides=TINY, seeds=0)
    with pytest.raises(ConfigError, match="--seeds"):
        sweep("classic", {"r": [1], "seed": [1, 2]}, out=tmp_path / "b", overrides=TINY, seeds=2)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_classic_sweep_repeats_each_setting_with_seeds(tmp_path):
    out = tmp_path / "sweep"
    record = api.sweep("classic", ["r=1,2"], out=out, overrides=[*TINY, "seed=7"], seeds=2)
    assert record["succeeded"] == 4 and record["seeds"] == 2

    with open(out / "sweep.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["lora.r"], r["seed"]) for r in rows] == [
        ("1", "7"),
        ("1", "8"),
        ("2", "7"),
        ("2", "8"),
    ]
    assert (out / "r=1,seed=8" / "summary.json").is_file()
    summary = json.loads((out / "r=1,seed=8" / "summary.json").read_text())
    assert summary["seed"] == 8 and summary["peak_rss_bytes"] > 10_000_000
    assert float(rows[1]["seconds_per_step"]) == pytest.approx(
        summary["train_seconds"] / summary["steps"]
    )

    markdown = (out / "sweep.md").read_text()
    accuracies = [float(r["test_accuracy"]) for r in rows if r["lora.r"] == "1"]
    mean = sum(accuracies) / 2
    assert "## Per setting" in markdown and f"| r=1 | 2 | {mean:.4g} |" in markdown
    assert "## Pareto front" in markdown and f"plots/{QUALITY_VS_COST_PNG}" in markdown
    assert (out / "plots" / QUALITY_VS_COST_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.html").read_text()
    assert 'id="pareto"' in report and report.count("data:image/png;base64,") == 3
