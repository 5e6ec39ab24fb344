"""Generic files: `.csv` / `.tsv`, `.jsonl` (or `.json`), `.parquet`, with named columns.

The text and label columns are named by the caller (`data.text_column`, `data.label_column`).
A `split` column with train / validation / test values is honoured; otherwise rows are split by
text hash. A CSV that is AG News (see `formats`) is read as AG News. A folder holding
`train.*` and `test.*` (and optionally `validation.*`) uses those files as the splits.
Every pandas / pyarrow failure becomes a DataError naming the file.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd

from lorakit.data.errors import DataError
from lorakit.data.formats import ag_news, ag_news_layout
from lorakit.data.records import Records
from lorakit.data.text_io import decode, read_bytes, warn_replaced

FILE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
SPLIT_COLUMN = "split"
COLUMN_FIX = "--set data.text_column=... data.label_column=... (or text_column=/label_column=)"


def _separator(text: str, path: Path) -> str:
    """Tab for a .tsv; a comma when the first row has one; else whichever of ; tab | it has most
    of: spreadsheets in many locales save "CSV" with semicolons."""
    header = text.split("\n", 1)[0]
    if path.suffix.lower() == ".tsv":
        return "\t"
    if "," in header or not any(sep in header for sep in ";\t|"):
        return ","
    return max(";\t|", key=header.count)


def _read_csv(text: str, path: Path, **options) -> pd.DataFrame:
    sep = _separator(text, path)
    try:  # skipinitialspace: `text, label` and `1, "a, quoted text"`, as people type them
        return pd.read_csv(
            io.StringIO(text), sep=sep, dtype=str, keep_default_na=False, skipinitialspace=True,
            **options,
        )  # fmt: skip
    except Exception as error:  # pandas raises several types; none should reach the user raw
        raise DataError(
            f"Cannot read {path} as CSV: {error}. Check quoting and separators."
        ) from None


def _json_columns(text: str) -> dict | None:
    """The file as one JSON object of columns, as pandas' `to_json()` writes it (`{"text":
    {"0": ...}, ...}` or `{"text": [...], ...}`); None for anything else (JSON lines)."""
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(whole, dict) or not whole:
        return None
    return whole if all(isinstance(v, (dict, list)) for v in whole.values()) else None


def _read_json_records(text: str, path: Path) -> pd.DataFrame:
    columns = _json_columns(text) if text.lstrip().startswith("{") else None
    if columns is not None:
        try:
            return pd.DataFrame(columns)
        except ValueError as error:  # columns of different lengths
            raise DataError(f"{path}: cannot read its JSON object as columns: {error}.") from None
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{path} is not valid JSON: {error}.") from None
    else:
        rows = []
        # lines end at "\n" only: splitlines() also breaks at U+2028 and U+0085, which JSON
        # strings may hold unescaped (json.dumps(..., ensure_ascii=False))
        for number, line in enumerate(text.split("\n"), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise DataError(
                        f"{path}, line {number}: not valid JSON ({error.msg}). "
                        "Each line of a .jsonl file must be one JSON object."
                    ) from None
    if not all(isinstance(row, dict) for row in rows):
        raise DataError(
            f'{path}: every record must be a JSON object like {{"text": ..., "label": ...}}.'
        )
    return pd.DataFrame(rows)


def _read_parquet(path: Path) -> tuple[pd.DataFrame, int]:
    try:
        frame = pd.read_parquet(path)
    except Exception as error:  # pyarrow's ArrowInvalid and friends
        raise DataError(f"Cannot read {path} as Parquet: {error}.") from None
    replaced = 0
    for column in frame.columns:
        if frame[column].map(lambda v: isinstance(v, bytes)).any():
            decoded = [decode(v) if isinstance(v, bytes) else (v, 0) for v in frame[column]]
            frame[column] = [text for text, _ in decoded]
            replaced += sum(bad for _, bad in decoded)
    return frame, replaced


def read_table(path: Path) -> pd.DataFrame:
    """A file as a frame of columns; CSV cells stay strings. Warns about replaced bytes."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        read_bytes(path)  # the same not-found / unreadable messages as the other formats
        frame, replaced = _read_parquet(path)
    else:
        raw = read_bytes(path)
        if not raw.strip():
            raise DataError(f"{path} is empty: give a file with a header row and examples.")
        text, replaced = decode(raw)
        frame = (
            _read_json_records(text, path)
            if suffix in (".jsonl", ".json")
            else _read_csv(text, path)
        )
    warn_replaced(str(path), replaced)
    if frame.empty:
        raise DataError(f"{path} has no rows: give a file with at least one example.")
    return frame


def load_file(path: Path, text_column: str, label_column: str) -> Records:
    """Records of one file: the named columns, or AG News when the CSV is in that layout."""
    frame = read_table(path)
    source = str(path)
    columns = [str(column) for column in frame.columns]
    if text_column in columns and label_column in columns:
        splits = frame[SPLIT_COLUMN].tolist() if SPLIT_COLUMN in columns else None
        return Records(source, frame[text_column].tolist(), frame[label_column].tolist(), splits)
    layout = ag_news_layout(frame) if path.suffix.lower() == ".csv" else None
    if layout == "headerless":
        frame = _read_csv(decode(read_bytes(path))[0], path, header=None)
    if layout:
        return ag_news(frame, source)
    missing = [c for c in (text_column, label_column) if c not in columns]
    raise DataError(
        f"{path} has no column {', '.join(repr(c) for c in missing)}; its columns are "
        f"{columns}. Name the right ones: {COLUMN_FIX}."
    )


def split_files(folder: Path) -> dict[str, Path]:
    """`train.*`, `validation.*` (or `valid.*`, `dev.*`) and `test.*` files in a folder."""
    found: dict[str, Path] = {}
    for split, stems in (
        ("train", ["train"]),
        ("validation", ["validation", "valid", "dev"]),
        ("test", ["test"]),
    ):
        for stem in stems:
            for suffix in FILE_SUFFIXES:
                if (folder / f"{stem}{suffix}").is_file() and split not in found:
                    found[split] = folder / f"{stem}{suffix}"
    return found


def load_split_folder(folder: Path, text_column: str, label_column: str) -> Records:
    """One Records from a folder's split files; each row keeps its file's split."""
    files = split_files(folder)
    parts = {split: load_file(path, text_column, label_column) for split, path in files.items()}
    names = {tuple(part.names) if part.names else None for part in parts.values()}
    if len(names) > 1:
        raise DataError(f"{folder}: the split files have different layouts or label sets {names}.")
    return Records(
        source=str(folder),
        texts=[text for part in parts.values() for text in part.texts],
        labels=[label for part in parts.values() for label in part.labels],
        splits=[split for split, part in parts.items() for _ in part.texts],
        names=parts["train"].names,
    )
