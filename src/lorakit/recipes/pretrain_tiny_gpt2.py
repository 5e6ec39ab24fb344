"""Pipeline for `pretrain-tiny-gpt2`: lorakit's own small GPT-2, trained from scratch offline.

Trains the byte-level BPE tokenizer and the model (`lorakit.models.tiny_gpt2`) on the
`pretrain.data` articles into `RUN_DIR/model` (an ordinary Hugging Face folder), measures
held-out perplexity on the validation and test splits, and, when the settings are the defaults,
also fills the cache that `model.name = "tiny-gpt2"` reads, so `causal-lm` finds it there.

The pretraining itself (`pretrain_tiny_gpt2`: AdamW, cosine schedule, bf16 autocast, every
weight trains) and pretraining on first use (`ensure_tiny_gpt2`, `ensure_base_model`: what a
recipe or command calls before loading "tiny-gpt2") live here too, so loading a model never trains.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from transformers import GPT2LMHeadModel, get_cosine_schedule_with_warmup

from lorakit.config import Config, ConfigError, PretrainConfig
from lorakit.data import dataset_fingerprint, load_dataset
from lorakit.data.causal import pack_texts
from lorakit.models.causal_lm import load_causal_lm
from lorakit.models.tiny_gpt2 import (
    TINY_GPT2,
    TinyGPT2Settings,
    default_tiny_gpt2_path,
    is_complete,
    tiny_gpt2_config,
    train_bpe_tokenizer,
)
from lorakit.nn.fast_dropout import fast_dropout
from lorakit.nn.frozen_base import bf16_frozen_base
from lorakit.recipes import runner
from lorakit.recipes.base import Recipe
from lorakit.rundir import RunDir
from lorakit.train.metrics import perplexity

MODEL_FOLDER = "model"


def settings_of(config: Config) -> TinyGPT2Settings:
    """The tiny GPT-2 settings this config asks for (architecture: the defaults)."""
    pretrain = config.pretrain or PretrainConfig()
    defaults = TinyGPT2Settings()
    return TinyGPT2Settings(
        dataset=pretrain.data,
        steps=pretrain.steps or defaults.steps,
        batch_size=pretrain.batch_size,
        seq_len=pretrain.max_length,
        lr=pretrain.lr,
        seed=config.seed,
    )


class PretrainTinyGPT2(Recipe):
    """Pretraining trains no adapter: the runner's frame (``start`` .. ``finish``) around its
    own training, with no build, adapter or reload steps."""

    resumable = False

    def load_data(self) -> str:
        self.settings = settings = settings_of(self.config)
        if settings.seq_len > settings.n_positions:
            raise ConfigError(
                f"pretrain.max_length: {settings.seq_len} exceeds the model's "
                f"{settings.n_positions} positions"
            )
        self.corpus = load_dataset(settings.dataset)
        return dataset_fingerprint(self.corpus)

    def plan(self) -> dict[str, Any]:
        """Texts per split; ``pretrain.steps`` steps of random blocks (no epochs)."""
        self.load_data()
        return {
            "examples": {name: len(split) for name, split in self.corpus.items()},
            "batch_size": self.settings.batch_size, "grad_accum_steps": 1, "epochs": None,
            "steps_per_epoch": None, "total_steps": self.settings.steps,
        }  # fmt: skip

    @classmethod
    def run(cls, config: Config, run_dir: RunDir, resume: Path | None = None) -> dict[str, Any]:
        """Pretrain into RUN_DIR/model; summary.json holds the held-out test perplexity."""
        recipe = cls(config)
        runner.start(recipe, run_dir, resume)
        summary = pretrain(config, run_dir, recipe.settings, recipe.corpus)
        return runner.finish(recipe, run_dir, summary)

    def closing_line(self, summary: dict[str, Any], run_dir: RunDir) -> str:
        cached = summary["cached_as"]
        return (f"{self.config.recipe}: test perplexity {summary['test_perplexity']:.1f} "
                f"(validation {summary['validation_perplexity']:.1f}); model in "
                f"{run_dir.path / MODEL_FOLDER}" + (f", cached as {cached}" if cached else ""))  # fmt: skip

    def predictor(self, run_dir: Path):
        raise ConfigError(
            f"{run_dir} is a pretrained base model, not a classifier; use it as "
            f'model.name = "{Path(run_dir) / MODEL_FOLDER}" in the causal-lm recipe'
        )


def pretrain(config: Config, run_dir: RunDir, settings: TinyGPT2Settings, corpus) -> dict[str, Any]:
    """Train, then measure the validation and test perplexity; returns the summary."""
    model_dir = run_dir.path / MODEL_FOLDER

    def progress(event: dict) -> None:
        run_dir.log("train", step=event["step"], epoch=None, time=round(event["seconds"], 3),
                    loss=event["loss"], lr=event["lr"])  # fmt: skip
        print(f"{config.recipe}: step {event['step']}/{settings.steps} loss {event['loss']:.3f} "
              f"(mean of the last {event['window']} steps; {event['seconds']:.0f} s)",
              flush=True)  # fmt: skip

    result = pretrain_tiny_gpt2(
        model_dir, corpus["train"]["text"], corpus["validation"]["text"],
        steps=settings.steps, batch_size=settings.batch_size, seq_len=settings.seq_len,
        lr=settings.lr, vocab_size=settings.vocab_size, n_layer=settings.n_layer,
        n_embd=settings.n_embd, n_head=settings.n_head, n_positions=settings.n_positions,
        seed=settings.seed, progress=progress, log_every=max(1, min(50, settings.steps // 10)),
    )  # fmt: skip
    val_ppl = result["perplexity"]
    run_dir.log("eval", step=settings.steps, epoch=None, split="validation",
                loss=math.log(val_ppl), perplexity=val_ppl)  # fmt: skip
    model, tokenizer = load_causal_lm(model_dir)
    test_blocks = pack_texts(tokenizer, corpus["test"]["text"], settings.seq_len)
    test_ppl = perplexity(model, test_blocks, batch_size=64)
    run_dir.log("test", step=settings.steps, epoch=None, split="test",
                loss=math.log(test_ppl), perplexity=test_ppl)  # fmt: skip
    cached = _fill_cache(model_dir, settings)
    summary = {
        "recipe": config.recipe,
        "task": "causal-lm",
        "dataset": settings.dataset,
        "base_model": str(model_dir.resolve()),
        "engine": "none",  # pretraining: every weight trains, no adapter
        "test_perplexity": test_ppl,
        "validation_perplexity": val_ppl,
        "test_loss": math.log(test_ppl),
        "trainable_params": result["params"],
        "total_params": result["params"],
        "adapter_bytes": 0,
        "train_seconds": round(result["seconds"], 2),
        "best_step": settings.steps,
        "steps": settings.steps,
        "train_tokens": result["train_tokens"],
        "seed": config.seed,
        "cached_as": str(cached) if cached else None,
    }
    return summary


def _fill_cache(model_dir: Path, settings: TinyGPT2Settings) -> Path | None:
    """Copy the model to the `tiny-gpt2` cache when it is the default one and none is cached."""
    target = default_tiny_gpt2_path()
    if settings != TinyGPT2Settings() or (target / "model.safetensors").is_file():
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}-copy")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(model_dir, tmp)
    if target.exists():
        shutil.rmtree(target)
    tmp.replace(target)
    return target


# ---------------------------------------------------------------- pretraining
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
    # under bf16 the eager attention kernel is the faster one here (lorakit.nn.frozen_base);
    # every weight trains, so none is held in bf16. GPT-2's dropout (0.1) draws cheap masks
    # (lorakit.nn.fast_dropout): 0.525 s a step against 0.637 s with PyTorch's
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
                        "window": n,
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


# ---------------------------------------------------------------- pretraining on first use
def _print_progress(event: dict) -> None:
    print(
        f"tiny-gpt2 pretraining: step {event['step']} loss {event['loss']:.3f} "
        f"(mean of the last {event['window']} steps; {event['seconds']:.0f} s)",
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
    if is_complete(target):
        return target
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
        if is_complete(target):  # another process finished first
            shutil.rmtree(tmp)
        else:
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def ensure_base_model(name: str) -> str:
    """``name`` unchanged, once the tiny GPT-2 is in its cache when ``name`` is "tiny-gpt2"
    (pretrained there on first use): the step before loading a base model by name."""
    if name == TINY_GPT2:
        ensure_tiny_gpt2()
    return name


RECIPE = PretrainTinyGPT2
