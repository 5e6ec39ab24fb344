"""Built-in datasets, hash splits, fingerprints, name resolution and the offline hub path."""

from __future__ import annotations

import importlib.util
import os
import random
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from datasets import ClassLabel

from lorakit.data import DataError, dataset_fingerprint, load_dataset, split_of
from lorakit.data.summaries import SUMMARIZE_INSTRUCTION, aclsum
from lorakit.network import OfflineError, hub_reachable

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def data_rotten_tomatoes():
    return load_dataset("rotten-tomatoes")


@pytest.fixture(scope="module")
def data_bbc_news():
    return load_dataset("bbc-news")


def _label_counts(dsd) -> dict[str, int]:
    names = dsd["train"].features["label"].names
    counts = Counter(label for split in dsd.values() for label in split["label"])
    return {names[label]: count for label, count in counts.items()}


def _assert_about_80_10_10(dsd) -> None:
    total = sum(len(split) for split in dsd.values())
    assert list(dsd) == ["train", "validation", "test"]
    assert abs(len(dsd["train"]) / total - 0.8) < 0.02
    assert abs(len(dsd["validation"]) / total - 0.1) < 0.02
    assert abs(len(dsd["test"]) / total - 0.1) < 0.02


def test_rotten_tomatoes_counts_labels_and_splits(data_rotten_tomatoes):
    dsd = data_rotten_tomatoes
    assert set(dsd["train"].column_names) == {"text", "label"}
    assert dsd["train"].features["label"] == ClassLabel(names=["negative", "positive"])
    assert sum(len(split) for split in dsd.values()) == 12_752
    assert _label_counts(dsd) == {"positive": 7_368, "negative": 5_384}
    texts = [text for split in dsd.values() for text in split["text"]]
    assert len(set(texts)) == len(texts), "duplicate texts must be dropped"
    _assert_about_80_10_10(dsd)


def test_bbc_news_counts_labels_and_splits(data_bbc_news):
    dsd = data_bbc_news
    names = ["business", "entertainment", "politics", "sport", "tech"]
    assert dsd["train"].features["label"].names == names
    assert _label_counts(dsd) == dict(zip(names, [510, 386, 417, 511, 401], strict=True))
    first = dsd["train"][0]["text"]
    assert "\n" in first and len(first.splitlines()[0]) < 150, "title line, then the body"
    everything = "".join(text for split in dsd.values() for text in split["text"])
    assert "\ufffd" not in everything and "£15.8m" in everything  # the one cp1252 article
    _assert_about_80_10_10(dsd)


def test_every_row_sits_in_the_split_its_text_hashes_to(data_bbc_news):
    for split, dataset in data_bbc_news.items():
        assert {split_of(text) for text in dataset["text"]} == {split}


def test_split_of_ignores_row_order_case_and_spacing():
    texts = [f"review number {i}: a film" for i in range(300)]
    shuffled = texts[:]
    random.Random(0).shuffle(shuffled)
    assert {t: split_of(t) for t in texts} == {t: split_of(t) for t in shuffled}
    assert split_of("A  Fine Film\n") == split_of("a fine film")
    assert Counter(split_of(t) for t in texts).keys() == {"train", "validation", "test"}


def test_fingerprint_is_stable_across_processes_and_changes_with_data(data_rotten_tomatoes):
    here = dataset_fingerprint(data_rotten_tomatoes)
    assert len(here) == 16 and int(here, 16) >= 0
    code = "from lorakit.data import *; print(dataset_fingerprint(load_dataset('rotten-tomatoes')))"
    env = {**os.environ, "PYTHONPATH": str(SRC), "PYTHONHASHSEED": "123"}
    other = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert other.stdout.strip() == here
    changed = data_rotten_tomatoes.copy()
    changed["test"] = changed["test"].select(range(len(changed["test"]) - 1))
    assert dataset_fingerprint(changed) != here


def test_hub_name_offline_fails_fast_naming_offline_data(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert hub_reachable() is False
    started = time.perf_counter()
    with pytest.raises(OfflineError) as caught:
        load_dataset("imdb")
    assert time.perf_counter() - started < 5
    message = str(caught.value)
    assert isinstance(caught.value, DataError)
    for words in ("no network", "rotten-tomatoes", "bbc-news", ".csv", "aclImdb"):
        assert words in message


def test_unknown_name_lists_choices_closest_first():
    with pytest.raises(DataError) as caught:
        load_dataset("roten-tomatos")
    message = str(caught.value)
    assert "Did you mean 'rotten-tomatoes'" in message
    assert "bbc-news" in message and ".parquet" in message and "aclImdb" in message


def test_missing_path_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="No such file or folder"):
        load_dataset(tmp_path / "nowhere.csv")
    with pytest.raises(DataError, match="No such file or folder"):
        load_dataset(str(tmp_path / "no_folder"))


