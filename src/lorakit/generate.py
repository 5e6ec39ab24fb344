"""Text generation from a causal LM (base, base + adapter, or merged), streamed as it is decoded.

The prompt reaches the model in the shape the run trained on:
- a chat run (its examples rendered with the tokenizer's chat template): the prompt is the
  user's turn, after the run's system prompt when it set one, rendered by the template up to the
  opening of the assistant's turn; generation stops at the end-of-turn token (or eos), and the
  answer comes back without special tokens.
- any other run: eos, then the prompt (every training row began with eos, GPT-2's bos).
- ``raw=True`` on a chat run: the text exactly as given, with only the special tokens the
  tokenizer itself adds (none for SmolLM2's, whose bos ``<|im_start|>`` opens a turn and belongs
  to the template; ``<s>`` for a tokenizer that adds one).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase, TextStreamer

from lorakit.data.causal import eos_id, pad_id, token_ids
from lorakit.data.chat import render, stop_ids
from lorakit.models.causal_lm import max_positions


class _CallbackStreamer(TextStreamer):
    """TextStreamer that hands each finished piece of text to a callback instead of print()."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, on_text: Callable[[str], None]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._on_text = on_text

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self._on_text(text + ("\n" if stream_end else ""))


def _write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def prompt_ids(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    *,
    chat: bool = False,
    system_prompt: str | None = None,
    raw: bool = False,
) -> list[int]:
    """The token ids the model continues: the chat rendering of ``prompt`` (``chat``), the text
    as given (``chat`` and ``raw``), or eos and the text."""
    if chat and not raw:
        turns = [{"role": "system", "content": system_prompt}] if system_prompt else []
        turns.append({"role": "user", "content": prompt})
        # the template writes any bos itself: no special tokens added on top
        return token_ids(tokenizer, [render(tokenizer, turns, open_turn=True)])[0]
    if chat:
        ids = tokenizer(prompt)["input_ids"]
        return list(ids) or [eos_id(tokenizer)]  # nothing to continue: start after an ending
    return [eos_id(tokenizer), *token_ids(tokenizer, [prompt])[0]]


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    max_new_tokens: int = 50,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stream: bool = True,
    on_text: Callable[[str], None] | None = None,
    *,
    chat: bool = False,
    system_prompt: str | None = None,
    raw: bool = False,
    echo_prompt: bool = False,
) -> str:
    """Continue ``prompt`` (or answer it, on a ``chat`` run) and return the new text, special
    tokens left out; greedy when ``temperature == 0``.

    With ``stream=True`` each piece of text goes to ``on_text`` (stdout by default) as soon as it
    is decoded, after the prompt itself when ``echo_prompt`` and the text continues it (not a
    chat answer). ``seed`` makes sampling repeatable. The module docstring says what the model sees.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if seed is not None:
        torch.manual_seed(seed)
    greedy = temperature == 0
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=not greedy,
        temperature=None if greedy else temperature,
        top_p=None if greedy else top_p,
        top_k=None if greedy else 0,
        pad_token_id=pad_id(tokenizer),
        eos_token_id=stop_ids(tokenizer, chat),
    )
    ids = prompt_ids(tokenizer, prompt, chat=chat, system_prompt=system_prompt, raw=raw)
    positions = max_positions(model)
    if positions is not None and len(ids) + max_new_tokens > positions:
        raise ValueError(
            f"the prompt's {len(ids)} tokens and {max_new_tokens} new ones exceed the model's "
            f"{positions} positions; give a shorter prompt or a smaller --max-new-tokens"
        )
    input_ids = torch.tensor([ids], device=model.device)
    streamer = None
    if stream:
        on_text = on_text or _write_stdout
        if echo_prompt and (raw or not chat):
            on_text(prompt)
        streamer = _CallbackStreamer(tokenizer, on_text)
    was_training = model.training
    model.eval()
    try:
        output = model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
            generation_config=config, streamer=streamer,
        )  # fmt: skip
    finally:
        model.train(was_training)
    return tokenizer.decode(output[0, len(ids) :], skip_special_tokens=True)
