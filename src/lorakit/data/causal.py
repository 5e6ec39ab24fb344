"""Causal language-model data: packed blocks, padded sequences and prompt/response pairs.

Every dataset built here has `input_ids`, `attention_mask` and `labels` columns in torch format.
`labels` are the input ids themselves (Hugging Face causal LMs shift them inside the loss);
positions that must not count in the loss (padding, instruction prompts) hold -100.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import torch
from transformers import PreTrainedTokenizerBase

from lorakit.data.errors import DataError

IGNORE_INDEX = -100
VERDICT_PROMPT = "Review: {text}\nVerdict:"
VERDICT_CHOICES = (" fresh", " rotten")
# the same task for a chat model: the question as the user's turn, one word as the answer (each
# a single token in SmolLM2's vocabulary, where "rotten" is two), in VERDICT_CHOICES' order
VERDICT_CHAT_PROMPT = (
    "Is this movie review positive or negative? Answer with one word.\n\nReview: {text}"
)
VERDICT_CHAT_CHOICES = ("positive", "negative")
# label name -> response; lorakit.data names rotten-tomatoes' classes negative / positive
VERDICT_RESPONSES = {
    "positive": " fresh",
    "negative": " rotten",
    "fresh": " fresh",
    "rotten": " rotten",
}


class InstructionFileError(DataError):
    """An instruction file that cannot be read as prompt/response pairs."""


def token_ids(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens and no length warning (we cut them ourselves)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [e.ids for e in backend.encode_batch(list(texts), add_special_tokens=False)]
    return [tokenizer.encode(t, add_special_tokens=False) for t in texts]


def eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokenizer's eos id, which also starts every sequence built here (GPT-2's bos)."""
    if tokenizer.eos_token_id is None:
        raise ValueError(
            "the tokenizer has no eos token; set tokenizer.eos_token before building data"
        )
    return int(tokenizer.eos_token_id)


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokenizer's pad id, else its eos id."""
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id(tokenizer))


def pack_texts(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], block_size: int
) -> datasets.Dataset:
    """Tokenize once, join the texts with eos, and cut the stream into full blocks of `block_size`.

    The tail that does not fill a block is dropped, so every token is a training target.
    """
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2, got {block_size}")
    eos = eos_id(tokenizer)
    stream = np.fromiter(
        (i for ids in token_ids(tokenizer, texts) for i in (*ids, eos)), dtype=np.int64
    )
    n_blocks = len(stream) // block_size
    if n_blocks == 0:
        raise ValueError(
            f"{len(texts)} texts give {len(stream)} tokens, fewer than one block of {block_size}; "
            "pass more text or a smaller block_size"
        )
    blocks = stream[: n_blocks * block_size].reshape(n_blocks, block_size)
    return datasets.Dataset.from_dict(
        {"input_ids": blocks, "attention_mask": np.ones_like(blocks), "labels": blocks.copy()}
    ).with_format("torch")


