"""Pipeline for the transformer recipes (`sentiment`, `topics`, the seeds): a BERT-like model plus
LoRA for text classification.

1. Load the data (a built-in name or a file) and the model with a fresh head for its labels.
2. Tokenize once (cached), batch by length with dynamic padding.
3. Add LoRA with the configured engine (`lorakit` or `peft`), train with lorakit's loop or the
   HF `Trainer`, keep the best adapter (validation accuracy).
4. Test; save the adapter (PEFT format, head included); reload it into a fresh base, with
   lorakit's engine and with PEFT's, and check that every test prediction is the same.
5. With ``compare = true``: LoRA, full fine-tuning and the head alone, each trained again from
   the same start on the same data, with the same selection rule (comparison.json / .md).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import set_seed
from safetensors.torch import save_file
from transformers import DataCollatorWithPadding

from lorakit.config import Config, ConfigError, DataConfig, TrainConfig
from lorakit.data.tokenize import classification_loaders, tokenize_splits
from lorakit.models.transformer import load_sequence_classifier, public_name, weights_bytes
from lorakit.nn.frozen_base import set_model_dropout
from lorakit.recipes.base import ClassificationRecipe, load_task_data, lora_report
from lorakit.rundir import RunDir
from lorakit.train import engines
from lorakit.train.loop import train_loop
from lorakit.train.metrics import evaluate
from lorakit.train.peak_memory import peak_rss_bytes, reset_peak_memory, resident_bytes
from lorakit.train.probe import LinearProbe, classification_head, head_inputs

COMPARED_METHODS = ("lora", "full fine-tuning", "head only")
# The compared methods' lr, relative to LoRA's, as MiniLM on rotten-tomatoes picked them by
# validation accuracy: full fine-tuning does best at 5e-5 where LoRA takes 1e-3
# (benchmarks/full_finetune_sentiment.py); the head alone, on the encoder's pooled output, needs
# a far larger step (one epoch of 4,000 reviews: val 0.632 at 1e-2, 0.669 at 3e-2, 0.680 at 1e-1).
FULL_LR_FRACTION = 0.05
HEAD_LR_FACTOR = 100


def load_base(config: Config, labels: list[str]):
    """(model, tokenizer, resolved name) of ``model.name`` with a head for ``labels`` and
    ``model.dropout`` applied when set: the start of the LoRA run and of full fine-tuning
    (``benchmarks/full_finetune_sentiment.py``)."""
    model, tokenizer, resolved = load_sequence_classifier(config.model.name, labels, config.seed)
    check_max_length(config.data.max_length, model, resolved)
    if config.model.dropout is not None:
        set_model_dropout(model, config.model.dropout)
    return model, tokenizer, resolved


def check_max_length(max_length, model, name: str) -> None:
    """A ConfigError unless ``max_length`` tokens fit the model: checked when a run starts and
    when a finished run is loaded back (``lorakit predict``, ``eval``, ``serve``), whose
    config.toml may have been edited since."""
    # a longer input fails deep in the model's position embeddings (the tokenizer's
    # model_max_length is no limit: sentence-transformers set it below the model's)
    limit = getattr(model.config, "max_position_embeddings", None)
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
        raise ConfigError(f"data.max_length: {max_length!r} is not a number of tokens (e.g. 128)")
    if limit and max_length > limit:
        raise ConfigError(
            f"data.max_length: {max_length} is more than the {limit} tokens {name} takes; set "
            f"data.max_length={limit} or less"
        )


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


class SequenceClassification(ClassificationRecipe):
    """A transformers encoder with a fresh head for the data's labels, plus LoRA."""

    hf_trainer = True
    other: dict[str, Any] | None = None  # compare with data.forgetting_on: the probe and its data

    def build_model(self, run_dir: RunDir, resume: Path | None):
        model, self.tokenizer, self.base_path = build_model(self.config, self.labels)
        self.base_name = public_name(self.base_path)  # the packaged MiniLM: its hub id
        return model

    def trainable_line(self, trainable: int, total: int) -> str:
        return (f"{self.config.run_name}: {self.base_name} + LoRA ({self.config.lora.engine}): "
                f"{trainable:,} of {total:,} parameters trainable "
                f"({100 * trainable / total:.3f}%)")  # fmt: skip

    def loaders(self) -> dict:
        return data_loaders(self.config, self.data, self.tokenizer)

    def reload_checks(self, model, loaders: dict, run_dir: RunDir, test) -> dict[str, Any]:
        """Reload the saved adapter with both engines: the same prediction for every test
        example?"""
        checks = {}
        for engine in ("lorakit", "peft"):
            again = evaluate(self.load_adapted(run_dir.path, engine)[0], loaders["test"])
            same = again["predictions"] == test["predictions"]
            checks[f"reload_{engine}_identical"] = same
            print(f"reloaded with {engine}: test accuracy {again['accuracy']:.4f} "
                  f"({'identical' if same else 'DIFFERENT'} predictions)", flush=True)  # fmt: skip
        return checks

    def summary_base(self, run_dir: RunDir) -> tuple[str, int | None]:
        return self.base_name, weights_bytes(self.base_path)

    def summary_figures(self, result, test, checks, counts) -> dict[str, Any]:
        trainable, total = counts
        return {
            "trainer": self.config.train.trainer,
            "base_model_path": self.base_path,
            "test_accuracy": test["accuracy"],
            "test_loss": test["loss"],
            "trainable_percent": round(100 * trainable / total, 4),
            "steps": result.steps,
            **self.class_figures(test),
            **checks,
        }

    def compare(self, run_dir: RunDir, summary: dict[str, Any]) -> None:
        self.other = self.forgetting_probe()
        rows = [self.compared(method) for method in COMPARED_METHODS]
        title = f"{self.config.run_name}: LoRA, full fine-tuning and the head alone"
        print(run_dir.write_comparison(rows, title=title), flush=True)
        if self.other is not None:
            summary["forgetting_on"] = self.config.data.forgetting_on
            summary["base_other_probe_accuracy"] = self.other["base_accuracy"]

    def forgetting_probe(self) -> dict[str, Any] | None:
        """With ``data.forgetting_on``: that data's test loader, and a linear probe fitted on
        the base encoder's features of its training split (`lorakit.train.probe`)."""
        source = self.config.data.forgetting_on
        if source is None:
            return None
        other = self.config.data.reading(source, max_train_samples=None, forgetting_on=None)
        config = self.config.model_copy(update={"data": other})
        data = load_task_data(config)
        classes = data["train"].features["label"].num_classes
        loaders = data_loaders(config, data, self.tokenizer)
        base, _, _ = load_base(self.config, self.labels)
        probe = LinearProbe.fit(*head_inputs(base, loaders["train"]), classes, self.config.seed)
        accuracy = probe.accuracy(*head_inputs(base, loaders["test"]))
        print(f"{self.config.run_name}: a linear probe on the base reads {source} at test "
              f"accuracy {accuracy:.4f}", flush=True)  # fmt: skip
        return {"test": loaders["test"], "probe": probe, "base_accuracy": accuracy}

    def compared(self, method: str) -> dict[str, Any]:
        """Train ``method`` from the fresh base on the run's data; one comparison row: quality,
        seconds per step, the resident memory that building, training and testing it added at
        its peak, and the bytes one would ship (the adapter, the head, or every weight)."""
        config = self.config
        reset_peak_memory()  # after the previous row's model is gone
        held = resident_bytes()
        set_seed(config.seed)  # the LoRA row starts as the run did: the same head and A
        if method == "lora":
            model, _, _ = build_model(config, self.labels)
            train = config.train
        else:
            model, _, _ = load_base(config, self.labels)
            model.requires_grad_(method == "full fine-tuning")
            classification_head(model).requires_grad_(True)
            full = method == "full fine-tuning"
            lr = config.train.lr * (FULL_LR_FRACTION if full else HEAD_LR_FACTOR)
            train = config.train.model_copy(update={"lr": lr})
        loaders = self.loaders()
        result = train_loop(
            model, loaders["train"], loaders["validation"], train.model_copy(
                update={"checkpoint_every": 0}), seed=config.seed, desc=method,
            show_progress=False,
        )  # fmt: skip
        test = evaluate(model.eval(), loaders["test"])
        added = peak_rss_bytes() - held if held is not None else None
        trainable, total = engines.parameter_counts(model)
        with tempfile.TemporaryDirectory() as folder:
            if method == "lora":
                engines.save(model, folder, self.base_name, base_path=self.base_path)
            else:  # no adapter: the trained tensors themselves are what one would ship
                state = {n: p.detach().contiguous() for n, p in model.named_parameters()
                         if p.requires_grad}  # fmt: skip
                save_file(state, str(Path(folder) / "model.safetensors"))
            checkpoint = engines.folder_bytes(folder)
        print(f"compare {method}: test accuracy {test['accuracy']:.4f}", flush=True)
        other = {}
        if self.other is not None:  # after the peak: the probe is not the method's cost
            probe = self.other["probe"]
            other["other_probe_accuracy"] = probe.accuracy(*head_inputs(model, self.other["test"]))
        return {
            "method": f"LoRA r={config.lora.r}" if method == "lora" else method,
            "lr": train.lr,
            "trainable_params": trainable,
            "trainable_percent": round(100 * trainable / total, 4),
            "checkpoint_bytes": checkpoint,
            "best_step": result.best_step,
            "val_accuracy": result.best_metrics["accuracy"],
            "test_accuracy": test["accuracy"],
            "step_seconds": result.train_seconds / max(result.steps, 1),
            "added_peak_rss_bytes": added,
            **other,
        }

    def closing_line(self, summary: dict[str, Any], run_dir: RunDir) -> str:
        return (f"{self.config.run_name}: test accuracy {summary['test_accuracy']:.4f} (best step "
                f"{summary['best_step']}); adapter {summary['adapter_bytes']:,} bytes in "
                f"{run_dir.adapter_dir}")  # fmt: skip

    def trainable_report(self) -> str:
        """Uses the real model (and the data, for the labels)."""
        self.load_data()
        model, _, resolved = build_model(self.config, self.labels)
        return lora_report(resolved, model)

    # ------------------------------------------------------------ a finished run
    def reload_base(self):
        model, tokenizer, resolved = load_sequence_classifier(
            self.base_name, self.labels, self.config.seed
        )
        check_max_length(self.config.data.max_length, model, resolved)
        return model, tokenizer

    @staticmethod
    def serving_base(name: str):
        """(model, tokenizer, resolved name) that `lorakit serve` loads this recipe's adapters
        onto, several at once: its head is for two placeholder labels, each adapter brings its
        own head."""
        return load_sequence_classifier(name, ["LABEL_0", "LABEL_1"])

    def predictor(self, run_dir: Path) -> TransformerPredictor:
        model, tokenizer = self.load_adapted(run_dir)
        settings = self.config.data.max_length, self.config.train.eval_batch_size
        return TransformerPredictor(model, tokenizer, self.labels, *settings)

    @classmethod
    def merged_predictor(cls, folder: Path, record: dict[str, Any]) -> TransformerPredictor:
        saved = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        labels = [saved["id2label"][str(i)] for i in range(len(saved["id2label"]))]
        model, tokenizer, _ = load_sequence_classifier(str(folder), labels)
        data = DataConfig.model_validate(record.get("data", {}))
        batch_size = record.get("eval_batch_size") or TrainConfig().eval_batch_size
        return TransformerPredictor(model.eval(), tokenizer, labels, data.max_length, batch_size)


# ---------------------------------------------------------------- inference on a finished run
class TransformerPredictor:
    """Base model + the run's adapter, ready for texts."""

    def __init__(self, model, tokenizer, labels: list[str], max_length: int, batch_size: int):
        self.model, self.tokenizer, self.labels = model, tokenizer, labels
        self.max_length, self.batch_size = max_length, batch_size
        self.collator = DataCollatorWithPadding(tokenizer)

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


RECIPE = SequenceClassification
