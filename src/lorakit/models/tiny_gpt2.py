"""A small GPT-2 made offline: its byte-level BPE tokenizer, its configuration and its cache.

No GPT-2 weights can be downloaded here, so lorakit pretrains its own base model on the bbc-news
article text (the `pretrain-tiny-gpt2` recipe, `lorakit.recipes.pretrain_tiny_gpt2`) and caches
it as an ordinary Hugging Face folder (`config.json`, `model.safetensors`, `tokenizer.json`) that
`AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load without a
network. The folder's name is a hash of `TinyGPT2Settings`, so other settings never read a model
made with different ones. This module only builds and finds; it never trains.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GPT2Config, PreTrainedTokenizerFast

from lorakit.models import ModelError, cache_root

TINY_GPT2 = "tiny-gpt2"  # the model.name that loads this model
ENDOFTEXT = "<|endoftext|>"
# bump when a change here or in the pretraining (lorakit.recipes.pretrain_tiny_gpt2) changes the
# trained model (2: fast dropout)
FORMAT_VERSION = 2


@dataclasses.dataclass(frozen=True)
class TinyGPT2Settings:
    """Everything that decides the cached tiny GPT-2; its hash names the cache folder."""

    dataset: str = "bbc-news"
    vocab_size: int = 8000
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 8
    n_positions: int = 256
    steps: int = 1200
    batch_size: int = 32
    seq_len: int = 128
    lr: float = 2e-3
    seed: int = 0

    def fingerprint(self) -> str:
        blob = json.dumps({**dataclasses.asdict(self), "format": FORMAT_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def train_bpe_tokenizer(
    texts: Sequence[str], vocab_size: int = 8000, model_max_length: int = 256
) -> PreTrainedTokenizerFast:
    """Byte-level BPE as GPT-2 has it: any text encodes, `<|endoftext|>` is bos, eos, pad and unk."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[ENDOFTEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer, length=len(texts))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=ENDOFTEXT,
        eos_token=ENDOFTEXT,
        unk_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        model_max_length=model_max_length,
    )


def tiny_gpt2_config(
    vocab_size: int, n_layer: int = 4, n_embd: int = 256, n_head: int = 8, n_positions: int = 256
) -> GPT2Config:
    """A GPT-2 configuration of a few million parameters; token 0 (`<|endoftext|>`) is bos/eos."""
    return GPT2Config(
        vocab_size=vocab_size,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_positions=n_positions,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        tie_word_embeddings=True,
    )


def default_tiny_gpt2_path(settings: TinyGPT2Settings | None = None) -> Path:
    """The cache folder of the tiny GPT-2 made with `settings` (the defaults when None)."""
    settings = settings or TinyGPT2Settings()
    return cache_root() / f"tiny-gpt2-{settings.fingerprint()}"


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` holds a whole saved model: config, weights and tokenizer."""
    return all(
        (folder / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer.json")
    )


def cached_tiny_gpt2(settings: TinyGPT2Settings | None = None) -> Path:
    """The cached tiny GPT-2 folder; a ModelError naming the recipe that makes it when absent."""
    folder = default_tiny_gpt2_path(settings)
    if not is_complete(folder):
        raise ModelError(
            f"{TINY_GPT2} is not pretrained yet (no model in {folder}): run `lorakit train "
            "pretrain-tiny-gpt2` once (about 12 minutes on 2 cores), or set model.name to a "
            "model folder"
        )
    return folder
