"""Reading a run directory's files for reports, and writing report files atomically.

Reports read files, never live objects, so a report can be made for a finished run, a run still
in progress, or a run copied from another machine.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lorakit.atomic import write_atomically  # noqa: F401 (re-exported for the report modules)
from lorakit.config import ConfigError
from lorakit.rundir import read_run_summary


class ReportError(ValueError):
    """A run or sweep directory lacks what a report needs; the message names the file and fix."""


METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.toml"
ENVIRONMENT_FILE = "environment.json"
COMPARISON_FILE = "comparison.json"
SWEEP_CSV = "sweep.csv"
SWEEP_MD = "sweep.md"
PLOTS_DIR = "plots"
REPORT_FILE = "report.html"


def existing_dir(path: str | os.PathLike[str], what: str = "run directory") -> Path:
    """`path` as a Path, or a ReportError saying it is not a directory."""
    directory = Path(path)
    if not directory.is_dir():
        raise ReportError(f"{what} {directory} does not exist or is not a directory")
    return directory


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The events of `metrics.jsonl`, in order.

    A run still training may be caught mid-write, so a last line that is not complete JSON is
    dropped; a broken line elsewhere is an error naming its line number.
    """
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise ReportError(
            f"{path} is missing: the run has logged no metrics yet "
            "(train first with `lorakit train`, or wait for the first logged step)"
        )
    lines = path.read_text(encoding="utf-8").splitlines()
    events: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):
                break
            raise ReportError(f"{path} line {number} is not valid JSON ({error.msg})") from None
        if not isinstance(event, dict) or "event" not in event:
            raise ReportError(f'{path} line {number} is not an object with an "event" key')
        events.append(event)
    return events


def read_json(path: Path) -> Any:
    """A JSON file's content, or a ReportError naming the file."""
    if not path.is_file():
        raise ReportError(f"{path} is missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ReportError(
            f"{path} is not valid JSON ({error.msg} at line {error.lineno})"
        ) from None


def read_optional_json(path: Path) -> Any | None:
    """Like `read_json`, but None when the file does not exist."""
    return read_json(path) if path.is_file() else None


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """`summary.json` as a dict, or None when the run has not finished writing one."""
    try:
        return read_run_summary(run_dir, missing_ok=True)
    except ConfigError as error:  # damaged
        raise ReportError(str(error)) from None
