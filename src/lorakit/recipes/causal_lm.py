"""Pipeline for the causal-LM recipes (`causal-lm`, `instruct-verdicts`): LoRA on a GPT-2-like model.

1. Load the base model (`model.name`: "tiny-gpt2", a folder or a hub id) and measure its test
   perplexity.
2. Build the data: `causal.mode = "lm"` packs the review text into blocks of
   `causal.block_size` (`causal.packing = false`: one padded row per text); `"instruction"`
   makes prompt/response rows whose loss counts only the response (the built-in
   rotten-tomatoes verdicts, or a .jsonl/.csv file in `data.path`).
3. Add LoRA (engine `lorakit` or `peft`), train with lorakit's loop, keep the adapter of the best
   validation perplexity.
4. Test; save the adapter; reload it into a fresh base with both engines and compare logits.
   `compare = true` adds a full fine-tuning row beside LoRA in comparison.json / .md.
"""

from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path
from typing import Any

import datasets
import torch
from torch.utils.data import DataLoader

from lorakit import lora
from lorakit.config import CausalConfig, Config, ConfigError
from lorakit.data import dataset_fingerprint, load_dataset, split_of
from lorakit.data.causal import (
    VERDICT_CHOICES,
    instruction_dataset,
    load_instruction_file,
    pack_texts,
    padded_lm_dataset,
    rotten_tomatoes_verdicts,
)
from lorakit.models.causal_lm import ChoiceScorer, load_causal_lm
from lorakit.models.transformer import weights_bytes
from lorakit.nn.frozen_base import set_model_dropout
from lorakit.recipes import run_summary, write_reports
from lorakit.recipes.pretrain_tiny_gpt2 import ensure_base_model
from lorakit.rundir import RunDir, read_run_summary
from lorakit.train import engines
from lorakit.train.loop import train_loop
from lorakit.train.metrics import evaluate_causal, perplexity, verdict_accuracy

SPLITS = ("train", "validation", "test")
INSTRUCTION_FILE_TYPES = (".jsonl", ".csv")
RELOAD_TOLERANCE = 1e-4


def causal_section(config: Config) -> CausalConfig:
    return config.causal or CausalConfig()


# ---------------------------------------------------------------- data
def _limit_train(split: datasets.Dataset, config: Config) -> datasets.Dataset:
    limit = config.data.max_train_samples
    if not limit:
        return split
    split = split.shuffle(seed=config.seed)
    return split.select(range(min(len(split), limit)))


def _instruction_pairs(config: Config) -> datasets.DatasetDict:
    """prompt/response splits: an instruction file (split by prompt hash) or the verdicts."""
    causal = causal_section(config)
    path = config.data.path
    if path and Path(path).suffix.lower() in INSTRUCTION_FILE_TYPES:
        pairs = load_instruction_file(path, causal.prompt_column, causal.response_column)
        where = [split_of(p) for p in pairs["prompt"]]
        dsd = datasets.DatasetDict(
            {s: pairs.select([i for i, w in enumerate(where) if w == s]) for s in SPLITS}
        )
        empty = [s for s in SPLITS if dsd[s].num_rows == 0]
        if empty:
            raise ConfigError(
                f"data.path: {path} has {pairs.num_rows} rows, too few to fill the "
                f"{', '.join(empty)} split(s) (~80/10/10 by prompt); give at least ~50 rows"
            )
        return dsd
    dsd = load_dataset(
        config.data.source,
        text_column=config.data.text_column,
        label_column=config.data.label_column,
    )
    try:
        return rotten_tomatoes_verdicts(dsd)
    except ValueError as err:
        raise ConfigError(
            f"data: {err}, or an instruction file ({', '.join(INSTRUCTION_FILE_TYPES)}) with "
            "prompt/response columns in data.path"
        ) from None


