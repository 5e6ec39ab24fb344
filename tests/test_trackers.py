"""Live trackers: TensorBoard when installed, wandb when asked, the same figures as
metrics.jsonl from both trainers."""

import json
import sys
import types

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lorakit import api
from lorakit.config import ConfigError


def train(out, tiny_bert_dir, verdicts_csv, *extra):
    return api.train("sentiment", out=out, overrides=[
        f"data.path={verdicts_csv}", "data.text_column=review", "data.label_column=verdict",
        f"model.name={tiny_bert_dir}", "lora.target_modules=query,value", "train.epochs=2",
        "train.batch_size=16", "train.log_every=2", *extra,
    ])  # fmt: skip


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("trainer", ["lorakit", "hf"])
def test_tensorboard_gets_the_figures_of_metrics_jsonl(
    tmp_path, tiny_bert_dir, verdicts_csv, trainer
):
    run = tmp_path / "run"
    summary = train(run, tiny_bert_dir, verdicts_csv, f"train.trainer={trainer}")
    board = EventAccumulator(str(run / "tensorboard")).Reload()
    scalars = board.Tags()["scalars"]
    records = metrics(run)

    train_losses = [(r["step"], r["loss"]) for r in records if r["event"] == "train"]
    logged = [(e.step, e.value) for e in board.Scalars("train/loss")]
    assert len(train_losses) >= 3 and len(logged) == len(train_losses)
    for (step, loss), (tb_step, tb_loss) in zip(train_losses, logged, strict=True):
        assert tb_step == step and tb_loss == pytest.approx(loss, rel=1e-6)

    evals = [r for r in records if r["event"] == "eval"]
    assert [e.value for e in board.Scalars("validation/accuracy")] == pytest.approx(
        [r["accuracy"] for r in evals]
    )
    assert {"train/lr", "validation/loss", "epoch/train_loss", "test/accuracy"} <= set(scalars)
    test = board.Scalars("test/accuracy")
    assert test[-1].value == pytest.approx(summary["test_accuracy"])
    assert test[-1].step >= max(step for step, _ in train_losses)  # drawn at the end
    config_text = board.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert 'target_modules = ["query", "value"]' in config_text  # the resolved config.toml


def test_no_trackers_when_log_to_is_empty(tmp_path, tiny_bert_dir, verdicts_csv):
    run = tmp_path / "run"
    train(run, tiny_bert_dir, verdicts_csv, "train.log_to=[]", "train.max_steps=2")
    assert not (run / "tensorboard").exists()
    assert (run / "summary.json").is_file()


def test_wandb_asked_but_not_installed_is_refused_before_any_work(
    tmp_path, tiny_bert_dir, verdicts_csv, monkeypatch
):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ConfigError, match=r"'wandb' is not installed; pip install wandb"):
        train(tmp_path / "run", tiny_bert_dir, verdicts_csv, "train.log_to=wandb")
    assert not (tmp_path / "run").exists()


def test_wandb_gets_the_same_figures_when_asked(tmp_path, tiny_bert_dir, verdicts_csv, monkeypatch):
    calls = {"init": [], "log": [], "config": [], "finished": 0}

    class Run:
        def log(self, values, step=None):
            calls["log"].append((step, dict(values)))

        def finish(self):
            calls["finished"] += 1

    def init(config, **kwargs):
        calls["init"].append(kwargs)
        calls["config"].append(config)
        return Run()

    fake = types.ModuleType("wandb")
    fake.init = init
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_PROJECT", "reviews")

    run = tmp_path / "run"
    train(run, tiny_bert_dir, verdicts_csv, "train.log_to=wandb")
    assert calls["init"] == [{"project": "reviews", "name": "run", "dir": str(run)}]
    assert calls["config"][0]["lora"]["target_modules"] == ["query", "value"]
    assert calls["finished"] == 1
    assert not (run / "tensorboard").exists()  # log_to names the trackers: only wandb
    steps = [step for step, _ in calls["log"]]
    assert steps == sorted(steps)  # wandb drops a step below one it has seen
    sent = [v["train/loss"] for _, v in calls["log"] if "train/loss" in v]
    assert sent == [r["loss"] for r in metrics(run) if r["event"] == "train"]


def test_a_run_failing_in_setup_closes_its_trackers_before_its_folder_goes(
    tmp_path, tiny_bert_dir, monkeypatch
):
    """The folder of a run that failed in setup is removed, and TensorBoard's writer is closed
    before that: its thread would otherwise write into a removed folder now and then."""
    from lorakit import trackers
    from lorakit.data import DataError

    run, seen = tmp_path / "run", []
    finish = trackers.Trackers.finish

    def finish_and_look(self):
        seen.append((run / "tensorboard").is_dir())
        finish(self)

    monkeypatch.setattr(trackers.Trackers, "finish", finish_and_look)
    with pytest.raises(DataError, match="No such file"):
        train(run, tiny_bert_dir, tmp_path / "no-such.csv")
    assert seen == [True]  # closed while its folder was still there
    assert not run.exists()  # and the unstarted run left nothing behind
