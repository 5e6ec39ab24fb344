"""Real-format loaders on small files written in each layout, and every kind of bad input."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pandas as pd
import pytest

from lorakit.data import DataError, DataWarning, load_dataset, split_of

WORDS = ["calm", "bright", "grim", "dull", "vivid", "stale", "warm", "cold", "sharp", "murky"]


def _reviews(n: int) -> list[str]:
    return [f"review {i}: a {WORDS[i % 10]} and {WORDS[(i * 7) % 10]} film" for i in range(n)]


def _all(dsd, column: str) -> list:
    return [value for split in dsd.values() for value in split[column]]


def _names(dsd) -> list[str]:
    return dsd["train"].features["label"].names


def test_aclimdb_folder_keeps_test_and_carves_validation_from_train(tmp_path):
    root = tmp_path / "aclImdb"
    texts = _reviews(160)
    for i, text in enumerate(texts):
        split, polarity = ("train" if i < 120 else "test"), ("pos" if i % 2 else "neg")
        folder = root / split / polarity
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}_{7 if i % 2 else 2}.txt").write_text(text, encoding="utf-8")
    (root / "train" / "unsup").mkdir()
    (root / "train" / "unsup" / "0_0.txt").write_text("unlabelled, ignored")
    dsd = load_dataset(tmp_path)  # the parent folder works too
    assert _names(dsd) == ["negative", "positive"]
    assert sorted(dsd["test"]["text"]) == sorted(texts[120:])
    assert len(dsd["train"]) + len(dsd["validation"]) == 120
    assert 1 <= len(dsd["validation"]) <= 15  # ~5% of 120, by hash
    assert dsd.keys() == load_dataset(root).keys()
    labels = dict(zip(_all(dsd, "text"), _all(dsd, "label"), strict=True))
    assert all(labels[text] == i % 2 for i, text in enumerate(texts))


def _ag_rows(n: int) -> list[list[str]]:
    return [[str(i % 4 + 1), f"Title {i}", f"{WORDS[i % 10]} news story {i}"] for i in range(n)]


@pytest.mark.parametrize("header", [True, False])
def test_ag_news_csv_with_and_without_header(tmp_path, header):
    path = tmp_path / "train.csv"
    columns = ["Class Index", "Title", "Description"] if header else False
    pd.DataFrame(_ag_rows(80)).to_csv(path, index=False, header=columns)
    dsd = load_dataset(path)
    assert _names(dsd) == ["World", "Sports", "Business", "Sci/Tech"]
    rows = dict(zip(_all(dsd, "text"), _all(dsd, "label"), strict=True))
    assert len(rows) == 80
    assert rows[f"Title 5 {WORDS[5]} news story 5"] == 1  # class index 2 = Sports
    assert rows[f"Title 3 {WORDS[3]} news story 3"] == 3  # class index 4 = Sci/Tech


def test_ag_news_folder_uses_its_train_and_test_files(tmp_path):
    rows = _ag_rows(100)
    pd.DataFrame(rows[:80]).to_csv(tmp_path / "train.csv", index=False, header=False)
    pd.DataFrame(rows[80:]).to_csv(tmp_path / "test.csv", index=False, header=False)
    dsd = load_dataset(tmp_path)
    assert len(dsd["test"]) == 20
    assert len(dsd["train"]) + len(dsd["validation"]) == 80
    assert dsd["test"][0]["text"] == "Title 80 calm news story 80"


def test_ag_news_bad_class_index_names_the_fix(tmp_path):
    path = tmp_path / "ag.csv"
    pd.DataFrame([["1", "a", "b"], ["9", "c", "d"]]).to_csv(path, index=False, header=False)
    with pytest.raises(DataError, match="class index must be 1-4"):
        load_dataset(path)


def test_csv_string_labels_become_sorted_class_names(tmp_path):
    path = tmp_path / "reviews.csv"
    texts = _reviews(90)
    stars = ["good", "bad", "meh"]
    pd.DataFrame({"review": texts, "stars": [stars[i % 3] for i in range(90)]}).to_csv(path)
    dsd = load_dataset(str(path), text_column="review", label_column="stars")
    assert _names(dsd) == ["bad", "good", "meh"]
    assert set(dsd["train"].column_names) == {"text", "label"}
    for split, dataset in dsd.items():
        for row in dataset:
            i = int(row["text"].split(":")[0].split()[1])
            assert _names(dsd)[row["label"]] == stars[i % 3]
            assert split_of(row["text"]) == split


def test_jsonl_integer_labels_keep_their_values(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [
        json.dumps({"text": t, "label": i % 2, "extra": None}) for i, t in enumerate(_reviews(60))
    ]
    path.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    dsd = load_dataset(path)
    assert _names(dsd) == ["0", "1"]
    assert sum(len(s) for s in dsd.values()) == 60
    assert dsd["train"][0]["label"] == int(dsd["train"][0]["text"].split(":")[0][7:]) % 2


def test_parquet_with_split_column_is_honoured(tmp_path):
    path = tmp_path / "data.parquet"
    texts = _reviews(40)
    splits = ["train"] * 30 + ["validation"] * 5 + ["test"] * 5
    frame = pd.DataFrame({"body": texts, "y": [i % 2 + 3 for i in range(40)], "split": splits})
    frame.to_parquet(path)
    dsd = load_dataset(path, text_column="body", label_column="y")
    assert [len(dsd[s]) for s in ("train", "validation", "test")] == [30, 5, 5]
    assert dsd["test"]["text"] == texts[35:]
    assert _names(dsd) == ["3", "4"]  # integer values kept as names, ids 0..k-1


def test_missing_file_and_folder_errors(tmp_path):
    with pytest.raises(DataError, match="No such file"):
        load_dataset(tmp_path / "missing.jsonl")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="not one lorakit can read"):
        load_dataset(tmp_path / "empty_dir")


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_empty_file_is_a_data_error(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    path.write_text("  \n")
    with pytest.raises(DataError, match="is empty"):
        load_dataset(path)


def test_header_only_csv_has_no_rows(tmp_path):
    path = tmp_path / "header.csv"
    path.write_text("text,label\n")
    with pytest.raises(DataError, match="no rows"):
        load_dataset(path)


def test_missing_column_lists_columns_and_the_fix(tmp_path):
    path = tmp_path / "data.csv"
    pd.DataFrame({"review": _reviews(10), "stars": [1, 2] * 5}).to_csv(path, index=False)
    with pytest.raises(DataError) as caught:
        load_dataset(path)
    message = str(caught.value)
    assert "'text'" in message and "['review', 'stars']" in message
    assert "--set data.text_column=" in message and "data.label_column=" in message


def test_non_utf8_bytes_are_replaced_and_counted(tmp_path):
    path = tmp_path / "latin.csv"
    body = "text,label\n" + "".join(f"{t},{i % 2}\n" for i, t in enumerate(_reviews(60)))
    path.write_bytes(body.encode() + "caf\xe9 cr\xe8me,1\n".encode("latin-1"))
    with pytest.warns(DataWarning, match=r"2 invalid UTF-8 byte sequence"):
        dsd = load_dataset(path)
    assert "caf\ufffd cr\ufffdme" in _all(dsd, "text")


def test_non_utf8_in_aclimdb_counts_files(tmp_path):
    for i in range(40):
        folder = tmp_path / ("train" if i < 30 else "test") / ("pos" if i % 2 else "neg")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.txt").write_bytes(
            f"review {i} \xff".encode("latin-1") if i < 3 else b"ok %d" % i
        )
    with pytest.warns(DataWarning, match=r"3 invalid UTF-8 byte sequence\(s\) in 3 file"):
        load_dataset(tmp_path)


def test_empty_texts_are_dropped_with_a_count(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"text": t, "label": "pos" if i % 2 else "neg"} for i, t in enumerate(_reviews(60))]
    rows += [
        {"text": "   ", "label": "pos"},
        {"text": "", "label": "neg"},
        {"text": None, "label": "neg"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.warns(DataWarning, match="dropped 3 row"):
        dsd = load_dataset(path)
    assert sum(len(s) for s in dsd.values()) == 60


def test_single_class_is_an_error(tmp_path):
    path = tmp_path / "data.csv"
    pd.DataFrame({"text": _reviews(50), "label": ["pos"] * 50}).to_csv(path, index=False)
    with pytest.raises(DataError, match="at least two classes"):
        load_dataset(path)


def test_an_empty_split_is_an_error(tmp_path):
    path = tmp_path / "tiny.csv"
    pd.DataFrame({"text": _reviews(3), "label": [0, 1, 0]}).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"split is empty .*Give more rows"):
        load_dataset(path)


def test_split_column_with_unknown_values_is_an_error(tmp_path):
    path = tmp_path / "data.csv"
    frame = pd.DataFrame(
        {"text": _reviews(4), "label": [0, 1] * 2, "split": ["train", "holdout"] * 2}
    )
    frame.to_csv(path, index=False)
    with pytest.raises(DataError, match="'holdout'"):
        load_dataset(path)


@pytest.mark.parametrize(
    ("name", "content", "words"),
    [
        ("broken.csv", 'text,label\n"unclosed quote,1\n', "Cannot read .*broken.csv"),
        ("broken.jsonl", '{"text": "a", "label": 1}\n{oops\n', "broken.jsonl, line 2"),
        ("broken.parquet", "not parquet at all", "Cannot read .*broken.parquet as Parquet"),
        ("data.txt", "some text", "unsupported file type"),
    ],
)
def test_unreadable_files_raise_data_error_naming_the_file(tmp_path, name, content, words):
    path = tmp_path / name
    path.write_text(content)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no stray pandas / pyarrow warnings either
        with pytest.raises(DataError, match=words):
            load_dataset(path)


def test_validation_fraction_out_of_range(tmp_path):
    with pytest.raises(DataError, match="validation_fraction"):
        load_dataset("bbc-news", validation_fraction=1.5)


def test_tilde_and_path_objects_are_accepted(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    path = Path(tmp_path) / "d.csv"
    pd.DataFrame({"text": _reviews(60), "label": ["a", "b"] * 30}).to_csv(path, index=False)
    assert load_dataset("~/d.csv").keys() == load_dataset(path).keys()


def test_folder_of_jsonl_split_files_shares_one_label_set(tmp_path):
    texts = _reviews(50)
    moods = ["sad", "happy", "angry"]
    for split, part in (("train", range(0, 40)), ("dev", range(40, 45)), ("test", range(45, 50))):
        rows = [{"text": texts[i], "mood": moods[i % 3]} for i in part]
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    dsd = load_dataset(tmp_path, label_column="mood")
    assert _names(dsd) == ["angry", "happy", "sad"]
    assert [len(dsd[s]) for s in ("train", "validation", "test")] == [40, 5, 5]
    assert dsd["validation"]["text"] == texts[40:45]


def test_warnings_point_at_the_callers_line_and_count_missing_labels(tmp_path):
    path = tmp_path / "data.csv"
    labels = ["x" if i % 2 else "y" for i in range(60)]
    labels[:4] = ["", "", "", ""]
    pd.DataFrame({"text": _reviews(60), "label": labels}).to_csv(path, index=False)
    with pytest.warns(DataWarning, match="dropped 4 row.* no label") as caught:
        dsd = load_dataset(path)
    assert caught[0].filename == __file__
    assert sum(len(s) for s in dsd.values()) == 56


def test_csv_integer_labels_written_as_floats_match_parquet(tmp_path):
    """pandas writes a star column with a missing value as 1.0, 2.0, ... 10.0 in a CSV: the
    classes are the same integers, in the same order, as the same frame saved as Parquet."""
    stars = [float(i % 10 + 1) for i in range(100)]
    stars[0] = None
    frame = pd.DataFrame({"text": _reviews(100), "label": stars})
    frame.to_csv(tmp_path / "stars.csv", index=False)
    frame.to_parquet(tmp_path / "stars.parquet")
    with pytest.warns(DataWarning, match="dropped 1 row"):
        from_csv = load_dataset(tmp_path / "stars.csv")
    with pytest.warns(DataWarning, match="dropped 1 row"):
        from_parquet = load_dataset(tmp_path / "stars.parquet")
    assert _names(from_csv) == [str(i) for i in range(1, 11)] == _names(from_parquet)
    assert from_csv["test"]["label"] == from_parquet["test"]["label"]


@pytest.mark.parametrize("sep", [";", "\t", "|"])
def test_csv_with_another_separator_is_read(tmp_path, sep):
    """A spreadsheet's "CSV" in many locales uses semicolons; the header row tells which."""
    path = tmp_path / "reviews.csv"
    texts = [f"{t}, quite; long" for t in _reviews(60)]
    frame = pd.DataFrame({"review": texts, "stars": ["good", "bad"] * 30})
    frame.to_csv(path, index=False, sep=sep)
    dsd = load_dataset(path, text_column="review", label_column="stars")
    assert _names(dsd) == ["bad", "good"]
    assert sorted(_all(dsd, "text")) == sorted(texts)


