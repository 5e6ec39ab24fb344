"""A small GPT-2 made offline: a byte-level BPE tokenizer and a `GPT2LMHeadModel` trained from scratch.

No GPT-2 weights can be downloaded here, so lorakit pretrains its own base model on the bbc-news
article text and caches it as an ordinary Hugging Face folder (`config.json`,
`model.safetensors`, `tokenizer.json`) that `AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` load without a network.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
    get_cosine_schedule_with_warmup,
)

from lorakit.data.causal import pack_texts
from lorakit.models.causal_lm import perplexity
from lorakit.train.fast_dropout import fast_dropout
from lorakit.train.frozen_base import bf16_frozen_base

ENDOFTEXT = "<|endoftext|>"
FORMAT_VERSION = 2  # bump when a change to this file changes the trained model (2: fast dropout)


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


def _batches(n_blocks: int, batch_size: int, steps: int, seed: int):
    """Indices of `steps` batches, reshuffling the blocks at each pass over them."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(n_blocks, generator=gen)])
        yield order[:batch_size]
        order = order[batch_size:]


def pretrain_tiny_gpt2(
    out_dir: str | Path,
    texts_train: Sequence[str],
    texts_val: Sequence[str],
    *,
    steps: int,
    batch_size: int = 32,
    seq_len: int = 128,
    lr: float = 2e-3,
    vocab_size: int = 8000,
    n_layer: int = 4,
    n_embd: int = 256,
    n_head: int = 8,
    n_positions: int = 256,
    warmup_fraction: float = 0.05,
    bf16: bool = True,
    seed: int = 0,
    progress: Callable[[dict], None] | None = None,
    log_every: int = 50,
) -> dict:
    """Train tokenizer and GPT-2 from scratch on packed blocks; save both into `out_dir`.

    Returns `perplexity` (held-out, on `texts_val`), `seconds` (training only), `params` and
    `steps`; the same figures are written to `out_dir/pretraining.json`.
    """
    if seq_len > n_positions:
        raise ValueError(f"seq_len {seq_len} exceeds the model's n_positions {n_positions}")
    torch.manual_seed(seed)
    tokenizer = train_bpe_tokenizer(texts_train, vocab_size, model_max_length=n_positions)
    train_blocks = pack_texts(tokenizer, texts_train, seq_len)["input_ids"]
    val_blocks = pack_texts(tokenizer, texts_val, seq_len)
    config = tiny_gpt2_config(len(tokenizer), n_layer, n_embd, n_head, n_positions)
    config.bos_token_id = config.eos_token_id = config.pad_token_id = tokenizer.eos_token_id
    model = GPT2LMHeadModel(config)
    params = sum(p.numel() for p in model.parameters())

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
    )
    schedule = get_cosine_schedule_with_warmup(
        optimizer, max(1, int(warmup_fraction * steps)), steps
    )
    model.train()
    start = time.perf_counter()
    running, losses = 0.0, []
    # under bf16 the eager attention kernel is the faster one here (lorakit.train.frozen_base);
    # every weight trains, so none is held in bf16. GPT-2's dropout (0.1) draws cheap masks
    # (lorakit.train.fast_dropout): 0.525 s a step against 0.637 s with PyTorch's
    with bf16_frozen_base(model) if bf16 else nullcontext(), fast_dropout(model):
        for step, idx in enumerate(_batches(len(train_blocks), batch_size, steps, seed), start=1):
            batch = train_blocks[idx]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(
                    input_ids=batch, attention_mask=torch.ones_like(batch), labels=batch
                ).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            running += loss.item()
            losses.append(loss.item())
            if progress is not None and (step % log_every == 0 or step == steps):
                n = step % log_every or log_every
                progress(
                    {
                        "step": step,
                        "loss": running / n,
                        "lr": schedule.get_last_lr()[0],
                        "seconds": time.perf_counter() - start,
                    }
                )
            if step % log_every == 0:
                running = 0.0
    seconds = time.perf_counter() - start

    result = {
        "perplexity": perplexity(model, val_blocks, batch_size=64),
        "seconds": seconds,
        "params": params,
        "steps": steps,
        "first_loss": losses[0],
        "last_loss": sum(losses[-10:]) / len(losses[-10:]),
        "train_tokens": steps * batch_size * seq_len,
        "val_tokens": int(val_blocks.num_rows * seq_len),
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "pretraining.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def cache_root() -> Path:
    """`$LORAKIT_CACHE`, else `~/.cache/lorakit`."""
    return Path(os.environ.get("LORAKIT_CACHE") or Path.home() / ".cache" / "lorakit")


def default_tiny_gpt2_path(settings: TinyGPT2Settings | None = None) -> Path:
    """The cache folder of the tiny GPT-2 made with `settings` (the defaults when None)."""
    settings = settings or TinyGPT2Settings()
    return cache_root() / f"tiny-gpt2-{settings.fingerprint()}"


def _is_complete(folder: Path) -> bool:
    return all(
        (folder / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer.json")
    )


def _print_progress(event: dict) -> None:
    print(
        f"tiny-gpt2 pretraining: step {event['step']} loss {event['loss']:.3f} "
        f"({event['seconds']:.0f} s)",
        file=sys.stderr,
        flush=True,
    )


def ensure_tiny_gpt2(
    cache_dir: str | Path | None = None,
    settings: TinyGPT2Settings | None = None,
    progress: Callable[[dict], None] | None = _print_progress,
) -> Path:
    """The tiny GPT-2 folder, pretrained on first use (about 12 minutes on 2 cores) and cached.

    Training goes to a temporary folder beside the target, renamed into place only when
    complete, so an interrupted run never leaves a half-written model behind.
    """
    settings = settings or TinyGPT2Settings()
    target = Path(cache_dir) if cache_dir is not None else default_tiny_gpt2_path(settings)
    if _is_complete(target):
        return target
    from lorakit.data import load_dataset  # the data layer is only needed to pretrain

    corpus = load_dataset(settings.dataset)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        pretrain_tiny_gpt2(
            tmp,
            corpus["train"]["text"],
            corpus["validation"]["text"],
            steps=settings.steps,
            batch_size=settings.batch_size,
            seq_len=settings.seq_len,
            lr=settings.lr,
            vocab_size=settings.vocab_size,
            n_layer=settings.n_layer,
            n_embd=settings.n_embd,
            n_head=settings.n_head,
            n_positions=settings.n_positions,
            seed=settings.seed,
            progress=progress,
        )
        if _is_complete(target):  # another process finished first
            shutil.rmtree(tmp)
        else:
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
