"""Pipeline for the transformer recipes (`sentiment`, `topics`, the seeds): a BERT-like model plus
LoRA for text classification.

1. Load the data (a built-in name or a file) and the model with a fresh head for its labels.
2. Tokenize once (cached), batch by length with dynamic padding.
3. Add LoRA with the configured engine (`lorakit` or `peft`), train with lorakit's loop or the
   HF `Trainer`, keep the best adapter (validation accuracy).
4. Test; save the adapter (PEFT format, head included); reload it into a fresh base, with
   lorakit's engine and with PEFT's, and check that every test prediction is the same.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import DataCollatorWithPadding

from lorakit import lora
from lorakit.config import Config, ConfigError, load_config
from lorakit.data import dataset_fingerprint
from lorakit.data.tokenize import classification_loaders, tokenize_splits
from lorakit.models.transformer import load_sequence_classifier, weights_bytes
from lorakit.nn.frozen_base import set_model_dropout
from lorakit.recipes import load_task_data, run_summary, write_reports
from lorakit.rundir import RunDir, read_run_summary
from lorakit.train import engines
from lorakit.train.loop import evaluate, train_loop
from lorakit.train.metrics import confusion_matrix


def load_base(config: Config, labels: list[str]):
    """(model, tokenizer, resolved name) of ``model.name`` with a head for ``labels`` and
    ``model.dropout`` applied when set: the start of the LoRA run and of full fine-tuning
    (``benchmarks/full_finetune_sentiment.py``)."""
    model, tokenizer, resolved = load_sequence_classifier(config.model.name, labels, config.seed)
    # a longer input fails deep in the model's position embeddings (the tokenizer's
    # model_max_length is no limit: sentence-transformers set it below the model's)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and config.data.max_length > limit:
        raise ConfigError(
            f"data.max_length: {config.data.max_length} is more than the {limit} tokens "
            f"{resolved} takes; set data.max_length={limit} or less"
        )
    if config.model.dropout is not None:
        set_model_dropout(model, config.model.dropout)
    return model, tokenizer, resolved


def data_loaders(config: Config, data, tokenizer) -> dict:
    """The train / validation / test loaders of ``data`` as the recipe batches them."""
    train = config.train
    return classification_loaders(
        tokenize_splits(data, tokenizer, config.data.max_length), tokenizer,
        train.batch_size, train.eval_batch_size, config.seed, train.num_workers,
    )  # fmt: skip


def build_model(config: Config, labels: list[str]):
    model, tokenizer, resolved = load_base(config, labels)
    # task_type SEQ_CLS: both engines train and save the head (classifier or score) whole
    model = engines.apply_lora(model, config.lora, base_name=resolved, task_type="SEQ_CLS")
    return model, tokenizer, resolved


def reload_model(run_dir: Path, engine: str, labels: list[str], base: str, seed: int):
    """A fresh base with the run's adapter loaded by `engine` (`lorakit` or `peft`)."""
    model, tokenizer, _ = load_sequence_classifier(base, labels, seed)
    return engines.load(model, run_dir / "adapter", engine).eval(), tokenizer