def test_text_and_label_columns_swapped_is_an_error(tmp_path):
    """Labels that each name a single row are texts: training would build a head with a class
    per review and learn nothing. The error names both settings."""
    path = tmp_path / "reviews.csv"
    pd.DataFrame({"review": _reviews(300), "stars": [i % 4 + 1 for i in range(300)]}).to_csv(path)
    with pytest.raises(DataError, match=r"300 of 300 rows .*'review 0: a calm.*swapped") as caught:
        load_dataset(path, text_column="stars", label_column="review")
    assert "data.label_column" in str(caught.value) and "data.text_column" in str(caught.value)
    few = load_dataset(path, text_column="review", label_column="stars")
    assert _names(few) == ["1", "2", "3", "4"]


@pytest.mark.parametrize("layout", ["to_json", "indented", "lists"])
def test_json_object_of_columns_as_pandas_writes_it(tmp_path, layout):
    """`DataFrame.to_json("data.json")` writes one object of columns, not JSON lines."""
    path = tmp_path / "data.json"
    frame = pd.DataFrame({"review": _reviews(60), "stars": ["good", "bad", "meh"] * 20})
    if layout == "lists":
        path.write_text(json.dumps(frame.to_dict(orient="list")))
    else:
        frame.to_json(path, indent=2 if layout == "indented" else None)
    dsd = load_dataset(path, text_column="review", label_column="stars")
    assert _names(dsd) == ["bad", "good", "meh"]
    assert sorted(_all(dsd, "text")) == sorted(_reviews(60))