def test_hub_reachable_tries_a_real_connection(monkeypatch):
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
        assert hub_reachable(timeout=2.0) is True
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")  # now closed
    started = time.perf_counter()
    assert hub_reachable(timeout=2.0) is False
    with pytest.raises(OfflineError, match="no network"):
        load_dataset("ag_news")
    assert time.perf_counter() - started < 5


def test_validation_fraction_moves_the_boundary(data_bbc_news):
    wider = load_dataset("bbc-news", validation_fraction=0.2)
    assert wider["test"]["text"] == data_bbc_news["test"]["text"]
    assert len(wider["validation"]) > 1.5 * len(data_bbc_news["validation"])


def _table(path: Path, columns: dict[str, list]) -> Path:
    import pandas as pd

    pd.DataFrame(columns).to_csv(path, index=False)
    return path


def test_the_columns_of_a_file_are_guessed_longest_text_and_few_labels(tmp_path):
    """The longest free-text column is the text; the one low-cardinality column the label."""
    from lorakit.data.columns import guess_columns

    rows = 60
    path = _table(tmp_path / "docs.csv", {
        "id": list(range(rows)),
        "title": [f"title {i}" for i in range(rows)],
        "body": [f"a much longer body of free text, number {i}, about things" for i in range(rows)],
        "topic": ["sport", "politics", "tech"] * (rows // 3),
    })  # fmt: skip
    guess = guess_columns(path)
    assert (guess.text_column, guess.label_column) == ("body", "topic")
    assert "'body'" in guess.line and "'topic'" in guess.line
    assert "text_column=" in guess.line and "label_column=" in guess.line
    # a column the user named is kept; the other is still guessed
    assert guess_columns(path, text_column="title").label_column == "topic"
    assert guess_columns(path, label_column="id").text_column == "body"


def test_an_unsure_guess_is_an_error_naming_the_columns(tmp_path):
    from lorakit.data.columns import guess_columns

    rows = 60
    two_labels = _table(tmp_path / "two.csv", {
        "review": [f"a review of some length, number {i}" for i in range(rows)],
        "stars": ["1", "2", "3"] * (rows // 3),
        "lang": ["en", "fr"] * (rows // 2),
    })  # fmt: skip
    with pytest.raises(DataError, match=r"label.*'stars', 'lang'.*label_column="):
        guess_columns(two_labels)
    no_text = _table(tmp_path / "codes.csv", {"code": [i for i in range(rows)],
                                              "label": ["a", "b"] * (rows // 2)})  # fmt: skip
    with pytest.raises(DataError, match=r"text.*columns are \['code', 'label'\].*text_column="):
        guess_columns(no_text)


# ---------------------------------------------------------------- aclsum: papers and summaries
@pytest.fixture(scope="module")
def data_aclsum():
    return load_dataset("aclsum")


def test_aclsum_keeps_the_package_splits_as_prompt_response_pairs(data_aclsum):
    dsd = data_aclsum
    assert {split: len(rows) for split, rows in dsd.items()} == {
        "train": 100, "validation": 50, "test": 100,
    }  # fmt: skip
    for rows in dsd.values():
        assert rows.column_names == ["prompt", "response"]
        assert all(p.endswith(f"\n\n{SUMMARIZE_INSTRUCTION}\n") for p in rows["prompt"])
        assert all(prompt.strip() and response.strip() for prompt, response in zip(
            rows["prompt"], rows["response"], strict=True))  # fmt: skip
    first = dsd["train"][0]  # P06-1112, the first line of the package's train.jsonl
    assert first["prompt"].startswith("In this paper , we explore correlation of dependency")
    assert first["response"].startswith("A generally accessible NER system for QA systems")
    assert first["response"].endswith("even better on harder questions where NER performs poorly.")


def test_aclsum_loads_the_same_rows_twice(data_aclsum):
    again = load_dataset("aclsum")
    for split, rows in data_aclsum.items():
        assert again[split].to_dict() == rows.to_dict()


def test_aclsum_can_take_the_abstract_alone(data_aclsum):
    abstracts = aclsum(sections=("abstract",))
    for split, rows in abstracts.items():
        assert rows["response"] == data_aclsum[split]["response"]
        shorter = zip(rows["prompt"], data_aclsum[split]["prompt"], strict=True)
        assert all(len(short) < len(full) for short, full in shorter)
    with pytest.raises(DataError, match="abstract, introduction, conclusion"):
        aclsum(sections=("methods",))


def test_aclsum_missing_names_the_install_command(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "aclsum" else find_spec(name, *a),
    )
    with pytest.raises(DataError, match=r"pip install aclsum==0\.1\.2"):
        load_dataset("aclsum")


def test_aclsum_refuses_a_validation_fraction():
    with pytest.raises(DataError, match="own validation split"):
        load_dataset("aclsum", validation_fraction=0.2)
