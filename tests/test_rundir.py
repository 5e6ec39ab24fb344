"""The run directory: atomic summary, flushed metrics, config round trip, comparison table, and
its lifecycle (`RunDir.start`): trackers, the lock, a failed setup's cleanup, resume facts."""

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


# ---------------------------------------------------------------- RunDir.start: a run's lifecycle
def classic_config(*overrides):
    return load_config(recipe_path("classic"), ["train.log_to=[]", *overrides])


@pytest.fixture
def fake_trackers(monkeypatch):
    """Trackers that make their folder when opened and note whether it is there when closed."""
    from lorakit import trackers

    closed = []

    class Trackers:
        def __init__(self, names, run_path, config, resumed_at=None):
            self.folder, self.resumed_at = run_path / "tensorboard", resumed_at
            self.folder.mkdir(exist_ok=True)
            self.events = []

        def event(self, record):
            self.events.append(record)

        def finish(self):
            closed.append(self.folder.is_dir())

    monkeypatch.setattr(trackers, "Trackers", Trackers)
    return closed


def test_start_writes_the_config_sends_events_and_records_the_processes(tmp_path, fake_trackers):
    config = classic_config()
    with RunDir.start(tmp_path / "run", config, processes=2) as run:
        assert load_config(run.path / "config.toml") == config.model_copy(update={"out": None})
        run.start_environment(seed=1)
        run.log("train", step=1, loss=0.5)
        assert run.trackers.events == [{"event": "train", "step": 1, "loss": 0.5}]
    assert fake_trackers == [True] and run.trackers is None
    assert json.loads((run.path / "environment.json").read_text())["processes"] == 2


@pytest.mark.parametrize("existing", [False, True])
def test_a_run_failing_in_setup_closes_its_trackers_then_removes_what_it_wrote(
    tmp_path, fake_trackers, existing
):
    out = tmp_path / "run"
    if existing:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="bad data"), RunDir.start(out, classic_config()) as run:
        run.start_environment(seed=1)
        raise ValueError("bad data")
    assert fake_trackers == [True]  # closed while its folder was still there
    assert out.is_dir() == existing
    assert not existing or sorted(os.listdir(out)) == ["notes.txt"]


def test_a_run_failing_after_setup_keeps_its_folder(tmp_path, fake_trackers):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt), RunDir.start(out, classic_config()) as run:
        run.log("train", step=1, loss=0.5)
        raise KeyboardInterrupt
    assert sorted(os.listdir(out)) == ["config.toml", "metrics.jsonl", "tensorboard"]


def test_a_resumed_run_keeps_its_first_start_and_names_the_checkpoint(tmp_path, fake_trackers):
    out, config = tmp_path / "run", classic_config()
    with pytest.raises(KeyboardInterrupt), RunDir.start(out, config) as run:
        run.start_environment(seed=1)
        run.log("train", step=1, loss=0.5)
        raise KeyboardInterrupt  # stopped; its folder stays for --resume
    started = json.loads((out / "environment.json").read_text())["started"]
    checkpoint = out / "checkpoints" / "step-3"
    with RunDir.start(out, config, resume=checkpoint, resumed_at=3) as run:
        assert run.trackers.resumed_at == 3
        run.start_environment(seed=1)
    environment = json.loads((out / "environment.json").read_text())
    assert environment["started"] == started and environment["resumed_from"] == "step-3"
    assert environment["processes"] == 1


def test_a_failed_resume_keeps_the_run(tmp_path, fake_trackers):
    out, config = tmp_path / "run", classic_config()
    out.mkdir()
    (out / "config.toml").write_text("kept")
    with pytest.raises(ValueError), RunDir.start(out, config, resume=out / "step-3", resumed_at=3):
        raise ValueError
    assert (out / "config.toml").read_text() == "kept" and (out / "tensorboard").is_dir()