def test_csv_typed_with_spaces_after_commas(tmp_path):
    """`text, label` as people type it: the columns are text and label, and a quoted text after
    a space keeps its commas."""
    path = tmp_path / "typed.csv"
    rows = [f'"{t}, truly", {"pos" if i % 2 else "neg"}' for i, t in enumerate(_reviews(60))]
    path.write_text("text, label\n" + "\n".join(rows) + "\n")
    dsd = load_dataset(path)
    assert _names(dsd) == ["neg", "pos"]
    assert sorted(_all(dsd, "text")) == sorted(f"{t}, truly" for t in _reviews(60))


def test_pandas_missing_values_in_nullable_columns_are_dropped(tmp_path):
    """A nullable Int64 label or a string text column holds pd.NA, not None or NaN: such rows
    are dropped and counted, not a class named "<NA>" or a text "<NA>"."""
    path = tmp_path / "data.parquet"
    texts = pd.array([t if i % 10 else None for i, t in enumerate(_reviews(120))], dtype="string")
    labels = pd.array([i % 3 if i % 10 != 5 else None for i in range(120)], dtype="Int64")
    pd.DataFrame({"text": texts, "label": labels}).to_parquet(path)
    with pytest.warns(DataWarning) as caught:
        dsd = load_dataset(path)
    messages = " ".join(str(w.message) for w in caught)
    assert "dropped 12 row(s) whose text is empty" in messages
    assert "dropped 12 row(s) with no label" in messages
    assert _names(dsd) == ["0", "1", "2"]
    assert "<NA>" not in _all(dsd, "text")


