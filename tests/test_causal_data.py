"""Causal-LM data on real text: packing, padding, prompt masking, instruction files, verdicts."""

import json

import pytest

from lorakit.data import load_dataset
from lorakit.data.causal import (
    IGNORE_INDEX,
    VERDICT_CHOICES,
    InstructionFileError,
    instruction_dataset,
    load_instruction_file,
    pack_texts,
    padded_lm_dataset,
    rotten_tomatoes_verdicts,
)
from lorakit.models.tiny_gpt2 import train_bpe_tokenizer


@pytest.fixture(scope="module")
def bbc_texts():
    return load_dataset("bbc-news")["train"]["text"][:200]


@pytest.fixture(scope="module")
def reviews():
    return load_dataset("rotten-tomatoes")


@pytest.fixture(scope="module")
def tokenizer(bbc_texts):
    return train_bpe_tokenizer(bbc_texts, vocab_size=1000)


def test_pack_texts_cuts_the_eos_joined_stream_into_full_blocks(tokenizer, bbc_texts):
    texts = bbc_texts[:20]
    blocks = pack_texts(tokenizer, texts, block_size=64)
    stream = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert blocks.num_rows == len(stream) // 64
    assert blocks[:]["input_ids"].flatten().tolist() == stream[: blocks.num_rows * 64]
    assert (blocks[:]["labels"] == blocks[:]["input_ids"]).all()
    assert blocks[:]["attention_mask"].all()


def test_pack_texts_with_too_little_text_says_so(tokenizer):
    with pytest.raises(ValueError, match="fewer than one block"):
        pack_texts(tokenizer, ["Short."], block_size=128)


def test_padded_lm_dataset_ignores_padding_only(tokenizer, reviews):
    texts = reviews["train"]["text"][:16]
    rows = padded_lm_dataset(tokenizer, texts, max_length=48)
    mask, labels, ids = rows[:]["attention_mask"], rows[:]["labels"], rows[:]["input_ids"]
    assert ((labels == IGNORE_INDEX) == (mask == 0)).all()
    assert ids.shape[1] <= 48
    # the first row is eos + text + eos (cut at 48) and decodes back to the review
    n = int(mask[0].sum())
    assert tokenizer.decode(ids[0, 1 : n - 1]) in texts[0]
    assert tokenizer.decode(ids[0, 1:n], skip_special_tokens=True).startswith(texts[0][:20])


def test_instruction_dataset_counts_only_the_response(tokenizer, reviews):
    pairs = rotten_tomatoes_verdicts(reviews)["train"].select(range(12))
    rows = instruction_dataset(tokenizer, pairs["prompt"], pairs["response"], max_length=256)
    for labels, ids, mask, response in zip(
        *(rows[:][c] for c in ("labels", "input_ids", "attention_mask")),
        pairs["response"],
        strict=True,
    ):
        kept = labels[labels != IGNORE_INDEX].tolist()
        assert kept[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(kept[:-1]) == response
        # the counted tokens are the last real ones: the prompt before them is masked
        n = int(mask.sum())
        assert ids[n - len(kept) : n].tolist() == kept


def test_instruction_dataset_cuts_the_prompt_start_not_the_response(tokenizer, reviews):
    pairs = rotten_tomatoes_verdicts(reviews)["test"].select(range(4))
    rows = instruction_dataset(tokenizer, pairs["prompt"], pairs["response"], max_length=12)
    assert rows[:]["input_ids"].shape[1] == 12
    for ids, labels, response in zip(
        rows[:]["input_ids"], rows[:]["labels"], pairs["response"], strict=True
    ):
        assert tokenizer.decode(labels[labels != IGNORE_INDEX][:-1]) == response
        assert (
            tokenizer.decode(ids, skip_special_tokens=True).rstrip().endswith("Verdict:" + response)
        )


def test_rotten_tomatoes_verdicts_follow_the_labels(reviews):
    verdicts = rotten_tomatoes_verdicts(reviews)
    assert set(verdicts) == {"train", "validation", "test"}
    row, source = verdicts["test"][0], reviews["test"][0]
    assert row["prompt"] == f"Review: {source['text']}\nVerdict:"
    name = reviews["test"].features["label"].int2str(source["label"])
    assert row["response"] == {"positive": " fresh", "negative": " rotten"}[name]
    assert VERDICT_CHOICES[row["choice"]] == row["response"]
    fresh = sum(r == " fresh" for r in verdicts["train"]["response"]) / verdicts["train"].num_rows
    assert 0.5 < fresh < 0.7  # fresh is the majority class (~0.58)


def test_rotten_tomatoes_verdicts_refuse_other_labels():
    with pytest.raises(ValueError, match="rotten-tomatoes"):
        rotten_tomatoes_verdicts(load_dataset("bbc-news"))


def test_load_instruction_file_reads_jsonl_and_csv(tmp_path):
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text(
        "\n".join(json.dumps({"q": f"Question {i}?", "a": f" Answer {i}."}) for i in range(3))
    )
    pairs = load_instruction_file(jsonl, prompt_column="q", response_column="a")
    assert pairs["prompt"] == ["Question 0?", "Question 1?", "Question 2?"]
    assert pairs["response"][2] == " Answer 2."
    csv = tmp_path / "pairs.csv"
    csv.write_text('prompt,response\n"Hello, there",General Kenobi\n2+2,4\n')
    pairs = load_instruction_file(csv)
    assert pairs["prompt"] == ["Hello, there", "2+2"] and pairs["response"] == [
        "General Kenobi",
        "4",
    ]


def test_load_instruction_file_missing_column_lists_the_columns(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("question,answer\nWhy?,Because.\n")
    with pytest.raises(InstructionFileError, match="'question', 'answer'") as err:
        load_instruction_file(path)
    assert "'prompt'" in str(err.value) and "prompt_column=" in str(err.value)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("pairs.txt", "prompt\tresponse\n", "unsupported file type"),
        ("pairs.jsonl", '{"prompt": "a", "response": "b"}\n{not json\n', "not valid JSONL"),
        ("pairs.csv", "prompt,response\n", "no rows"),
        ("pairs.csv", "prompt,response\nHi,\n", "empty prompt or response in data row"),
    ],
)
def test_load_instruction_file_bad_input(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(InstructionFileError, match=message):
        load_instruction_file(path)


def test_load_instruction_file_missing_file(tmp_path):
    with pytest.raises(InstructionFileError, match="does not exist"):  # a DataError: one line
        load_instruction_file(tmp_path / "absent.jsonl")
