"""Chat data: conversations rendered with the tokenizer's own chat template, loss on the
assistant's turns only.

A chat model was trained on text in its template's shape (SmolLM2's: ``<|im_start|>user\\n ...
<|im_end|>``), so instruction tuning renders examples the same way, and the model learns to close
its answer with the template's end-of-turn token: generation then stops by itself.

A conversation is a list of ``{"role": ..., "content": ...}`` turns (the ``messages`` format of
transformers and TRL). Each assistant turn's tokens are found by rendering the conversation up
to that turn twice, with and without the turn: what the turn adds, up to and including its
end-of-turn token, carries the loss; everything else (system, user, the template's own markup and
anything after the end-of-turn token) holds -100.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
from transformers import PreTrainedTokenizerBase

from lorakit.data.causal import IGNORE_INDEX, eos_id, pad_id, padded_rows, token_ids
from lorakit.data.errors import DataError

Conversation = list[dict[str, str]]
ROLES = ("system", "user", "assistant")


class ChatTemplateError(DataError):
    """A tokenizer whose chat template cannot render the conversations."""


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render(
    tokenizer: PreTrainedTokenizerBase, messages: Conversation, *, open_turn: bool = False
) -> str:
    """The conversation as the template writes it; ``open_turn`` adds the start of the assistant's
    next turn (the prompt a model answers)."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=open_turn)


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token that closes an assistant turn: the first special token the template writes
    after the turn's content."""
    probe = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    prompt = token_ids(tokenizer, [render(tokenizer, probe[:1], open_turn=True)])[0]
    whole = token_ids(tokenizer, [render(tokenizer, probe)])[0]
    if whole[: len(prompt)] != prompt:
        raise ChatTemplateError(
            "the chat template renders a conversation differently from its beginning, so the "
            "end of a turn cannot be found; use prompt/response data with causal.chat = 'off'"
        )
    special = set(tokenizer.all_special_ids)
    for token in whole[len(prompt) :]:
        if token in special:
            return int(token)
    raise ChatTemplateError(
        "the chat template closes an assistant turn with no special token, so generation could "
        "not stop at the end of a turn; use a model whose template has an end-of-turn token"
    )


def stop_ids(tokenizer: PreTrainedTokenizerBase, chat: bool) -> list[int]:
    """The tokens that end generation: eos, and on a chat run the end of the assistant's turn."""
    return sorted({eos_id(tokenizer), end_of_turn_id(tokenizer)} if chat else {eos_id(tokenizer)})


def pair_conversations(
    prompts: Sequence[str], responses: Sequence[str], system: str | None = None
) -> list[Conversation]:
    """Prompt/response pairs as one-exchange conversations (with a system turn when given)."""
    start = [{"role": "system", "content": system}] if system else []
    return [
        [*start, {"role": "user", "content": p}, {"role": "assistant", "content": r}]
        for p, r in zip(prompts, responses, strict=True)
    ]


