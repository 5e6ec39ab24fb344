"""The run directory: every file a run leaves behind (schemas in docs/ARCHITECTURE.md).

``config.toml`` (repeats the run), ``environment.json`` (versions, machine, seed, data fingerprint,
start and end), ``metrics.jsonl`` (one event a line, flushed as written), ``summary.json``
(written atomically, read back by ``read_run_summary``) and optionally ``comparison.json`` /
``comparison.md``.

A training run lives inside ``RunDir.start``, which owns the folder from start to end::

    with RunDir.start(path, config) as run_dir:   # locked, config.toml written, trackers open
        summary = recipe.run(config, run_dir)
    # trackers closed; environment.json has the run's facts; a run that failed in setup is gone
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from lorakit import trackers
from lorakit.atomic import write_atomically
from lorakit.config import Config, ConfigError, to_toml

try:
    import fcntl
except ImportError:  # Windows: runs are not locked there
    fcntl = None

_PACKAGES = ("lorakit", "torch", "transformers", "peft", "datasets", "accelerate")


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def default_out(name: str) -> Path:
    """``runs/<name>-<UTC timestamp>``; ``name`` is the config's ``run_name``."""
    return Path("runs") / f"{name}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON atomically: a reader sees the old file or the new one, never half of one."""
    write_atomically(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    found["python"] = sys.version.split()[0]
    return found


# Files a run that failed in setup (data, model or LoRA settings) may have written: such a run
# is removed, so that the same --out works once the input is fixed.
_SETUP_FILES = {"config.toml", "environment.json", "tensorboard", "wandb"}

# Everything a run writes in its folder (recipes included): what `train --force` removes
RUN_FILES = frozenset({
    *_SETUP_FILES, "metrics.jsonl", "summary.json", "comparison.json", "comparison.md",
    "comparison", "report.html", "plots", "adapter", "base", "model", "checkpoints", "hf_trainer",
})  # fmt: skip


class RunDir:
    """A run directory, created on construction; refuses a non-empty folder holding a run."""

    def __init__(self, path: str | Path, *, exist_ok: bool = False):
        self.path = Path(path)
        if (self.path / "config.toml").exists() and not exist_ok:
            raise ConfigError(
                f"out: {str(self.path)!r} already holds a run; choose a new --out folder, or "
                "add --force to start over in it (its files are removed)"
            )
        make_out_folder(self.path)
        self._started_clock = time.monotonic()
        self.environment: dict[str, Any] = {}
        self.trackers = None  # lorakit.trackers.Trackers of a live run: each event goes there too

    @classmethod
    @contextlib.contextmanager
    def start(
        cls,
        path: str | Path,
        config: Config,
        *,
        resume: Path | None = None,
        resumed_at: int | None = None,
        processes: int = 1,
        force: bool = False,
    ) -> Iterator[RunDir]:
        """The run directory of one training run, held for the ``with`` block.

        On entry: the trackers ``train.log_to`` names are checked (a missing package fails
        before any work), the folder is made and locked (a folder a live run holds is a
        ConfigError), a new run's ``config.toml`` is written and the trackers are opened.
        ``resume``: the checkpoint folder a stopped run continues from (its folder then holds a
        run already), at optimizer step ``resumed_at``. ``force``: start over in a folder that
        holds a run, whose files (``RUN_FILES``) are removed once the lock is held.

        On exit the trackers are closed first (their writers still write into the folder). A new
        run that failed before writing more than its setup files is removed; a run that got
        further keeps its folder (metrics, checkpoints for --resume, a pretrained base). A run
        that finished records ``processes`` (and, resumed, its first start and the checkpoint)
        in ``environment.json``.
        """
        names = trackers.resolve(config.train.log_to)
        path = Path(path)
        before = set(os.listdir(path)) if path.is_dir() else None
        make_out_folder(path)
        with _locked(path, "--resume" if resume else "out"):
            if force and resume is None:
                _remove_run(path)
                before = set(os.listdir(path))
            run_dir = cls(path, exist_ok=resume is not None)
            first = _read_environment(path) if resume else {}
            if resume is None:
                run_dir.write_config(config)
            try:
                with run_dir._tracked(names, config, resumed_at):
                    yield run_dir
            except BaseException:  # the trackers are closed by now: their folders can go
                if resume is None:
                    _discard_unstarted(path, before)
                raise
            facts: dict[str, Any] = {"processes": processes}
            if resume is not None:
                facts.update(started=first.get("started"), resumed_from=resume.name)
            run_dir.update_environment(**facts)

    @contextlib.contextmanager
    def _tracked(self, names: list[str], config: Config, resumed_at: int | None) -> Iterator[None]:
        """The trackers open, each logged event sent to them; closed at the end."""
        self.trackers = trackers.Trackers(names, self.path, config, resumed_at)
        try:
            yield
        finally:
            self.trackers.finish()
            self.trackers = None

    # paths ------------------------------------------------------------------
    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"

    @property
    def plots_dir(self) -> Path:
        return self.path / "plots"

    # writing ----------------------------------------------------------------
    def write_config(self, config: Config) -> None:
        header = (
            f"lorakit run config, resolved {utc_now()}. Repeat the run with:\n"
            f"  lorakit train {self.path / 'config.toml'}\n"
            f'out = "{self.path}"  (left out, so that a repeat makes a new run directory)'
        )
        text = to_toml(config.model_copy(update={"out": None}), header=header)
        (self.path / "config.toml").write_text(text, encoding="utf-8")

    def start_environment(self, seed: int, data_fingerprint: str | None = None) -> None:
        self.environment = {
            **versions(),
            "platform": platform.platform(),
            "cpu": cpu_model(),
            "cpu_count": os.cpu_count(),
            "seed": seed,
            "data_fingerprint": data_fingerprint,
            "started": utc_now(),
            "finished": None,
        }
        write_json_atomic(self.path / "environment.json", self.environment)

    def update_environment(self, **fields: Any) -> None:
        self.environment.update(fields)
        write_json_atomic(self.path / "environment.json", self.environment)

    def finish_environment(self) -> None:
        self.update_environment(finished=utc_now())

    def log(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one event to ``metrics.jsonl`` and flush it to disk at once."""
        record = {"event": event, **fields}
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
        if self.trackers is not None:
            self.trackers.event(record)
        return record

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json_atomic(self.path / "summary.json", summary)

    def write_comparison(self, rows: list[dict[str, Any]], title: str = "") -> str:
        """Write ``comparison.json`` and ``comparison.md``; return the markdown table."""
        if not rows:
            raise ValueError("a comparison needs at least one row")
        columns = list(rows[0])
        if any(list(row) != columns for row in rows):
            raise ValueError("every comparison row needs the same keys in the same order")
        write_json_atomic(self.path / "comparison.json", rows)
        table = markdown_table(rows)
        text = (f"# {title}\n\n" if title else "") + table
        (self.path / "comparison.md").write_text(text, encoding="utf-8")
        return table

    # reading ----------------------------------------------------------------
    def read_summary(self) -> dict[str, Any]:
        return read_run_summary(self.path)

    def read_metrics(self) -> list[dict[str, Any]]:
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_run_summary(run_dir: str | Path, *, missing_ok: bool = False) -> dict[str, Any] | None:
    """A finished run's ``summary.json``; a ConfigError naming the file when it is damaged, or
    missing (None instead with ``missing_ok``: the run is still training or stopped)."""
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        if missing_ok:
            return None
        raise ConfigError(
            f"{path} is missing: the run did not finish; give the folder of a finished run"
        )
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        summary = None
    if not isinstance(summary, dict):
        raise ConfigError(
            f"{path} is damaged (not a JSON object); restore it from a copy, or train the run again"
        )
    return summary


def make_out_folder(path: Path, what: str = "folder") -> None:
    """Make an ``--out`` folder (and its parents), or a ConfigError saying why not."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a file in the way, no permission
        raise ConfigError(
            f"out: cannot make the {what} {str(path)!r} ({error.strerror}); choose "
            "another --out folder"
        ) from None


def check_not_running(path: str | Path, option: str) -> None:
    """A ConfigError when a live `lorakit train` holds the folder (its lock is taken and given
    back at once); a lock whose process died went with it."""
    if Path(path).is_dir():
        with _locked(Path(path), option):
            pass


@contextlib.contextmanager
def _locked(path: Path, option: str) -> Iterator[None]:
    """An exclusive lock on the folder itself while the run lives (so no lock file is left
    behind); the OS drops it when the process ends, however it ends."""
    if fcntl is None:  # Windows: unlocked
        yield
        return
    descriptor = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        fix = "" if option == "--resume" else ", or choose a new --out folder"
        raise ConfigError(
            f"{option}: {str(path)!r} is in use by a running `lorakit train`; wait for it to end "
            f"or stop it{fix}"
        ) from None
    except OSError:  # a file system without locks (some network mounts): unlocked
        pass
    try:
        yield
    finally:  # unlocked explicitly: a data loader's forked worker may hold a copy of the descriptor
        with contextlib.suppress(OSError):
            fcntl.flock(descriptor, fcntl.LOCK_UN)
        os.close(descriptor)


def _read_environment(path: Path) -> dict[str, Any]:
    environment = path / "environment.json"
    return json.loads(environment.read_text()) if environment.exists() else {}


def _remove_run(path: Path) -> None:
    """Remove what a run wrote in ``path`` (and the temporary files of its atomic writes);
    anything else in the folder stays."""
    for child in path.iterdir():
        name = child.name
        ours = name in RUN_FILES or any(name.startswith(f".{n}.") for n in RUN_FILES)
        if ours and child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        elif ours:
            child.unlink()


def _discard_unstarted(path: Path, before: set[str] | None) -> None:
    """Remove what a run that failed in setup wrote (only setup files), and the folder itself
    when the run made it; a run that wrote anything else keeps everything."""
    written = set(os.listdir(path)) - (before or set())
    if not written <= _SETUP_FILES:
        return
    for name in written:
        if (path / name).is_dir():  # a tracker's folder, opened at the start
            shutil.rmtree(path / name)
        else:
            (path / name).unlink()
    if before is None:
        path.rmdir()


def markdown_table(rows: list[dict[str, Any]]) -> str:
    columns = list(rows[0])

    def cell(value: Any) -> str:
        if isinstance(value, float):  # a learning rate such as 5e-05 keeps its digits
            return f"{value:.4f}" if value == 0 or abs(value) >= 1e-3 else f"{value:.3g}"
        if isinstance(value, int) and not isinstance(value, bool):
            return f"{value:,}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"
