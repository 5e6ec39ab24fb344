"""Chat data on SmolLM2's real tokenizer and chat template: which tokens carry the loss, how a
too-long conversation is cut, and how a `messages` file is read."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from lorakit.data import DataError, load_dataset
from lorakit.data.causal import (
    IGNORE_INDEX,
    VERDICT_CHAT_PROMPT,
    rotten_tomatoes_verdicts,
    trim_padding,
    verdict_choices,
)
from lorakit.data.chat import (
    chat_dataset,
    end_of_turn_id,
    pair_conversations,
    read_conversations,
    render,
)

END = "<|im_end|>"


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def labeled_spans(labels: list[int]) -> list[list[int]]:
    """The runs of consecutive labeled positions, in order."""
    spans, current = [], []
    for label in labels:
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            current.append(label)
    return spans + ([current] if current else [])


def one_row(tokenizer, conversation, max_length=512):
    rows = chat_dataset(tokenizer, [conversation], max_length)
    row = rows.dataset[0]
    width = int(row["attention_mask"].sum())
    return row["input_ids"][:width].tolist(), row["labels"][:width].tolist(), rows


def test_end_of_turn_is_im_end(tokenizer):
    assert tokenizer.convert_ids_to_tokens(end_of_turn_id(tokenizer)) == END


def test_labels_are_the_answer_and_its_end_of_turn_token(tokenizer):
    conversation = pair_conversations(["Is the sky blue?"], ["Yes, on a clear day."])[0]
    ids, labels, rows = one_row(tokenizer, conversation)
    assert tokenizer.decode(ids) == render(tokenizer, conversation)
    [answer] = labeled_spans(labels)
    assert tokenizer.decode(answer) == "Yes, on a clear day." + END
    # the labels are the input ids where they count, -100 everywhere else
    assert all(label in (IGNORE_INDEX, token) for label, token in zip(labels, ids, strict=True))
    assert labels[-1] == IGNORE_INDEX  # the newline after <|im_end|> is not learned
    assert rows.end_of_turn == end_of_turn_id(tokenizer)
    assert (rows.truncated, rows.dropped) == (0, 0)


def test_every_assistant_turn_is_labeled(tokenizer):
    conversation = [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Green."},
        {"role": "user", "content": "Another one?"},
        {"role": "assistant", "content": "Purple."},
    ]
    _, labels, _ = one_row(tokenizer, conversation)
    assert [tokenizer.decode(span) for span in labeled_spans(labels)] == [
        "Green." + END,
        "Purple." + END,
    ]


def test_a_system_prompt_replaces_the_templates_own(tokenizer):
    default = pair_conversations(["Hi"], ["Hello."])[0]
    brief = pair_conversations(["Hi"], ["Hello."], system="Answer in one word.")[0]
    assert brief[0] == {"role": "system", "content": "Answer in one word."}
    ids, labels, _ = one_row(tokenizer, brief)
    text = tokenizer.decode(ids)
    assert "Answer in one word." in text and "SmolLM" not in text
    assert "SmolLM" in tokenizer.decode(one_row(tokenizer, default)[0])
    assert [tokenizer.decode(span) for span in labeled_spans(labels)] == ["Hello." + END]


def test_a_too_long_conversation_loses_the_start_of_its_prompt(tokenizer):
    filler = " ".join(f"word{i}" for i in range(200))
    prompt = f"{filler}\nIs this review positive? Answer yes or no."
    conversation = pair_conversations([prompt], ["yes"])[0]
    full, _, _ = one_row(tokenizer, conversation)
    max_length = len(full) - 100
    ids, labels, rows = one_row(tokenizer, conversation, max_length)
    assert rows.truncated == 1 and rows.dropped == 0
    assert len(ids) <= max_length
    text = tokenizer.decode(ids)
    # the template's start stays, the instruction at the prompt's end stays, the answer is whole
    assert text.startswith("<|im_start|>system\n")
    assert "word0 " not in text and "word199\nIs this review positive? Answer yes or no." in text
    assert [tokenizer.decode(span) for span in labeled_spans(labels)] == ["yes" + END]


def test_rows_are_right_padded_and_trim_padding_cuts_to_the_longest(tokenizer):
    conversations = pair_conversations(["Hi", "A much longer question than the first one?"],
                                       ["Hello.", "A much longer answer than the first one."])  # fmt: skip
    rows = chat_dataset(tokenizer, conversations, 512).dataset
    lengths = [int(m.sum()) for m in rows["attention_mask"]]
    assert lengths[0] < lengths[1]
    batch = trim_padding([rows[0]])
    assert batch["input_ids"].shape == (1, lengths[0])
    assert torch.equal(batch["labels"][0], rows[0]["labels"][: lengths[0]])
    both = trim_padding([rows[0], rows[1]])
    assert {v.shape for v in both.values()} == {(2, lengths[1])}
    assert (both["labels"][0, lengths[0] :] == IGNORE_INDEX).all()
    assert (both["attention_mask"][0, lengths[0] :] == 0).all()


def test_padded_with_extra_width_trims_to_the_longest_real_row():
    rows = [
        {"input_ids": torch.tensor([5, 6, 0, 0, 0]), "attention_mask": torch.tensor([1, 1, 0, 0, 0]),
         "labels": torch.tensor([5, 6, -100, -100, -100]), "choice": torch.tensor(1)},
        {"input_ids": torch.tensor([7, 8, 9, 0, 0]), "attention_mask": torch.tensor([1, 1, 1, 0, 0]),
         "labels": torch.tensor([-100, 8, 9, -100, -100]), "choice": torch.tensor(0)},
    ]  # fmt: skip
    batch = trim_padding(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 0], [7, 8, 9]]
    assert batch["labels"].tolist() == [[5, 6, -100], [-100, 8, 9]]
    assert batch["choice"].tolist() == [1, 0]  # a 1-d column is stacked, not cut


def test_chat_verdicts_ask_the_question_and_answer_with_the_bare_word():
    reviews = load_dataset("rotten-tomatoes")
    plain, chat = rotten_tomatoes_verdicts(reviews), rotten_tomatoes_verdicts(reviews, chat=True)
    assert verdict_choices() == (" fresh", " rotten")
    assert verdict_choices(chat=True) == ("positive", "negative")
    row, source = chat["test"][0], reviews["test"][0]
    assert row["prompt"] == VERDICT_CHAT_PROMPT.format(text=source["text"])
    assert row["response"] == verdict_choices(chat=True)[row["choice"]]
    assert chat["train"]["choice"] == plain["train"]["choice"]
    words = {" fresh": "positive", " rotten": "negative"}
    assert [words[r] for r in plain["test"]["response"]] == chat["test"]["response"]


# ---------------------------------------------------------------- messages files
def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_read_conversations_reads_a_messages_file(tmp_path):
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    path = write_jsonl(tmp_path / "chats.jsonl", [{"messages": turns, "id": 1}, "",
                                                 {"messages": [{"role": "system", "content": "S"}, *turns]}])  # fmt: skip
    conversations = read_conversations(path)
    assert conversations == [turns, [{"role": "system", "content": "S"}, *turns]]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ({"messages": [{"role": "bot", "content": "x"}]}, "role 'bot' is none of"),
        ({"messages": [{"role": "user", "content": "x"}]}, "last turn must be the assistant"),
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "user"}]}, "text 'content'"),
        ("{not json", "not valid JSON"),
        ({"prompt": "a", "response": "b"}, "no `messages`, unlike the first line"),
    ],
)
def test_a_bad_messages_line_is_a_one_line_error_naming_it(tmp_path, line, message):
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
    path = write_jsonl(tmp_path / "chats.jsonl", [good, line])
    with pytest.raises(DataError, match=message) as err:
        read_conversations(path)
    assert "\n" not in str(err.value) and f"{path}:2" in str(err.value)


def test_a_prompt_response_file_is_no_messages_file(tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a", "response": "b"}])
    assert read_conversations(pairs) is None
    csv = tmp_path / "pairs.csv"
    csv.write_text("prompt,response\na,b\n")
    assert read_conversations(csv) is None
    assert read_conversations(tmp_path / "missing.jsonl") is None
