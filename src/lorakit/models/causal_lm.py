"""Causal language models: loading (local folder, GGUF file, hub id, lorakit's tiny GPT-2 or
SmolLM2) and scoring.

A closed set of answers ("fresh" / "rotten") after a prompt is scored by the answers'
log-likelihood (batched forward passes, the output head run only at the answer's positions;
`ChoiceScorer`); `greedy_continuations` generates greedily for many prompts at once, batched by
length, and can score one-token answers from the same pass. The recipes make their figures
(verdict accuracy, the end-of-turn rate, ROUGE) from these.

Loading never trains: `"tiny-gpt2"` is read from its cache, which the `pretrain-tiny-gpt2` recipe
fills (`lorakit.recipes.pretrain_tiny_gpt2.ensure_tiny_gpt2`). A GGUF file (`"smollm2"`, a
`.gguf` path, or a folder and its `gguf_file`) is read from the folder it was converted into once
(`lorakit.models.gguf`).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lorakit.data.causal import eos_id, pad_id, token_ids
from lorakit.models import ModelError, loading_folder, no_progress_bars
from lorakit.models.gguf import SMOLLM2, converted_folder, smollm2_gguf
from lorakit.models.quantize import Quantize, quantize_model
from lorakit.models.tiny_gpt2 import TINY_GPT2, cached_tiny_gpt2
from lorakit.network import OfflineError, hub_reachable
from lorakit.nn.output_head import contiguous_head_inputs


def _resolve(name_or_path: str | Path, gguf_file: str | None = None) -> tuple[str, bool]:
    """(what to pass to from_pretrained, whether it may need the hub)."""
    name = str(name_or_path)
    if gguf_file is not None:
        folder = Path(name).expanduser()
        if not folder.is_dir():
            raise ModelError(
                f"model.gguf_file names a file in the folder model.name, and {folder} is not a "
                "folder: set model.name to the folder that holds the .gguf file"
            )
        return str(converted_folder(folder / gguf_file)), False
    if name == TINY_GPT2:
        return str(cached_tiny_gpt2()), False
    if name == SMOLLM2:
        return str(converted_folder(smollm2_gguf())), False
    if name.lower().endswith(".gguf"):
        return str(converted_folder(name)), False
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} has no config.json; it is not a Hugging Face model folder")
        return str(path), False
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep in name.replace("/", ""):
        raise ModelError(f"model folder {path} does not exist")
    return name, True


def load_causal_lm(
    name_or_path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    gguf_file: str | None = None,
    quantize: Quantize = "none",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model and tokenizer from a local folder, a hub id, `"tiny-gpt2"` (from its cache),
    `"smollm2"` or a `.gguf` file; with ``gguf_file``, that file in the folder ``name_or_path``.
    A GGUF file is converted into an ordinary folder on first use (`lorakit.models.gguf`).
    ``quantize`` (``"int8"``, ``"nf4"``): the Linears held quantized (`quantize_model`), read
    in bf16 so that the fp32 model is never whole in memory.

    A hub id without a network is looked up in the local Hugging Face cache; when it is not
    there, an `OfflineError` names the offline alternative instead of waiting on the network.
    """
    source, needs_hub = _resolve(name_or_path, gguf_file)
    local_only = needs_hub and not hub_reachable()
    try:
        with loading_folder(source), no_progress_bars():
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
            if quantize != "none" and dtype is None:
                dtype = torch.bfloat16
            model = AutoModelForCausalLM.from_pretrained(
                source, dtype=dtype, local_files_only=local_only
            )
    except OSError as err:
        if local_only:
            raise OfflineError(
                f"cannot load {source!r}: the Hugging Face Hub is not reachable and the model is "
                f"not in the local cache. Offline, use model.name = '{SMOLLM2}' "
                f"(SmolLM2-135M-Instruct, installed with lorakit), a .gguf file, or "
                f"'{TINY_GPT2}' (a GPT-2 pretrained here on bbc-news)"
            ) from None
        raise OSError(f"cannot load causal LM {source!r}: {err}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return quantize_model(model, quantize), tokenizer


def max_positions(model: PreTrainedModel) -> int | None:
    """The longest sequence the model takes, when its config says (GPT-2's `n_positions`, else
    `max_position_embeddings`)."""
    config = model.config
    value = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    return int(value) if value else None


class ChoiceScorer:
    """Scores a closed set of answers after each prompt: ``scorer(model)`` is
    (len(prompts), len(choices)), log P(choice tokens | start + prompt) summed over the tokens;
    ``start`` is eos (GPT-2's bos) unless given (none for a prompt the chat template rendered).

    Tokenizes once, so the same scorer can rate a model many times (every evaluation of a
    training run). Rows are `start prompt choice`, left-padded so that every row's choice sits at
    the end: only those last positions go through the output head, which for a small model's
    large vocabulary is as costly as the rest of the model, and prompts are batched by length.
    One-token choices are all scored from one pass.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompts: Sequence[str],
        choices: Sequence[str],
        max_length: int,
        batch_size: int = 32,
        start: Sequence[int] | None = None,
    ):
        if not prompts or not choices:
            raise ValueError("ChoiceScorer needs at least one prompt and one choice")
        self.choice_ids = token_ids(tokenizer, choices)
        if any(not ids for ids in self.choice_ids):
            raise ValueError(f"every choice must have at least one token, got {list(choices)!r}")
        self.prompt_ids = token_ids(tokenizer, prompts)
        # what precedes each prompt: eos (GPT-2's bos) unless given; none for a rendered chat
        self.start = [eos_id(tokenizer)] if start is None else list(start)
        self.pad = pad_id(tokenizer)
        self.max_length, self.batch_size = max_length, batch_size
        self.order = sorted(range(len(prompts)), key=lambda i: len(self.prompt_ids[i]))

    def _batch(self, rows: list[int], choice: list[int]) -> dict[str, torch.Tensor]:
        # the prompt loses its start when too long, as in `instruction_dataset` (room for the
        # choice and the eos that closes a training row)
        room = max(self.max_length - len(choice) - len(self.start) - 1, 0)
        return left_padded(
            [[*self.start, *self.prompt_ids[i][-room:][:room], *choice] for i in rows], self.pad
        )

    def single_tokens(self) -> list[int] | None:
        """The choices' token ids when every choice is a single token, else None."""
        if all(len(choice) == 1 for choice in self.choice_ids):
            return [choice[0] for choice in self.choice_ids]
        return None

    @torch.no_grad()
    def __call__(self, model: PreTrainedModel) -> torch.Tensor:
        was_training = model.training
        model.eval()
        scores = torch.zeros(len(self.prompt_ids), len(self.choice_ids), dtype=torch.float64)
        try:
            with contiguous_head_inputs(model):
                for start in range(0, len(self.order), self.batch_size):
                    rows = self.order[start : start + self.batch_size]
                    scores[rows] = self._score(model, rows)
        finally:
            model.train(was_training)
        return scores

    def _score(self, model: PreTrainedModel, rows: list[int]) -> torch.Tensor:
        """(len(rows), choices) log-likelihoods. When every choice is one token, one forward
        pass of the prompts scores them all; otherwise one pass per choice."""
        device = next(model.parameters()).device
        single = self.single_tokens()
        if single is not None:
            batch = {k: v.to(device) for k, v in self._batch(rows, []).items()}
            log_probs = _last_logits(model, batch, 1)[:, -1].float().log_softmax(-1)
            return log_probs[:, single].double().cpu()
        columns = []
        for choice in self.choice_ids:
            batch = {k: v.to(device) for k, v in self._batch(rows, choice).items()}
            k = len(choice)
            # logits at the last k+1 positions; the first k of them predict the choice
            logits = _last_logits(model, batch, k + 1)[:, :k].float()
            targets = torch.tensor(choice, device=device).expand(len(rows), k)
            log_probs = logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1))
            columns.append(log_probs.squeeze(-1).sum(1).double().cpu())
        return torch.stack(columns, 1)