def build_data(config: Config, tokenizer, max_positions: int) -> dict[str, Any]:
    """Tokenized splits (`input_ids`, `attention_mask`, `labels`), the raw test pairs, and the
    fingerprint of the source data."""
    causal = causal_section(config)
    if causal.mode == "lm":
        if causal.block_size > max_positions:
            raise ConfigError(
                f"causal.block_size: {causal.block_size} exceeds the model's {max_positions} "
                f"positions; set causal.block_size <= {max_positions}"
            )
        dsd = load_dataset(
            config.data.source,
            text_column=config.data.text_column,
            label_column=config.data.label_column,
        )
        dsd["train"] = _limit_train(dsd["train"], config)
        if causal.packing:
            splits = {s: pack_texts(tokenizer, dsd[s]["text"], causal.block_size) for s in SPLITS}
        else:
            max_length = min(config.data.max_length, max_positions)
            splits = {s: padded_lm_dataset(tokenizer, dsd[s]["text"], max_length) for s in SPLITS}
        return {
            "splits": splits, "val_pairs": None, "test_pairs": None,
            "fingerprint": dataset_fingerprint(dsd),
        }  # fmt: skip
    pairs = _instruction_pairs(config)
    pairs["train"] = _limit_train(pairs["train"], config)
    max_length = min(config.data.max_length, max_positions)
    splits = {
        s: instruction_dataset(tokenizer, pairs[s]["prompt"], pairs[s]["response"], max_length)
        for s in SPLITS
    }
    return {
        "splits": splits, "val_pairs": pairs["validation"], "test_pairs": pairs["test"],
        "fingerprint": _pairs_fingerprint(pairs),
    }  # fmt: skip


def _pairs_fingerprint(pairs: datasets.DatasetDict) -> str:
    """A 16-hex-digit digest of every split's prompts and responses."""
    digest = hashlib.sha256()
    for split in SPLITS:
        digest.update(f"\x1e{split}\x1d".encode())
        for prompt, response in zip(pairs[split]["prompt"], pairs[split]["response"], strict=True):
            digest.update(f"{prompt}\x1f{response}\x1e".encode())
    return digest.hexdigest()[:16]


def _positions(model) -> int:
    config = model.config
    return int(getattr(config, "n_positions", None) or config.max_position_embeddings)


# ---------------------------------------------------------------- evaluation
def _has_verdicts(pairs: datasets.Dataset | None) -> bool:
    """Whether prompt/response pairs are verdicts (a `choice` column) that can be scored."""
    return pairs is not None and "choice" in pairs.column_names


def validation_figures(data: dict[str, Any], tokenizer, max_length: int, batch_size: int):
    """The loop's evaluation: loss and perplexity, and for verdict data the verdict accuracy
    on the validation prompts as well (scored the way the test split is), so the run's curves
    show the task itself; `causal.select_by` picks which of them keeps the best adapter."""
    pairs = data["val_pairs"]
    if not _has_verdicts(pairs):
        return evaluate_causal
    scorer = ChoiceScorer(tokenizer, pairs["prompt"], VERDICT_CHOICES, max_length, batch_size)
    truth = torch.tensor(pairs["choice"])

    def evaluate(model, loader, accelerator=None) -> dict[str, float]:
        figures = evaluate_causal(model, loader, accelerator)
        predicted = scorer(model).argmax(1)
        figures["verdict_accuracy"] = float((predicted == truth).double().mean())
        return figures

    return evaluate


def _verdicts(model, tokenizer, pairs: datasets.Dataset | None, batch_size: int) -> float | None:
    """Verdict accuracy (log-likelihood of " fresh" vs " rotten"); None without verdict data."""
    if not _has_verdicts(pairs):
        return None
    return verdict_accuracy(
        model, tokenizer, pairs["prompt"], pairs["choice"], batch_size=batch_size
    )


def _loaders(splits: dict[str, datasets.Dataset], config: Config) -> dict[str, DataLoader]:
    generator = torch.Generator().manual_seed(config.seed)
    return {
        s: DataLoader(
            splits[s],
            batch_size=config.train.batch_size if s == "train" else config.train.eval_batch_size,
            shuffle=s == "train",
            generator=generator if s == "train" else None,
            num_workers=config.train.num_workers,
        )
        for s in SPLITS
    }


# ---------------------------------------------------------------- the run
def _model_to_train(config: Config):
    """(model, tokenizer) of ``model.name``, with ``model.dropout`` applied when set: the start
    of both the LoRA run and the full fine-tuning beside it."""
    model, tokenizer = load_causal_lm(ensure_base_model(config.model.name))
    if config.model.dropout is not None:
        set_model_dropout(model, config.model.dropout)
    return model, tokenizer


