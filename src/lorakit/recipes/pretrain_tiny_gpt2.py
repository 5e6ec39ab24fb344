"""Pipeline for `pretrain-tiny-gpt2`: lorakit's own small GPT-2, trained from scratch offline.

Trains the byte-level BPE tokenizer and the model (`lorakit.models.tiny_gpt2`) on the
`pretrain.data` articles into `RUN_DIR/model` (an ordinary Hugging Face folder), measures
held-out perplexity on the validation and test splits, and, when the settings are the defaults,
also fills the cache that `model.name = "tiny-gpt2"` reads, so `causal-lm` finds it there.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

from lorakit.config import Config, ConfigError, PretrainConfig
from lorakit.data import dataset_fingerprint, load_dataset
from lorakit.data.causal import pack_texts
from lorakit.models.causal_lm import load_causal_lm, perplexity
from lorakit.models.tiny_gpt2 import (
    TinyGPT2Settings,
    default_tiny_gpt2_path,
    pretrain_tiny_gpt2,
)
from lorakit.recipes import runner
from lorakit.recipes.base import Recipe
from lorakit.rundir import RunDir

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
              f"({event['seconds']:.0f} s)", flush=True)  # fmt: skip

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


RECIPE = PretrainTinyGPT2
load_predictor = PretrainTinyGPT2.load_predictor


def run(config: Config, run_dir: RunDir) -> dict[str, Any]:
    """No ``resume``: `lorakit train --resume` says this pipeline cannot resume."""
    return PretrainTinyGPT2.run(config, run_dir)
