"""From rows read by any loader to a checked `DatasetDict` (train / validation / test).

Every loader returns `Records`: texts, raw labels and, when the source has them, split names and
label names. `to_dataset_dict` then does the checks that apply to every source, once:
drop empty texts and missing labels (with a counted warning), turn labels into `ClassLabel` ids,
refuse a single class, assign hash splits, and refuse an empty split.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

from lorakit.data.errors import DataError, first_few, warn
from lorakit.data.splits import SPLITS, carve_validation, split_of

CARVE_FRACTION = 0.05  # validation taken from train when a source has only train and test
# "3.0" too: pandas writes an integer column with a missing value as floats
_INTEGER = re.compile(r"[+-]?\d+(\.0*)?")
SPLIT_ALIASES = {
    "train": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
}


@dataclass
class Records:
    """Rows read from a source. With `names`, `labels` are ids into it; else raw values."""

    source: str
    texts: list[str]
    labels: list[Any]
    splits: list[str] | None = None
    names: list[str] | None = None


def _missing(value: Any) -> bool:
    """None, NaN, pandas' NA and NaT (nullable Int64 / string / datetime columns), or blank."""
    if isinstance(value, str):
        return not value.strip()
    return pd.api.types.is_scalar(value) and bool(pd.isna(value))


def _as_integer(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
        return int(value.strip().partition(".")[0])
    if hasattr(value, "item"):  # a numpy scalar
        return _as_integer(value.item())
    return None


def encode_labels(labels: Sequence[Any]) -> tuple[list[int], list[str]]:
    """Integer labels keep their order (names "0", "1", ...); strings are sorted into names."""
    integers = [_as_integer(label) for label in labels]
    if all(value is not None for value in integers):
        values = sorted(set(integers))
        keys = integers
    else:
        keys = [str(label).strip() for label in labels]
        values = sorted(set(keys))
    index = {value: position for position, value in enumerate(values)}
    return [index[key] for key in keys], [str(value) for value in values]


def _drop_unusable(records: Records) -> list[int]:
    """Indices of rows to keep; warns with counts of what was dropped."""
    empty_text = {i for i, text in enumerate(records.texts) if _missing(text)}
    no_label = {i for i, label in enumerate(records.labels) if _missing(label)} - empty_text
    if empty_text:
        warn(
            f"{records.source}: dropped {len(empty_text)} row(s) whose text is empty or only "
            "whitespace."
        )
    if no_label:
        warn(f"{records.source}: dropped {len(no_label)} row(s) with no label.")
    dropped = empty_text | no_label
    return [i for i in range(len(records.texts)) if i not in dropped]


def _assign_splits(
    texts: list[str], given: list[str] | None, source: str, validation_fraction: float | None
) -> list[str]:
    if given is None:
        fraction = 0.1 if validation_fraction is None else validation_fraction
        return [split_of(text, validation_fraction=fraction) for text in texts]
    unknown = sorted({str(s) for s in given if str(s).strip().lower() not in SPLIT_ALIASES})
    if unknown:
        raise DataError(
            f"{source}: the 'split' column has value(s) {first_few(unknown)}; use train, "
            "validation or test (or drop the column to split by hash)."
        )
    splits = [SPLIT_ALIASES[str(s).strip().lower()] for s in given]
    if "validation" not in splits:
        fraction = CARVE_FRACTION if validation_fraction is None else validation_fraction
        splits = [
            carve_validation(text, fraction) if split == "train" else split
            for text, split in zip(texts, splits, strict=True)
        ]
    return splits


def to_dataset_dict(
    records: Records, validation_fraction: float | None = None, training: bool = True
) -> DatasetDict:
    """Check and split `records`; the result has columns `text` (str) and `label` (ClassLabel).

    `training=False` (data to evaluate on): one class is enough and a split may be empty.
    """
    if not records.texts:
        raise DataError(f"{records.source} has no rows: give a file with at least one example.")
    keep = _drop_unusable(records)
    for kind, values in (("text", records.texts), ("label", records.labels)):
        row = next((i for i in keep if pd.api.types.is_list_like(values[i])), None)
        if row is not None:  # multi-label data would train on classes like "['joy', 'love']"
            raise DataError(
                f"{records.source}: row {row + 1} has a {kind} that is a list or an object "
                f"({values[row]!r:.60}); each row needs a single {kind}, as a string or a "
                f"number. Check data.{kind}_column."
            )
    texts = [str(records.texts[i]).strip() for i in keep]
    raw_labels = [records.labels[i] for i in keep]
    if records.names is None:
        labels, names = encode_labels(raw_labels)
    else:
        labels, names = [int(label) for label in raw_labels], list(records.names)
    present = Counter(labels)
    if training and len(present) < 2:
        only = names[next(iter(present))] if present else "none"
        raise DataError(
            f"{records.source}: every usable row has the same label ({only!r}); a classifier "
            "needs at least two classes. Check the label column (data.label_column)."
        )
    alone = [label for label, count in present.items() if count == 1]
    if training and len(alone) > len(labels) / 2:  # e.g. the text and label columns swapped
        shown = ", ".join(repr(names[label][:40]) for label in alone[:3])
        raise DataError(
            f"{records.source}: {len(alone)} of {len(labels)} rows have a label that no other "
            f"row has ({shown}, ...): that is not a column of classes. Check data.label_column "
            "and data.text_column (swapped?)."
        )
    given = None if records.splits is None else [records.splits[i] for i in keep]
    splits = _assign_splits(texts, given, records.source, validation_fraction)
    features = Features({"text": Value("string"), "label": ClassLabel(names=names)})
    parts = {}
    for split in SPLITS:
        rows = [i for i, s in enumerate(splits) if s == split]
        if not rows and training:
            sizes = ", ".join(f"{s}={splits.count(s)}" for s in SPLITS)
            raise DataError(
                f"{records.source}: the {split} split is empty ({sizes}). Give more rows "
                "(at least a few dozen) or a 'split' column with train, validation and test."
            )
        columns = {"text": [texts[i] for i in rows], "label": [labels[i] for i in rows]}
        parts[split] = Dataset.from_dict(columns, features=features)
    return DatasetDict(parts)