def run(config: Config, run_dir: RunDir, resume: Path | None = None) -> dict[str, Any]:
    """Train LoRA on a causal LM and test it; ``resume``: a checkpoint folder of this run."""
    started = time.monotonic()
    causal = causal_section(config)
    model, tokenizer = _model_to_train(config)
    resolved = model.name_or_path  # the folder the weights came from
    data = build_data(config, tokenizer, _positions(model))
    splits = data["splits"]
    if causal.select_by == "verdict_accuracy" and not _has_verdicts(data["val_pairs"]):
        raise ConfigError(
            "causal.select_by: 'verdict_accuracy' needs verdict data (causal.mode = "
            "'instruction' on the built-in rotten-tomatoes verdicts); set causal.select_by = "
            "'perplexity'"
        )
    run_dir.start_environment(config.seed, data["fingerprint"])
    eval_bs = config.train.eval_batch_size
    base_ppl = perplexity(model, splits["test"], eval_bs)
    base_verdicts = _verdicts(model, tokenizer, data["test_pairs"], eval_bs)
    print(f"{config.recipe}: base model {resolved}: test perplexity {base_ppl:.2f}", flush=True)

    torch.manual_seed(config.seed)  # LoRA's A matrices start random: from the run's seed
    model = engines.apply_lora(model, config.lora, base_name=resolved, task_type="CAUSAL_LM")
    trainable, total = engines.parameter_counts(model)
    print(f"{config.recipe}: LoRA ({config.lora.engine}): {trainable:,} of {total:,} parameters "
          f"trainable ({100 * trainable / total:.3f}%)", flush=True)  # fmt: skip
    loaders = _loaders(splits, config)
    result = train_loop(
        model, loaders["train"], loaders["validation"], config.train, run_dir=run_dir,
        seed=config.seed, metric=causal.select_by, desc=config.recipe,
        checkpoint_dir=run_dir / "checkpoints", resume=resume,
        evaluate_fn=validation_figures(data, tokenizer, _positions(model), eval_bs),
    )  # fmt: skip
    model.eval()
    test_ppl = perplexity(model, splits["test"], eval_bs)
    verdicts = _verdicts(model, tokenizer, data["test_pairs"], eval_bs)
    test_figures = {"perplexity": test_ppl}
    if verdicts is not None:
        test_figures["verdict_accuracy"] = verdicts
    run_dir.log("test", step=result.best_step, epoch=None, split="test",
                loss=math.log(test_ppl), **test_figures)  # fmt: skip
    adapter_bytes = engines.save(model, run_dir.adapter_dir, resolved)
    checks = reload_checks(run_dir.path, config.model.name, model, splits["test"])
    summary = {
        **run_summary(
            config,
            result,
            base_model=config.model.name,  # what load_causal_lm (and lorakit merge) resolves
            trainable=trainable,
            total=total,
            adapter_bytes=adapter_bytes,
            base_model_bytes=weights_bytes(resolved) or None,
        ),  # fmt: skip
        "task": "causal-lm",
        "mode": causal.mode,
        "base_model_path": resolved,
        "trainer": "lorakit",
        "test_perplexity": test_ppl,
        "base_test_perplexity": base_ppl,
        "perplexity_ratio": test_ppl / base_ppl,
        "test_loss": math.log(test_ppl),
        "trainable_percent": round(100 * trainable / total, 4),
        "steps": result.steps,
        "test_tokens": _target_tokens(splits["test"]),
        **checks,
    }
    if verdicts is not None:
        summary["test_verdict_accuracy"] = verdicts
        summary["base_test_verdict_accuracy"] = base_verdicts
        summary["test_majority_accuracy"] = _majority(data["test_pairs"])
    if config.compare:
        rows = comparison_rows(config, splits, summary, data["test_pairs"], tokenizer)
        run_dir.write_comparison(rows, title=f"{config.recipe}: LoRA vs full fine-tuning")
        summary["full_ft_test_perplexity"] = rows[-1]["test_perplexity"]
    summary["total_seconds"] = round(time.monotonic() - started, 2)
    run_dir.write_summary(summary)
    run_dir.finish_environment()
    write_reports(run_dir.path)
    extra = "" if verdicts is None else f", verdict accuracy {verdicts:.4f}"
    print(f"{config.recipe}: test perplexity {base_ppl:.2f} -> {test_ppl:.2f}{extra} "
          f"(best step {result.best_step}); adapter in {run_dir.adapter_dir}", flush=True)  # fmt: skip
    return summary


