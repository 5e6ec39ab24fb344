"""Which columns of a user's file are the text and the label (`lorakit train my.csv`).

    text:  the longest free-text column (strings, not numbers, mostly distinct)
    label: the one column left with few distinct values (2 to a quarter of the rows, 100 at most)

A column named `text` or `label` is taken as such, as `load_dataset` would. A guess that is not
clear (no free text, two free-text columns of about the same length, no or several label-like
columns) is a DataError naming the columns and the `--set` that settles it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from lorakit.data.errors import DataError
from lorakit.data.files import SPLIT_COLUMN, read_table, split_files

SET_COLUMNS = "--set text_column=... label_column=..."
MAX_CLASSES = 100
CLOSE_LENGTHS = 0.9  # a second free-text column this close in mean length leaves it unsure


@dataclass(frozen=True)
class ColumnGuess:
    text_column: str
    label_column: str
    line: str  # what was guessed, in one line, and how to say otherwise


@dataclass(frozen=True)
class _Profile:
    name: str
    distinct: int
    mean_length: float
    numeric: bool


def _profile(name: str, column: pd.Series) -> _Profile:
    values = [str(v).strip() for v in column if not pd.isna(v) and str(v).strip()]
    numeric = bool(values) and pd.to_numeric(pd.Series(values), errors="coerce").notna().all()
    mean_length = sum(map(len, values)) / len(values) if values else 0.0
    return _Profile(name, len(set(values)), mean_length, bool(numeric))


def guess_columns(
    path: str | Path, text_column: str | None = None, label_column: str | None = None
) -> ColumnGuess:
    """The text and label columns of the file (or split folder) at ``path``; the ones given are
    kept and only the others guessed."""
    path = Path(path)
    table = split_files(path).get("train") if path.is_dir() else path
    if table is None:
        raise DataError(f"{path}: no file to read the columns of; name them: {SET_COLUMNS}")
    frame = read_table(table)
    names = [str(c) for c in frame.columns if str(c) != SPLIT_COLUMN]
    profiles = {name: _profile(name, frame[name]) for name in names}
    text = text_column or _text_column(path, profiles, len(frame))
    label = label_column or _label_column(path, profiles, len(frame), text)
    guessed = [
        f"the text column {text!r} (the longest free text)" if not text_column else None,
        f"the label column {label!r} ({profiles[label].distinct} values)"
        if not label_column and label in profiles
        else None,
    ]
    said = " and ".join(g for g in guessed if g)
    line = f"{path.name}: {said}; name others with {SET_COLUMNS}" if said else ""
    return ColumnGuess(text, label, line)


def _text_column(path: Path, profiles: dict[str, _Profile], rows: int) -> str:
    if "text" in profiles:
        return "text"
    free = sorted(
        (p for p in profiles.values() if not p.numeric and p.distinct >= rows / 2),
        key=lambda p: p.mean_length,
        reverse=True,
    )
    if not free:
        raise DataError(
            f"{path}: no column holds free text to classify; its columns are {list(profiles)}. "
            f"Name them: {SET_COLUMNS}"
        )
    if len(free) > 1 and free[1].mean_length >= CLOSE_LENGTHS * free[0].mean_length:
        raise DataError(
            f"{path}: the text could be {free[0].name!r} or {free[1].name!r} (about as long); "
            f"name it: {SET_COLUMNS}"
        )
    return free[0].name


def _label_column(path: Path, profiles: dict[str, _Profile], rows: int, text: str) -> str:
    if "label" in profiles and text != "label":
        return "label"
    most = max(2, min(MAX_CLASSES, rows // 4))
    few = [p.name for p in profiles.values() if p.name != text and 2 <= p.distinct <= most]
    if len(few) == 1:
        return few[0]
    found = (f"columns {', '.join(map(repr, few))} could each be it" if few
             else f"no column has 2 to {most} distinct values; its columns are {list(profiles)}")  # fmt: skip
    raise DataError(f"{path}: cannot tell the label column: {found}. Name it: {SET_COLUMNS}")
