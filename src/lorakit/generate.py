"""Text generation from a causal LM (base, base + adapter, or merged), streamed as it is decoded."""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase, TextStreamer


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
) -> str:
    """Continue `prompt` and return the new text; greedy when `temperature == 0`.

    With `stream=True` each piece of text goes to `on_text` (stdout by default) as soon as it is
    decoded. `seed` makes sampling repeatable. The prompt is preceded by eos, GPT-2's bos.
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
        pad_token_id=tokenizer.pad_token_id
        if tokenizer.pad_token_id is not None
        else tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    text = (tokenizer.bos_token or "") + prompt
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(model.device)
    streamer = _CallbackStreamer(tokenizer, on_text or _write_stdout) if stream else None
    was_training = model.training
    model.eval()
    try:
        output = model.generate(**inputs, generation_config=config, streamer=streamer)
    finally:
        model.train(was_training)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