def test_headerless_ag_news_with_semicolons_in_a_title_is_still_comma_separated(tmp_path):
    path = tmp_path / "ag.csv"
    rows = _ag_rows(80)
    rows[0][1] = "Stocks; bonds; gold; oil up"  # the first row is data: pandas leaves it unquoted
    pd.DataFrame(rows).to_csv(path, index=False, header=False)
    dsd = load_dataset(path)
    assert _names(dsd) == ["World", "Sports", "Business", "Sci/Tech"]
    assert f"Stocks; bonds; gold; oil up {WORDS[0]} news story 0" in _all(dsd, "text")


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be"])
def test_utf16_file_with_a_bom_is_read(tmp_path, encoding):
    """Excel's "Unicode Text" and Windows PowerShell's `>` write UTF-16 with a BOM."""
    path = tmp_path / "reviews.tsv"
    texts = [f"{t} – très bien" for t in _reviews(60)]
    frame = pd.DataFrame({"review": texts, "stars": ["good", "bad"] * 30})
    body = frame.to_csv(index=False, sep="\t")
    path.write_bytes(
        body.encode(encoding) if encoding == "utf-16" else b"\xfe\xff" + body.encode(encoding)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing replaced
        dsd = load_dataset(path, text_column="review", label_column="stars")
    assert sorted(_all(dsd, "text")) == sorted(texts)


def test_jsonl_texts_may_hold_unicode_line_separators(tmp_path):
    """JSON strings may hold U+2028, U+2029 and U+0085 unescaped (ensure_ascii=False); they are
    not line ends of a .jsonl file. Windows line ends are."""
    path = tmp_path / "data.jsonl"
    texts = [f"{t}\u2028second line\x85more\u2029" for t in _reviews(60)]
    rows = [
        json.dumps({"text": t, "label": i % 2}, ensure_ascii=False) for i, t in enumerate(texts)
    ]
    path.write_bytes("\r\n".join(rows).encode())
    dsd = load_dataset(path)
    assert sorted(_all(dsd, "text")) == sorted(t.strip() for t in texts)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_multi_label_rows_are_refused(tmp_path, suffix):
    """A list of labels per row (multi-label data) is not a class named "['joy', 'love']"."""
    path = tmp_path / f"emotions{suffix}"
    labels = [["joy"], ["anger"], ["joy", "love"]] * 20
    frame = pd.DataFrame({"text": _reviews(60), "label": labels})
    if suffix == ".parquet":
        frame.to_parquet(path)  # read back as numpy arrays
    else:
        frame.to_json(path, orient="records", lines=True)
    with pytest.raises(DataError, match=r"row 1 has a label that is a list .*data\.label_column"):
        load_dataset(path)


def test_split_column_of_other_values_is_named_in_a_short_message(tmp_path):
    """A column that happens to be called "split" (fold ids, free text) gets a one-line error
    naming a few of its values, not all of them."""
    path = tmp_path / "data.csv"
    frame = pd.DataFrame(
        {"text": _reviews(300), "label": [0, 1] * 150, "split": [f"fold-{i}" for i in range(300)]}
    )
    frame.to_csv(path, index=False)
    with pytest.raises(DataError, match=r"'fold-0', .* and 295 more; use train") as caught:
        load_dataset(path)
    assert len(str(caught.value)) < 300
