"""The run directory: every file a run leaves behind (schemas in docs/ARCHITECTURE.md).

``config.toml`` (repeats the run), ``environment.json`` (versions, machine, seed, data fingerprint,
start and end), ``metrics.jsonl`` (one event a line, flushed as written), ``summary.json``
(written atomically) and optionally ``comparison.json`` / ``comparison.md``.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from lorakit.atomic import write_atomically
from lorakit.config import Config, ConfigError, to_toml

_PACKAGES = ("lorakit", "torch", "transformers", "peft", "datasets", "accelerate")


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def default_out(recipe: str) -> Path:
    """``runs/<recipe>-<UTC timestamp>``."""
    return Path("runs") / f"{recipe}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"


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


class RunDir:
    """A run directory, created on construction; refuses a non-empty folder holding a run."""

    def __init__(self, path: str | Path, *, exist_ok: bool = False):
        self.path = Path(path)
        if (self.path / "config.toml").exists() and not exist_ok:
            raise ConfigError(
                f"out: {str(self.path)!r} already holds a run; choose a new --out folder"
            )
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:  # a file in the way, no permission
            raise ConfigError(
                f"out: cannot make the folder {str(self.path)!r} ({error.strerror}); choose "
                "another --out folder"
            ) from None
        self._started_clock = time.monotonic()
        self.environment: dict[str, Any] = {}
        self.trackers = None  # lorakit.trackers.Trackers of a live run: each event goes there too

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
        return json.loads((self.path / "summary.json").read_text(encoding="utf-8"))

    def read_metrics(self) -> list[dict[str, Any]]:
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_run_summary(run_dir: str | Path) -> dict[str, Any]:
    """A finished run's ``summary.json``, or a ConfigError naming the file when it is damaged."""
    path = Path(run_dir) / "summary.json"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        summary = None
    if not isinstance(summary, dict):
        raise ConfigError(
            f"{path} is damaged (not a JSON object); restore it from a copy, or train the run again"
        )
    return summary


def markdown_table(rows: list[dict[str, Any]]) -> str:
    columns = list(rows[0])

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4f}"
        if isinstance(value, int) and not isinstance(value, bool):
            return f"{value:,}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"