def _target_tokens(split: datasets.Dataset) -> int:
    return int((split[:]["labels"][:, 1:] != -100).sum())


def _majority(pairs: datasets.Dataset) -> float:
    choices = pairs["choice"]
    return max(choices.count(c) for c in set(choices)) / len(choices)


@torch.no_grad()
def reload_checks(run_dir: Path, base: str, trained, test: datasets.Dataset) -> dict[str, Any]:
    """Load the saved adapter into a fresh base with each engine: the same logits as trained?"""
    batch = test.select(range(min(8, test.num_rows)))[:]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    reference = trained(**inputs).logits
    checks: dict[str, Any] = {}
    for engine in ("lorakit", "peft"):
        fresh, _ = load_causal_lm(base)
        reloaded = engines.load(fresh, run_dir / "adapter", engine).eval()
        diff = float((reloaded(**inputs).logits - reference).abs().max())
        checks[f"reload_{engine}_identical"] = diff <= RELOAD_TOLERANCE
        checks[f"reload_{engine}_max_abs_diff"] = diff
    return checks


def comparison_rows(config: Config, splits, summary, test_pairs, tokenizer) -> list[dict]:
    """Base, LoRA and full fine-tuning of the same model on the same data, one row each."""
    causal = causal_section(config)
    model, _ = _model_to_train(config)
    for p in model.parameters():
        p.requires_grad_(True)
    full_train = config.train.model_copy(
        update={"lr": causal.full_lr or config.train.lr / 10, "checkpoint_every": 0}
    )
    loaders = _loaders(splits, config)
    print(
        f"{config.recipe}: full fine-tuning for the comparison (lr {full_train.lr:g})", flush=True
    )
    result = train_loop(
        model, loaders["train"], loaders["validation"], full_train, seed=config.seed,
        metric="perplexity", desc="full fine-tuning", evaluate_fn=evaluate_causal,
    )  # fmt: skip
    full_ppl = perplexity(model.eval(), splits["test"], config.train.eval_batch_size)
    total = sum(p.numel() for p in model.parameters())  # the base model's own parameters
    full_verdicts = _verdicts(model, tokenizer, test_pairs, config.train.eval_batch_size)

    def row(method, trainable, ppl, verdicts, seconds):
        figures = {
            "method": method,
            "trainable_params": trainable,
            "trainable_percent": round(100 * trainable / total, 4),
            "test_perplexity": ppl,
            "vs_base": ppl / summary["base_test_perplexity"],
        }
        if _has_verdicts(test_pairs):
            figures["test_verdict_accuracy"] = verdicts
        figures["train_seconds"] = seconds
        return figures

    return [
        row("base (no training)", 0, summary["base_test_perplexity"],
            summary.get("base_test_verdict_accuracy"), 0.0),
        row(f"LoRA r={config.lora.r} ({config.lora.engine})", summary["trainable_params"],
            summary["test_perplexity"], summary.get("test_verdict_accuracy"),
            summary["train_seconds"]),
        row("full fine-tuning", total, full_ppl,
            full_verdicts, result.train_seconds),
    ]  # fmt: skip


# ---------------------------------------------------------------- inference on a finished run
def load_generator(run_dir: str | Path):
    """(model, tokenizer): the run's base model with its adapter, ready for generation."""
    run_dir = Path(run_dir)
    summary = read_run_summary(run_dir)
    model, tokenizer = load_causal_lm(ensure_base_model(summary["base_model"]))
    return lora.load_adapter(model, run_dir / "adapter").eval(), tokenizer


def load_predictor(run_dir: Path):
    raise ConfigError(
        f"{run_dir} is a causal-LM run: `lorakit predict` / `lorakit eval` are for classification "
        f'runs; use `lorakit generate {run_dir} "a prompt"` (lorakit.api.generate)'
    )


def dry_run(config: Config) -> str:
    """The trainable-parameter report, without training (loads the real model)."""
    model, _ = load_causal_lm(ensure_base_model(config.model.name))
    model = engines.apply_lora(model, config.lora, base_name=model.name_or_path)
    trainable, total = engines.parameter_counts(model)
    targets = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                      if isinstance(m, lora.LoraLayer)})  # fmt: skip
    return (f"{config.model.name}: LoRA on {', '.join(targets) or '(peft engine)'}; "
            f"trainable {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")  # fmt: skip