def run(config: Config, run_dir: RunDir, resume: Path | None = None) -> dict[str, Any]:
    """Train and test; ``resume``: a checkpoint folder of this run to continue from."""
    started = time.monotonic()
    dsd = load_task_data(config)
    labels = dsd["train"].features["label"].names
    run_dir.start_environment(config.seed, dataset_fingerprint(dsd))
    model, tokenizer, resolved = build_model(config, labels)
    trainable, total = engines.parameter_counts(model)
    print(f"{config.recipe}: {resolved} + LoRA ({config.lora.engine}): "
          f"{trainable:,} of {total:,} parameters trainable ({100 * trainable / total:.3f}%)",
          flush=True)  # fmt: skip
    train = config.train
    loaders = data_loaders(config, dsd, tokenizer)
    if train.trainer == "hf":
        if resume is not None:
            raise ConfigError("--resume works with train.trainer = 'lorakit', not 'hf'")
        from lorakit.train.hf_trainer import train_with_hf_trainer

        result = train_with_hf_trainer(
            model, loaders["train"].dataset, loaders["validation"].dataset,
            loaders["train"].collate_fn, train, run_dir=run_dir,
            seed=config.seed, output_dir=str(run_dir / "hf_trainer"),
        )  # fmt: skip
    else:
        result = train_loop(
            model, loaders["train"], loaders["validation"], train, run_dir=run_dir,
            seed=config.seed, desc=f"{config.recipe}",
            checkpoint_dir=run_dir / "checkpoints", resume=resume,
        )  # fmt: skip
    model.eval()
    test = evaluate(model, loaders["test"])
    run_dir.log("test", step=result.best_step, epoch=None, split="test",
                loss=test["loss"], accuracy=test["accuracy"])  # fmt: skip
    adapter_bytes = engines.save(model, run_dir.adapter_dir, resolved)
    checks = reload_checks(run_dir, labels, resolved, config.seed, loaders["test"], test)
    summary = {
        **run_summary(
            config,
            result,
            base_model=resolved,
            trainable=trainable,
            total=total,
            adapter_bytes=adapter_bytes,
            base_model_bytes=weights_bytes(resolved),
        ),  # fmt: skip
        "trainer": train.trainer,
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "trainable_percent": round(100 * trainable / total, 4),
        "steps": result.steps,
        "labels": labels,
        "confusion_matrix": confusion_matrix(test["labels"], test["predictions"], len(labels)),
        **checks,
        "total_seconds": round(time.monotonic() - started, 2),
    }
    run_dir.write_summary(summary)
    run_dir.finish_environment()
    write_reports(run_dir.path)
    print(f"{config.recipe}: test accuracy {test['accuracy']:.4f} (best step {result.best_step}); "
          f"adapter {adapter_bytes:,} bytes in {run_dir.adapter_dir}", flush=True)  # fmt: skip
    return summary


def reload_checks(run_dir: RunDir, labels, base: str, seed: int, test_loader, test) -> dict:
    """Reload the saved adapter with both engines: the same prediction for every test example?"""
    checks = {}
    for engine in ("lorakit", "peft"):
        model, _ = reload_model(run_dir.path, engine, labels, base, seed)
        again = evaluate(model, test_loader)
        same = again["predictions"] == test["predictions"]
        checks[f"reload_{engine}_identical"] = same
        print(f"reloaded with {engine}: test accuracy {again['accuracy']:.4f} "
              f"({'identical' if same else 'DIFFERENT'} predictions)", flush=True)  # fmt: skip
    return checks


# ---------------------------------------------------------------- inference on a finished run
class TransformerPredictor:
    """Base model + the run's adapter, ready for texts."""

    def __init__(self, run_dir: Path):
        run_dir = Path(run_dir)
        config = load_config(run_dir / "config.toml")
        summary = read_run_summary(run_dir)
        self.labels: list[str] = summary["labels"]
        self.max_length = config.data.max_length
        self.batch_size = config.train.eval_batch_size
        self.model, self.tokenizer = reload_model(
            run_dir, "lorakit", self.labels, summary["base_model"], summary["seed"]
        )
        self.collator = DataCollatorWithPadding(self.tokenizer)

    @torch.no_grad()
    def predict_proba(self, texts: list[str]) -> np.ndarray:
        """Batches built as in training's evaluation (sorted by length, the same batch size and
        padding), so a test split gives bit-for-bit the accuracy the run recorded."""
        encoded = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)
        rows = [{k: encoded[k][i] for k in encoded} for i in range(len(texts))]
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
        probs = np.zeros((len(rows), len(self.labels)), dtype=np.float32)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            batch = self.collator([rows[i] for i in chunk])
            probs[chunk] = torch.softmax(self.model(**batch).logits.float(), dim=-1).numpy()
        return probs


def load_predictor(run_dir: Path) -> TransformerPredictor:
    return TransformerPredictor(run_dir)


def dry_run(config: Config) -> str:
    """The trainable-parameter report, without training (uses the real model)."""
    dsd = load_task_data(config)
    model, _, resolved = build_model(config, dsd["train"].features["label"].names)
    trainable, total = engines.parameter_counts(model)
    targets = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                      if isinstance(m, lora.LoraLayer)})  # fmt: skip
    return (f"{resolved}: LoRA on {', '.join(targets) or '(peft engine)'}; "
            f"trainable {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")  # fmt: skip