def padded_rows(rows: list[tuple[list[int], list[int]]], pad: int) -> datasets.Dataset:
    """Right-pad (input_ids, labels) rows to the longest one; padding is masked and ignored."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = np.full((len(rows), width), pad, dtype=np.int64)
    labels = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, (ids, labs) in enumerate(rows):
        input_ids[i, : len(ids)] = ids
        labels[i, : len(labs)] = labs
        mask[i, : len(ids)] = 1
    return datasets.Dataset.from_dict(
        {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    ).with_format("torch")


def trim_padding(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A DataLoader's collate for right-padded rows: stacked, then cut to the batch's longest
    row, so a batch of short rows does not pay for the data set's longest one."""
    batch = {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
    width = int(batch["attention_mask"].sum(1).max())
    return {key: value[:, :width] if value.dim() == 2 else value for key, value in batch.items()}


def padded_lm_dataset(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int
) -> datasets.Dataset:
    """One row per text: `eos text eos`, cut to `max_length`, padded to the longest row.

    The leading eos plays GPT-2's bos, so the text's first token is predicted too.
    """
    if not texts:
        raise ValueError("padded_lm_dataset needs at least one text")
    eos = eos_id(tokenizer)
    rows = []
    for ids in token_ids(tokenizer, texts):
        seq = [eos, *ids, eos][:max_length]
        rows.append((seq, seq))
    return padded_rows(rows, pad_id(tokenizer))


def instruction_dataset(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    responses: Sequence[str],
    max_length: int,
) -> datasets.Dataset:
    """Rows `eos prompt response eos` whose loss counts only the response and the final eos.

    A row longer than `max_length` loses the start of its prompt (the end of a prompt, such as
    "Verdict:", is what the response depends on); the response is kept whole when it fits.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if not prompts:
        raise ValueError("instruction_dataset needs at least one prompt/response pair")
    eos = eos_id(tokenizer)
    rows = []
    for p_ids, r_ids in zip(
        token_ids(tokenizer, prompts), token_ids(tokenizer, responses), strict=True
    ):
        answer = [*r_ids, eos][: max_length - 1]
        room = max_length - 1 - len(answer)
        context = [eos, *(p_ids[len(p_ids) - room :] if room > 0 else [])]
        rows.append(([*context, *answer], [IGNORE_INDEX] * len(context) + answer))
    return padded_rows(rows, pad_id(tokenizer))


def load_instruction_file(
    path: str | Path, prompt_column: str = "prompt", response_column: str = "response"
) -> datasets.Dataset:
    """Read prompt/response pairs from a `.jsonl` or `.csv` file into columns `prompt`, `response`."""
    path = Path(path)
    if not path.is_file():
        raise InstructionFileError(f"instruction file {path} does not exist; check data.path")
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            frame = pd.read_json(path, lines=True, dtype=False)
        elif suffix == ".csv":
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        else:
            raise InstructionFileError(
                f"{path}: unsupported file type {suffix!r}; use .jsonl (one JSON object a line) "
                "or .csv with a header row"
            )
    except (ValueError, pd.errors.ParserError) as err:
        if isinstance(err, InstructionFileError):
            raise
        raise InstructionFileError(f"{path} is not valid {suffix[1:].upper()}: {err}") from None
    if frame.empty:
        raise InstructionFileError(f"{path} has no rows")
    missing = [c for c in (prompt_column, response_column) if c not in frame.columns]
    if missing:
        raise InstructionFileError(
            f"{path} has no column {', '.join(map(repr, missing))}; its columns are "
            f"{', '.join(map(repr, map(str, frame.columns)))}. Name the right ones with "
            "prompt_column= / response_column="
        )
    pairs = frame[[prompt_column, response_column]]
    empty = pairs.isna().any(axis=1) | (pairs.astype(str).apply(lambda c: c.str.strip()) == "").any(
        axis=1
    )
    if empty.any():
        rows = ", ".join(str(i + 1) for i in np.flatnonzero(empty.to_numpy())[:5])
        raise InstructionFileError(f"{path}: empty prompt or response in data row(s) {rows}")
    return datasets.Dataset.from_dict(
        {
            "prompt": pairs[prompt_column].astype(str).tolist(),
            "response": pairs[response_column].astype(str).tolist(),
        }
    )


def rotten_tomatoes_verdicts(dsd: datasets.DatasetDict, chat: bool = False) -> datasets.DatasetDict:
    """Turn review/label splits into prompt "Review: {text}\nVerdict:" and response
    " fresh"/" rotten"; for a chat model (``chat``) the question of `VERDICT_CHAT_PROMPT` and the
    words "positive"/"negative", which the chat template wraps.

    Besides `prompt` and `response`, a `choice` column holds the index of the response in
    `VERDICT_CHOICES`, which is what `verdict_accuracy` scores against.
    """
    names = dsd[next(iter(dsd))].features["label"].names
    unknown = set(names) - set(VERDICT_RESPONSES)
    if unknown:
        raise ValueError(
            f"verdict labels must be among {sorted(VERDICT_RESPONSES)}, found {sorted(unknown)}; "
            "pass the rotten-tomatoes dataset"
        )
    choices = [VERDICT_CHOICES.index(VERDICT_RESPONSES[name]) for name in names]
    template = VERDICT_CHAT_PROMPT if chat else VERDICT_PROMPT

    def to_pair(batch: dict) -> dict:
        picked = [choices[y] for y in batch["label"]]
        return {
            "prompt": [template.format(text=t) for t in batch["text"]],
            "response": [verdict_choices(chat)[c] for c in picked],
            "choice": picked,
        }

    return dsd.map(to_pair, batched=True, remove_columns=["text", "label"])


def verdict_choices(chat: bool = False) -> tuple[str, ...]:
    """The verdict answers as a model writes them: " fresh"/" rotten" after "Verdict:", or a
    chat answer "positive"/"negative"."""
    return VERDICT_CHAT_CHOICES if chat else VERDICT_CHOICES