def test_a_live_run_holds_its_folder(tmp_path, fake_trackers):
    out, config = tmp_path / "run", classic_config()
    with RunDir.start(out, config) as run:
        run.log("train", step=1, loss=0.5)
        with pytest.raises(ConfigError, match=r"out: .* is in use by a running `lorakit train`"):
            with RunDir.start(out, config):
                pass
        resume = {"resume": out / "checkpoints" / "step-1", "resumed_at": 1}
        with pytest.raises(ConfigError, match=r"--resume: .* is in use .* or stop it$"):
            with RunDir.start(out, config, **resume):
                pass
        assert sorted(os.listdir(out)) == ["config.toml", "metrics.jsonl", "tensorboard"]
    with RunDir.start(out, config, **resume):  # the lock went with the run
        pass
    with pytest.raises(ConfigError, match="already holds a run"):
        with RunDir.start(out, config):
            pass


def test_the_lock_is_the_operating_systems_and_leaves_no_file(tmp_path, fake_trackers):
    """Another process sees the lock; the folder holds only what the run wrote."""
    import subprocess
    import sys
    import textwrap

    out = tmp_path / "run"
    probe = textwrap.dedent(f"""
        import fcntl, os
        fd = os.open({str(out)!r}, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            print("free")
        except BlockingIOError:
            print("locked")
    """)
    with RunDir.start(out, classic_config()):
        held = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
        assert sorted(os.listdir(out)) == ["config.toml", "tensorboard"]
    after = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert (held.stdout.strip(), after.stdout.strip()) == ("locked", "free")


def test_read_run_summary_names_a_missing_or_damaged_file(tmp_path):
    from lorakit.rundir import read_run_summary

    assert read_run_summary(tmp_path, missing_ok=True) is None
    with pytest.raises(ConfigError, match=r"summary\.json is missing: the run did not finish"):
        read_run_summary(tmp_path)
    (tmp_path / "summary.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"summary\.json is damaged"):
        read_run_summary(tmp_path)


def test_a_lock_whose_process_was_killed_never_blocks(tmp_path, fake_trackers):
    """The lock is flock's: the OS gives it back when its holder dies, even by SIGKILL, so a
    stale lock of a dead run never blocks `--resume` or `--force`."""
    import signal
    import subprocess
    import sys
    import textwrap

    from lorakit.rundir import check_not_running

    out, config = tmp_path / "run", classic_config()
    holder = textwrap.dedent(f"""
        import sys, time
        from lorakit.config import load_config
        from lorakit.recipes import recipe_path
        from lorakit.rundir import RunDir
        config = load_config(recipe_path("classic"), ["train.log_to=[]"])
        with RunDir.start({str(out)!r}, config):
            print("holding", flush=True)
            time.sleep(600)
    """)
    process = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "holding"
        for option, start in (
            ("--resume", {"resume": out / "checkpoints" / "step-1", "resumed_at": 1}),
            ("out", {"force": True}),
        ):
            with pytest.raises(ConfigError, match=rf"{option}: .* is in use by a running"):
                with RunDir.start(out, config, **start):
                    pass
            with pytest.raises(ConfigError, match=rf"{option}: .* is in use by a running"):
                check_not_running(out, option)
        assert sorted(os.listdir(out)) == ["config.toml"]  # --force removed nothing
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL
    check_not_running(out, "--resume")  # the dead holder's lock is gone, and left no file
    with RunDir.start(out, config, resume=out / "checkpoints" / "step-1", resumed_at=1):
        pass


def test_force_starts_over_removing_the_old_runs_files_only(tmp_path, fake_trackers):
    out, config = tmp_path / "run", classic_config()
    with RunDir.start(out, config) as run:
        run.log("train", step=1, loss=0.5)
        run.write_summary({"test_accuracy": 0.5})
    for folder in ("checkpoints/step-3", "adapter", "base"):
        (out / folder).mkdir(parents=True)
        (out / folder / "file").write_text("old")
    (out / ".summary.json.abc.tmp").write_text("half")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already holds a run; .* add --force to start over"):
        with RunDir.start(out, config):
            pass
    with RunDir.start(out, classic_config("seed=7"), force=True) as run:
        assert sorted(os.listdir(out)) == ["config.toml", "notes.txt", "tensorboard"]
        assert "seed = 7" in (out / "config.toml").read_text()
        assert run.read_metrics() == []