def left_padded(seqs: Sequence[Sequence[int]], pad: int) -> dict[str, torch.Tensor]:
    """Rows padded on the left, so that every row ends at the last position (where generation
    and answer scoring look), with the attention mask and positions counted from each row's
    first real token."""
    width = max(len(seq) for seq in seqs)
    input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        input_ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions}


@dataclass(frozen=True)
class Continuations:
    """Greedy continuations of prompts, in the prompts' order."""

    tokens: list[list[int]]  # the new tokens up to the first stop token (not included)
    ended: list[bool]  # whether a stop token ended it (else max_new_tokens did)
    # log-probabilities of the watched tokens as the first new token: (prompts, watched)
    first_log_probs: torch.Tensor | None


@torch.no_grad()
def greedy_continuations(
    model: PreTrainedModel,
    prompt_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop_ids: Sequence[int],
    pad: int,
    batch_size: int = 32,
    watch: Sequence[int] = (),
) -> Continuations:
    """Greedy continuation of each prompt (token ids, the model's own tokens in full), prompts
    batched by length. ``watch``: token ids whose log-probability as the first new token is
    kept too (a closed set of one-token answers scored in the same pass)."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    tokens: list[list[int]] = [[] for _ in prompt_ids]
    ended = [False] * len(prompt_ids)
    first = torch.zeros(len(prompt_ids), len(watch), dtype=torch.float64)
    try:
        with contiguous_head_inputs(model):
            for begin in range(0, len(order), batch_size):
                rows = order[begin : begin + batch_size]
                batch = left_padded([prompt_ids[i] for i in rows], pad)
                batch.pop("position_ids")  # generate counts positions from the mask itself
                out = model.generate(
                    **{k: v.to(model.device) for k, v in batch.items()},
                    max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                    eos_token_id=list(stop_ids), output_logits=bool(watch),
                    return_dict_in_generate=True,
                )  # fmt: skip
                new = out.sequences[:, batch["input_ids"].shape[1] :].tolist()
                for row, ids in zip(rows, new, strict=True):
                    stops = [j for j, token in enumerate(ids) if token in stop_ids]
                    tokens[row] = ids[: stops[0]] if stops else ids
                    ended[row] = bool(stops)
                if watch:
                    log_probs = out.logits[0].float().log_softmax(-1)[:, list(watch)]
                    first[rows] = log_probs.double().cpu()
    finally:
        model.train(was_training)
    return Continuations(tokens, ended, first if watch else None)


def _last_logits(model: PreTrainedModel, batch: dict, keep: int) -> torch.Tensor:
    """The logits of the last `keep` positions; the output head runs on those alone where the
    model takes `logits_to_keep` (transformers' causal LMs do)."""
    if _takes_logits_to_keep(model):
        return model(**batch, logits_to_keep=keep).logits[:, -keep:]
    return model(**batch).logits[:, -keep:]


def _takes_logits_to_keep(model: torch.nn.Module) -> bool:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT
    return "logits_to_keep" in inspect.signature(inner.forward).parameters
