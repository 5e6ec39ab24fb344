"""Loaders for two public layouts: IMDb's `aclImdb` folder and the AG News CSV.

- aclImdb: `train|test/pos|neg/*.txt` (the `unsup` folder is ignored); validation is carved from
  train by text hash (5% unless told otherwise).
- AG News: three columns, class index 1-4, title, description; with the Kaggle header
  (`Class Index,Title,Description`) or without a header (the original / hub CSV).
  Text = title + " " + description; labels World, Sports, Business, Sci/Tech.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from lorakit.data.builtin import SENTIMENT_NAMES
from lorakit.data.errors import DataError
from lorakit.data.records import Records
from lorakit.data.text_io import read_text_folder, warn_replaced

AG_NEWS_NAMES = ["World", "Sports", "Business", "Sci/Tech"]
AG_NEWS_HEADER = ["class index", "title", "description"]


def find_aclimdb(path: Path) -> Path | None:
    """`path` itself or its `aclImdb` subfolder when it has train/ and test/ with pos/ and neg/."""
    for folder in (path, path / "aclImdb"):
        parts = [
            folder / split / polarity for split in ("train", "test") for polarity in ("pos", "neg")
        ]
        if all(part.is_dir() for part in parts):
            return folder
    return None


def aclimdb(folder: Path) -> Records:
    """Reviews of an aclImdb folder: neg = negative (0), pos = positive (1)."""
    texts: list[str] = []
    labels: list[int] = []
    splits: list[str] = []
    replaced = affected = 0
    for split in ("train", "test"):
        for label, polarity in enumerate(("neg", "pos")):
            reviews, bad, files = read_text_folder(folder / split / polarity)
            texts += reviews
            labels += [label] * len(reviews)
            splits += [split] * len(reviews)
            replaced, affected = replaced + bad, affected + files
    source = f"aclImdb folder {folder}"
    if not texts:
        raise DataError(
            f"{source} has no .txt reviews in train/pos, train/neg, test/pos, test/neg."
        )
    warn_replaced(source, replaced, affected)
    return Records(source=source, texts=texts, labels=labels, splits=splits, names=SENTIMENT_NAMES)


def ag_news_layout(frame: pd.DataFrame) -> str | None:
    """Return "header" or "headerless" when a CSV read with a header looks like AG News."""
    if len(frame.columns) != 3:
        return None
    if [str(c).strip().lower() for c in frame.columns] == AG_NEWS_HEADER:
        return "header"
    if str(frame.columns[0]).strip().isdigit():  # the first row was data, read as a header
        return "headerless"
    return None


def ag_news(frame: pd.DataFrame, source: str) -> Records:
    """AG News rows from a 3-column frame (class index, title, description), any header."""
    classes = frame.iloc[:, 0].astype(str).str.strip()
    bad = sorted(set(classes[~classes.isin(["1", "2", "3", "4"])]))
    if bad:
        raise DataError(
            f"{source}: AG News class index must be 1-4 (World, Sports, Business, Sci/Tech); "
            f"found {bad[:5]}. Fix those rows, or read it as a generic CSV with "
            "--set data.text_column=... data.label_column=...."
        )
    titles = frame.iloc[:, 1].fillna("").astype(str).str.strip()
    descriptions = frame.iloc[:, 2].fillna("").astype(str).str.strip()
    texts = (titles + " " + descriptions).str.strip()
    return Records(
        source=source,
        texts=texts.tolist(),
        labels=(classes.astype(int) - 1).tolist(),
        names=AG_NEWS_NAMES,
    )