def check_conversation(messages, where: str) -> Conversation:
    """``messages`` as a list of role/content turns ending with the assistant's, or a one-line
    DataError saying what is wrong with it."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: messages must be a non-empty list of turns")
    for turn in messages:
        if not isinstance(turn, dict) or not isinstance(turn.get("content"), str):
            raise DataError(f"{where}: each turn needs a 'role' and a text 'content', got {turn!r}")
        if turn.get("role") not in ROLES:
            raise DataError(f"{where}: role {turn.get('role')!r} is none of {', '.join(ROLES)}")
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last turn must be the assistant's (what is learned)")
    return [{"role": t["role"], "content": t["content"]} for t in messages]


@dataclass(frozen=True)
class ChatRows:
    """Tokenized conversations and what tokenizing them did."""

    dataset: datasets.Dataset  # input_ids, attention_mask, labels
    end_of_turn: int  # the token id that closes an assistant turn
    truncated: int  # conversations longer than max_length (a user turn's start or the end cut)
    dropped: int  # conversations with no assistant token left after the cut


def chat_dataset(
    tokenizer: PreTrainedTokenizerBase, conversations: Sequence[Conversation], max_length: int
) -> ChatRows:
    """Rows of rendered conversations whose loss counts the assistant turns only, each turn's
    end-of-turn token included. A row longer than ``max_length`` loses the start of its user
    turn (one exchange: the end of a prompt is what the answer depends on), else its end."""
    if not has_chat_template(tokenizer):
        raise ChatTemplateError("the tokenizer has no chat template; set causal.chat = 'off'")
    end_of_turn = end_of_turn_id(tokenizer)
    rows, truncated, dropped = [], 0, 0
    for conversation in conversations:
        ids, labels = _labeled_tokens(tokenizer, conversation, end_of_turn)
        if len(ids) > max_length:
            truncated += 1
            conversation = shorten_user_turn(tokenizer, conversation, len(ids) - max_length)
            ids, labels = _labeled_tokens(tokenizer, conversation, end_of_turn)
            # still too long (several user turns, or a long answer): the end goes, so the
            # template's start stays whole; the pre-flight checks show the answers cut short
            ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels[1:]):
            dropped += 1
            continue
        rows.append((ids, labels))
    if not rows:
        raise DataError(
            f"no conversation keeps an assistant token within {max_length} tokens; raise "
            "data.max_length"
        )
    return ChatRows(padded_rows(rows, pad_id(tokenizer)), end_of_turn, truncated, dropped)


def shorten_user_turn(
    tokenizer: PreTrainedTokenizerBase, conversation: Conversation, excess: int
) -> Conversation:
    """A one-exchange conversation whose user turn loses the start of its text, ``excess``
    tokens and a few more (the end of a prompt, where the instruction sits, is what the answer
    depends on); any other conversation as it is (the caller then cuts its start)."""
    users = [i for i, turn in enumerate(conversation) if turn["role"] == "user"]
    if len(users) != 1:
        return conversation
    turn = conversation[users[0]]
    ids = token_ids(tokenizer, [turn["content"]])[0]
    kept = tokenizer.decode(ids[excess + 4 :])
    return [*conversation[: users[0]], {**turn, "content": kept}, *conversation[users[0] + 1 :]]


def _labeled_tokens(
    tokenizer: PreTrainedTokenizerBase, conversation: Conversation, end_of_turn: int
) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one conversation: labels are the ids on assistant turns, up to and
    including their end-of-turn token, and -100 elsewhere."""
    texts = [render(tokenizer, conversation)]
    turns = [i for i, turn in enumerate(conversation) if turn["role"] == "assistant"]
    for i in turns:
        texts += [render(tokenizer, conversation[:i], open_turn=True),
                  render(tokenizer, conversation[: i + 1])]  # fmt: skip
    whole, *bounds = token_ids(tokenizer, texts)
    labels = [IGNORE_INDEX] * len(whole)
    for before, through in zip(bounds[::2], bounds[1::2], strict=True):
        if whole[: len(through)] != through or through[: len(before)] != before:
            raise ChatTemplateError(
                "the chat template renders a conversation differently from its beginning, so "
                "assistant turns cannot be located; use prompt/response data with causal.chat = "
                "'off'"
            )
        answer = through[len(before) :]
        if end_of_turn in answer:
            answer = answer[: answer.index(end_of_turn) + 1]
        labels[len(before) : len(before) + len(answer)] = answer
    return whole, labels


def read_conversations(path: str | Path) -> list[Conversation] | None:
    """The `messages` column of a JSONL file as checked conversations; None when the file has
    no such column (a prompt/response file)."""
    path = Path(path)
    if path.suffix.lower() != ".jsonl" or not path.is_file():
        return None
    conversations = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict) or "messages" not in row:
                if not conversations:
                    return None
                raise DataError(f"{path}:{number}: no `messages`, unlike the first line")
            conversations.append(check_conversation(row["messages"], f"{path}:{number}"))
    return conversations or None
