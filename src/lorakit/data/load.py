"""`load_dataset`: one entry point for built-in names, hub names, files and folders."""

from __future__ import annotations

import difflib
from pathlib import Path

from datasets import DatasetDict

from lorakit.data.builtin import BUILTIN
from lorakit.data.errors import DataError
from lorakit.data.files import FILE_SUFFIXES, load_file, load_split_folder, split_files
from lorakit.data.formats import aclimdb, find_aclimdb
from lorakit.data.hub import HUB_DATASETS, load_hub
from lorakit.data.records import Records, to_dataset_dict
from lorakit.data.summaries import BUILTIN_PAIRS

ACCEPTED = (
    "a .csv, .tsv, .jsonl or .parquet file with text and label columns, an AG News CSV, an "
    "aclImdb folder (train|test/pos|neg/*.txt), or a folder with train.* and test.* files"
)


def _unknown(name: str) -> DataError:
    known = [*BUILTIN, *BUILTIN_PAIRS, *HUB_DATASETS]
    close = difflib.get_close_matches(name, known, n=len(known), cutoff=0.0)
    return DataError(
        f"Unknown dataset {name!r}. Did you mean {close[0]!r}? Built-in (offline): "
        f"{', '.join(BUILTIN)}; prompt/response (offline): {', '.join(BUILTIN_PAIRS)}; "
        f"hub (needs a network): {', '.join(HUB_DATASETS)}; "
        f"or a path to {ACCEPTED}. Names by closeness: {', '.join(close)}."
    )


def _looks_like_path(name: str) -> bool:
    return (
        any(sep in name for sep in ("/", "\\"))
        or name.startswith((".", "~"))
        or (Path(name).suffix.lower() in FILE_SUFFIXES)
    )


def _load_path(path: Path, text_column: str, label_column: str) -> Records:
    if path.is_file():
        if path.suffix.lower() not in FILE_SUFFIXES:
            raise DataError(f"{path}: unsupported file type {path.suffix!r}; give {ACCEPTED}.")
        return load_file(path, text_column, label_column)
    if (folder := find_aclimdb(path)) is not None:
        return aclimdb(folder)
    files = split_files(path)
    if "train" in files and "test" in files:
        return load_split_folder(path, text_column, label_column)
    raise DataError(f"{path} is a folder but not one lorakit can read; give {ACCEPTED}.")


def load_dataset(
    name_or_path: str | Path,
    *,
    text_column: str = "text",
    label_column: str = "label",
    validation_fraction: float | None = None,
    training: bool = True,
) -> DatasetDict:
    """Load a classification dataset as `train` / `validation` / `test` splits.

    Columns are `text` (str) and `label` (`datasets.ClassLabel` with names). `name_or_path` is a
    built-in name (`rotten-tomatoes`, `bbc-news`), a hub name (`imdb`, `ag_news`,
    `rotten_tomatoes`; needs a network), or a path to a file or folder (see `ACCEPTED`).
    A built-in prompt/response name (`aclsum`) gives its own splits with columns `prompt` and
    `response` instead.
    `text_column` / `label_column` name the columns of a generic file. `validation_fraction`
    overrides the validation share: 0.1 for hash splits, 0.05 when carved from a given train split.
    `training=False` loads data only to evaluate on: one class is enough and a split may be empty.
    Raises `DataError` (with the fix in its message) for anything it cannot load.
    """
    if validation_fraction is not None and not 0.0 < validation_fraction < 0.9:
        raise DataError(
            f"validation_fraction must be between 0 and 0.9, not {validation_fraction}."
        )
    name = str(name_or_path)
    if name in BUILTIN_PAIRS:
        if validation_fraction is not None:
            raise DataError(
                f"{name} has its own validation split; leave validation_fraction unset."
            )
        return BUILTIN_PAIRS[name]()
    if name in BUILTIN:
        return to_dataset_dict(BUILTIN[name](), validation_fraction, training)
    if name in HUB_DATASETS and not Path(name).exists():
        return load_hub(name, validation_fraction)
    path = Path(name).expanduser()
    if path.exists():
        records = _load_path(path, text_column, label_column)
        return to_dataset_dict(records, validation_fraction, training)
    if _looks_like_path(name):
        raise DataError(
            f"No such file or folder: {path}. Check the path; lorakit reads {ACCEPTED}."
        )
    raise _unknown(name)
