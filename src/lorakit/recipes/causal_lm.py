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
from pathlib import Path
from typing import Any

import datasets
import torch
from torch.utils.data import DataLoader

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
from lorakit.models.transformer import public_name, weights_bytes
from lorakit.nn.frozen_base import set_model_dropout
from lorakit.recipes.base import Recipe, lora_report
from lorakit.recipes.pretrain_tiny_gpt2 import ensure_base_model
from lorakit.rundir import RunDir
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


class CausalLM(Recipe):
    """A GPT-2-like causal LM plus LoRA, measured by test perplexity (and verdict accuracy)."""

    def load_data(self) -> str:
        """Loads the base model first: the data is tokenized with its tokenizer."""
        config = self.config
        self.base, self.tokenizer = _model_to_train(config)
        self.base_path = self.base.name_or_path  # the folder the weights came from
        self.base_name = public_name(self.base_path)  # a hub cache folder: its hub id
        self.positions = _positions(self.base)
        self.data = build_data(config, self.tokenizer, self.positions)
        select_by = causal_section(config).select_by
        if select_by == "verdict_accuracy" and not _has_verdicts(self.data["val_pairs"]):
            raise ConfigError(
                "causal.select_by: 'verdict_accuracy' needs verdict data (causal.mode = "
                "'instruction' on the built-in rotten-tomatoes verdicts); set causal.select_by = "
                "'perplexity'"
            )
        return self.data["fingerprint"]

    def build_model(self, run_dir: RunDir, resume: Path | None):
        """Measures the base model on the test split, then adds LoRA to it."""
        config, model = self.config, self.base
        eval_bs = config.train.eval_batch_size
        self.base_ppl = perplexity(model, self.data["splits"]["test"], eval_bs)
        self.base_verdicts = _verdicts(model, self.tokenizer, self.data["test_pairs"], eval_bs)
        print(f"{config.run_name}: base model {self.base_name}: test perplexity "
              f"{self.base_ppl:.2f}", flush=True)  # fmt: skip
        torch.manual_seed(config.seed)  # LoRA's A matrices start random: from the run's seed
        return engines.apply_lora(
            model, config.lora, base_name=self.base_name, task_type="CAUSAL_LM"
        )

    def trainable_line(self, trainable: int, total: int) -> str:
        return (f"{self.config.run_name}: LoRA ({self.config.lora.engine}): {trainable:,} of "
                f"{total:,} parameters trainable ({100 * trainable / total:.3f}%)")  # fmt: skip

    def loaders(self) -> dict[str, DataLoader]:
        return _loaders(self.data["splits"], self.config)

    def loop_options(self) -> dict[str, Any]:
        eval_bs = self.config.train.eval_batch_size
        return {
            "desc": self.config.run_name,
            "metric": causal_section(self.config).select_by,
            "evaluate_fn": validation_figures(self.data, self.tokenizer, self.positions, eval_bs),
        }

    def test(self, model, loaders: dict) -> dict[str, Any]:
        eval_bs = self.config.train.eval_batch_size
        test_ppl = perplexity(model, self.data["splits"]["test"], eval_bs)
        figures = {"loss": math.log(test_ppl), "perplexity": test_ppl}
        verdicts = _verdicts(model, self.tokenizer, self.data["test_pairs"], eval_bs)
        if verdicts is not None:
            figures["verdict_accuracy"] = verdicts
        return figures

    @torch.no_grad()
    def reload_checks(self, model, loaders: dict, run_dir: RunDir, test) -> dict[str, Any]:
        """Load the saved adapter into a fresh base with each engine: the same logits as
        trained?"""
        split = self.data["splits"]["test"]
        batch = split.select(range(min(8, split.num_rows)))[:]
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        reference = model(**inputs).logits
        checks: dict[str, Any] = {}
        for engine in ("lorakit", "peft"):
            reloaded, _ = self.load_adapted(run_dir.path, engine)
            diff = float((reloaded(**inputs).logits - reference).abs().max())
            checks[f"reload_{engine}_identical"] = diff <= RELOAD_TOLERANCE
            checks[f"reload_{engine}_max_abs_diff"] = diff
        return checks

    def summary_base(self, run_dir: RunDir) -> tuple[str, int | None]:
        # the name load_causal_lm (and lorakit merge) resolves
        return self.config.model.name, weights_bytes(self.base_path) or None

    def summary_figures(self, result, test, checks, counts) -> dict[str, Any]:
        trainable, total = counts
        figures = {
            "task": "causal-lm",
            "mode": causal_section(self.config).mode,
            "base_model_path": self.base_path,
            "trainer": "lorakit",
            "test_perplexity": test["perplexity"],
            "base_test_perplexity": self.base_ppl,
            "perplexity_ratio": test["perplexity"] / self.base_ppl,
            "test_loss": math.log(test["perplexity"]),
            "trainable_percent": round(100 * trainable / total, 4),
            "steps": result.steps,
            "test_tokens": _target_tokens(self.data["splits"]["test"]),
            **checks,
        }
        if "verdict_accuracy" in test:
            figures["test_verdict_accuracy"] = test["verdict_accuracy"]
            figures["base_test_verdict_accuracy"] = self.base_verdicts
            figures["test_majority_accuracy"] = _majority(self.data["test_pairs"])
        return figures

    def compare(self, run_dir: RunDir, summary: dict[str, Any]) -> None:
        config = self.config
        rows = comparison_rows(
            config, self.data["splits"], summary, self.data["test_pairs"], self.tokenizer
        )
        run_dir.write_comparison(rows, title=f"{config.run_name}: LoRA vs full fine-tuning")
        summary["full_ft_test_perplexity"] = rows[-1]["test_perplexity"]

    def closing_line(self, summary: dict[str, Any], run_dir: RunDir) -> str:
        verdicts = summary.get("test_verdict_accuracy")
        extra = "" if verdicts is None else f", verdict accuracy {verdicts:.4f}"
        return (f"{self.config.run_name}: test perplexity {summary['base_test_perplexity']:.2f} -> "
                f"{summary['test_perplexity']:.2f}{extra} (best step {summary['best_step']}); "
                f"adapter in {run_dir.adapter_dir}")  # fmt: skip

    def split_sizes(self) -> dict[str, int]:
        """Training examples: token blocks (packing) or one row a text."""
        return {name: len(self.data["splits"][name]) for name in SPLITS}

    def trainable_report(self) -> str:
        """Loads the real model."""
        model, _ = load_causal_lm(ensure_base_model(self.config.model.name))
        model = engines.apply_lora(model, self.config.lora, base_name=model.name_or_path)
        return lora_report(self.config.model.name, model)

    # ------------------------------------------------------------ a finished run
    def reload_base(self):
        # what summary.json's base_model names
        return load_causal_lm(ensure_base_model(self.config.model.name))

    def predictor(self, run_dir: Path):
        raise ConfigError(
            f"{run_dir} is a causal-LM run: `lorakit predict` / `lorakit eval` are for "
            f'classification runs; use `lorakit generate {run_dir} "a prompt"` '
            "(lorakit.api.generate)"
        )


def _target_tokens(split: datasets.Dataset) -> int:
    return int((split[:]["labels"][:, 1:] != -100).sum())


def _majority(pairs: datasets.Dataset) -> float:
    choices = pairs["choice"]
    return max(choices.count(c) for c in set(choices)) / len(choices)


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
        f"{config.run_name}: full fine-tuning for the comparison (lr {full_train.lr:g})", flush=True
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
    return CausalLM.of_run(run_dir).load_adapted(run_dir)


RECIPE = CausalLM
