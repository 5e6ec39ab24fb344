"""Crash-safe checkpoints and `--resume` on a tiny BERT with dropout, real reviews.

A run is killed with SIGKILL in its second epoch, resumed, and must end with the very adapter
an uninterrupted run gives; a checkpoint write that fails must leave the previous one intact.
"""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lorakit import api
from lorakit.config import ConfigError
from lorakit.train import checkpoint as ckpt

STEPS_PER_EPOCH = 20  # 320 reviews, batches of 16


@pytest.fixture(autouse=True)
def one_thread(monkeypatch, tmp_path_factory):
    # one thread: the same sums in the same order in every process, so runs compare exactly
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def overrides(model_dir) -> list[str]:
    return [
        f"model.name={model_dir}", "data.max_train_samples=320", "data.max_length=64",
        "lora.lora_dropout=0.1", "train.epochs=2", "train.batch_size=16",
        "train.eval_batch_size=64", "train.log_every=1", "train.checkpoint_every=3",
        "train.early_stopping_patience=0",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def reference(tiny_bert_dir, tmp_path_factory):
    """An uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORAKIT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        torch.set_num_threads(1)
        keep = "train.keep_checkpoints_after_run=true"  # a finished run's are removed
        api.train("sentiment", out=out, overrides=[*overrides(tiny_bert_dir), keep])
    return out


def adapter_diff(run_a: Path, run_b: Path) -> float:
    a = load_file(str(run_a / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(run_b / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def events(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


def test_reference_keeps_the_last_checkpoints(reference):
    steps = [step for step, _ in ckpt.checkpoint_steps(reference / "checkpoints")]
    assert steps == [36, 39]  # every 3 steps, the newest 2 kept; none at the last step (40)
    assert not list((reference / "checkpoints").glob(".tmp-*"))


# The child slows each optimizer step so that the kill lands mid-epoch; the arithmetic is the
# same as in any other run.
CHILD = """
import sys, time, torch
torch.set_num_threads(1)
step = torch.optim.AdamW.step
def slow_step(self, *args, **kwargs):
    time.sleep(0.15)
    return step(self, *args, **kwargs)
torch.optim.AdamW.step = slow_step
from lorakit import api
api.train("sentiment", out=sys.argv[1], overrides=sys.argv[2:])
"""


def test_sigkill_mid_epoch_then_resume_gives_the_same_adapter(reference, tiny_bert_dir, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path("src").resolve())}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(run), *overrides(tiny_bert_dir)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    try:
        # wait for a checkpoint in the second epoch (step 21 or later) and a step logged after
        # it (which the resumed run must drop and train again), then kill at once
        while not any(s > STEPS_PER_EPOCH for s, _ in ckpt.checkpoint_steps(run / "checkpoints")):
            assert child.poll() is None, child.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        saved = ckpt.checkpoint_steps(run / "checkpoints")[-1][0]
        while max(e["step"] for e in events(run, "train")) <= saved:
            assert time.monotonic() < deadline, "no step after the checkpoint"
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert not (run / "summary.json").exists()
    newest = ckpt.latest_checkpoint(run / "checkpoints")
    position = json.loads((newest / "state.json").read_text())["position"]
    assert position["epoch"] == 1 and 0 < position["batches_done"] < STEPS_PER_EPOCH

    summary = api.train(resume=run)

    assert adapter_diff(run, reference) <= 1e-6
    train_steps = [e["step"] for e in events(run, "train")]
    assert train_steps == list(range(1, 2 * STEPS_PER_EPOCH + 1))  # each step logged once
    assert [e["step"] for e in events(run, "epoch")] == [20, 40]
    assert [e["loss"] for e in events(run, "train")] == pytest.approx(
        [e["loss"] for e in events(reference, "train")], abs=1e-6
    )
    assert (
        summary["test_accuracy"]
        == json.loads((reference / "summary.json").read_text())["test_accuracy"]
    )
    environment = json.loads((run / "environment.json").read_text())
    assert environment["resumed_from"] == newest.name and environment["finished"]
    assert not (run / "checkpoints").exists()  # finished: nothing left to resume

    # TensorBoard, like metrics.jsonl, holds each step once: the stopped run's steps after the
    # checkpoint are purged
    board = EventAccumulator(str(run / "tensorboard")).Reload()
    assert [e.step for e in board.Scalars("train/loss")] == train_steps
    assert [e.value for e in board.Scalars("train/loss")] == pytest.approx(
        [e["loss"] for e in events(run, "train")], rel=1e-6
    )


def test_failed_write_keeps_the_previous_checkpoint(
    reference, tiny_bert_dir, tmp_path, monkeypatch
):
    run = tmp_path / "run"
    real_save, calls = ckpt.save_file, []

    def disk_full_on_third_write(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 3:
            with open(filename, "wb") as handle:  # half a file, as a full disk leaves it
                handle.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", disk_full_on_third_write)
    with pytest.raises(ckpt.CheckpointError) as failure:
        api.train("sentiment", out=run, overrides=overrides(tiny_bert_dir))
    message = str(failure.value)
    assert "could not write checkpoint step-9" in message and "No space left" in message
    assert "step-6 is intact" in message and "--resume" in message
    # the earlier checkpoints are whole; nothing half-written is left behind
    assert [s for s, _ in ckpt.checkpoint_steps(run / "checkpoints")] == [3, 6]
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert ckpt.read_checkpoint(run / "checkpoints" / "step-6").step == 6

    monkeypatch.setattr(ckpt, "save_file", real_save)  # space again: resume and finish
    api.train(resume=run)
    assert adapter_diff(run, reference) <= 1e-6


def test_resume_refuses_what_it_cannot_continue(reference, tmp_path):
    with pytest.raises(ConfigError, match="has finished"):
        api.train(resume=reference)
    with pytest.raises(ConfigError, match="not a run directory"):
        api.train(resume=tmp_path)
    with pytest.raises(ConfigError, match="leave out the recipe"):
        api.train("sentiment", resume=reference)


def stopped_run(folder: Path, recipe: str, *overrides: str) -> Path:
    """The folder of a run killed before its first checkpoint."""
    from lorakit.config import load_config, to_toml
    from lorakit.recipes import recipe_path

    folder.mkdir(parents=True)
    config = load_config(recipe_path(recipe), ["train.log_to=[]", *overrides])
    (folder / "config.toml").write_text(to_toml(config))
    (folder / "metrics.jsonl").write_text("")
    return folder


def test_a_run_stopped_before_its_first_checkpoint_is_told_to_start_over_with_force(tmp_path):
    run = stopped_run(tmp_path / "run", "sentiment")
    with pytest.raises(ConfigError) as err:
        api.train(resume=run)
    message = str(err.value)
    assert "holds no complete checkpoint" in message and "\n" not in message
    assert f"lorakit train {run / 'config.toml'} --out {run} --force" in message
    with pytest.raises(ConfigError, match="--force starts a run over, --resume continues one"):
        api.train(resume=run, force=True)


def test_a_classic_run_stopped_after_pretraining_is_told_how_to_keep_its_base(tmp_path):
    run = stopped_run(tmp_path / "run", "classic")
    with pytest.raises(ConfigError) as err:
        api.train(resume=run)
    assert "model.pretrained" not in str(err.value)  # nothing pretrained yet
    (run / "base").mkdir()
    for name in ("model.safetensors", "config.json", "vocab.txt"):
        (run / "base" / name).write_text("")
    with pytest.raises(ConfigError) as err:
        api.train(resume=run)
    message = str(err.value)
    assert "--force pretrains the base again" in message
    assert f"--out NEW --set model.pretrained={run / 'base'}" in message


def test_resume_of_a_run_still_training_before_its_first_checkpoint_says_it_is_live(tmp_path):
    """A live run has no checkpoint yet: --resume said "start it again", inviting a second
    process into the folder."""
    from lorakit.rundir import RunDir

    run = tmp_path / "run"
    config = api.resolve_config("sentiment", ["train.log_to=[]"])
    with RunDir.start(run, config):
        with pytest.raises(ConfigError, match=r"--resume: .* is in use by a running `lorakit"):
            api.train(resume=run)
