"""Recipe ``classic``: LoRA at its smallest, where every parameter can be counted.

1. Pretrain the GloVe classifier on news topics (``pretrain.data``), every layer trained;
   saved as the base model in ``RUN_DIR/base/``.
2. Transfer to sentiment (``data``): the base frozen, a new head ``fc2`` (``modules_to_save``)
   and LoRA on ``lora.target_modules``; the best epoch's adapter kept in ``RUN_DIR/adapter/``.
3. Test, then reload the adapter into a fresh copy of the base: the same prediction for every
   test example (``reload_identical`` in summary.json).
4. With ``compare = true``: a table of other settings on the same split (comparison.md).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import set_seed
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from lorakit.config import Config, DataConfig, LoraSection, TrainConfig
from lorakit.data import dataset_fingerprint, load_dataset
from lorakit.models.classic import (
    TextClassifier,
    Vocabulary,
    build_vocabulary,
    collate,
    encode_split,
    load_classic,
    save_classic,
)
from lorakit.recipes.base import ClassificationRecipe, plan_of
from lorakit.rundir import RunDir
from lorakit.train import engines
from lorakit.train.loop import train_loop
from lorakit.train.metrics import evaluate

# The seed's setup: rank 2 on fc1 (alpha picked on the validation split from 2, 8, 16).
SEED_SETUP = {"r": 2, "lora_alpha": 8, "target_modules": ["fc1"]}


def _encode(dsd, vocab: Vocabulary, max_length: int) -> dict:
    """Token ids of every split, computed once."""
    return {
        name: encode_split(split, vocab, max_length).select_columns(["input_ids", "label"])
        for name, split in dsd.items()
    }


def _loaders(encoded: dict, train: TrainConfig, seed: int) -> dict[str, DataLoader]:
    """Fresh loaders for one training; the shuffle order depends on ``seed`` alone."""
    return {
        name: DataLoader(
            split,
            batch_size=train.batch_size if name == "train" else train.eval_batch_size,
            shuffle=name == "train",
            generator=torch.Generator().manual_seed(seed) if name == "train" else None,
            collate_fn=collate,
            num_workers=train.num_workers,
        )
        for name, split in encoded.items()
    }


def pretrain_settings(config: Config) -> TrainConfig:
    """The loop's settings for pretraining: ``train``'s, with ``pretrain``'s epochs, lr, batch."""
    section = config.pretrain
    return config.train.model_copy(
        update={"epochs": section.epochs, "lr": section.lr, "batch_size": section.batch_size}
    )


def pretrain(config: Config, run_dir: RunDir, target_train_texts: list[str]) -> dict[str, Any]:
    """Train the base model on ``pretrain.data`` with every layer trainable; save it."""
    section = config.pretrain
    news = load_dataset(section.data)
    vocab, vectors = build_vocabulary(
        [*news["train"]["text"], *target_train_texts], config.model.embeddings
    )
    labels = news["train"].features["label"].names
    set_seed(config.seed)
    model = TextClassifier(len(vocab), vectors.shape[1], len(labels), config.model.hidden)
    with torch.no_grad():
        model.embedding.weight.copy_(vectors)
    train_config = pretrain_settings(config)
    loaders = _loaders(_encode(news, vocab, section.max_length), train_config, config.seed)
    result = train_loop(
        model, loaders["train"], loaders["validation"], train_config,
        seed=config.seed, desc=f"pretrain {section.data}",
    )  # fmt: skip
    test = evaluate(model, loaders["test"])
    facts = {
        "pretrain_dataset": section.data,
        "pretrain_test_accuracy": test["accuracy"],
        "pretrain_seconds": result.train_seconds,
        "pretrain_fingerprint": dataset_fingerprint(news),
    }
    save_classic(
        model, vocab, run_dir / "base", labels=labels, dataset=section.data,
        embeddings=config.model.embeddings, test_accuracy=test["accuracy"],
        pretrain=facts,  # read back by a resumed run, which does not pretrain again
    )  # fmt: skip
    print(f"pretrain {section.data}: test accuracy {test['accuracy']:.4f}", flush=True)
    return facts


def transfer_model(base_dir: Path, num_classes: int, section: LoraSection | None, seed: int = 0):
    """A fresh copy of the base with a new head, and LoRA when ``section`` is given."""
    model, vocab, _ = load_classic(base_dir)
    set_seed(seed)
    model.new_head(num_classes)
    if section is not None:
        model = engines.apply_lora(model, section, base_name=str(base_dir))
    return model, vocab


class Classic(ClassificationRecipe):
    """The GloVe classifier pretrained on news, transferred to sentiment with LoRA."""

    def build_model(self, run_dir: RunDir, resume: Path | None):
        """Pretrain the base (unless ``model.pretrained`` names one, or a resumed run has it
        already), then a fresh copy of it with a new head and LoRA."""
        config = self.config
        self.pretrain_facts: dict[str, Any] = {}
        if config.model.pretrained:
            self.base_dir = Path(config.model.pretrained)
            load_classic(self.base_dir)  # fails early on a folder that holds no model
        elif resume is not None:  # pretrained before the checkpoint: RUN_DIR/checkpoints/step-N
            self.base_dir = Path(resume).parent.parent / "base"
            self.pretrain_facts = load_classic(self.base_dir)[2]["pretrain"]
        else:
            self.pretrain_facts = pretrain(config, run_dir, self.data["train"]["text"])
            self.base_dir = run_dir / "base"
        self.base_name = str(self.base_dir)
        model, vocab = transfer_model(self.base_dir, len(self.labels), config.lora, config.seed)
        self.encoded = _encode(self.data, vocab, config.data.max_length)
        return model

    def restart_note(self, run_dir: Path) -> str:
        base = run_dir / "base"
        if self.config.model.pretrained or not (base / "vocab.txt").is_file():  # written last
            return ""
        return (
            f"; --force pretrains the base again: to reuse the one in {base}, train into a new "
            f"folder with `--out NEW --set model.pretrained={base}` instead"
        )

    def trainable_line(self, trainable: int, total: int) -> str:
        data = self.config.data.name
        return f"transfer to {data}: {trainable:,} of {total:,} parameters trainable"

    def loaders(self) -> dict[str, DataLoader]:
        return _loaders(self.encoded, self.config.train, self.config.seed)

    def loop_options(self) -> dict[str, Any]:
        return {"desc": f"LoRA {self.config.data.name}"}

    def reload_checks(self, model, loaders: dict, run_dir: RunDir, test) -> dict[str, Any]:
        """Reload the adapter with the run's engine: the same prediction for every example?"""
        reloaded, _ = self.load_adapted(run_dir.path, self.config.lora.engine)
        again = evaluate(reloaded, loaders["test"])
        identical = again["predictions"] == test["predictions"]
        print(
            f"test accuracy {test['accuracy']:.4f}; reloaded adapter {again['accuracy']:.4f} "
            f"({'identical' if identical else 'DIFFERENT'} predictions)",
            flush=True,
        )
        return {"reload_test_accuracy": again["accuracy"], "reload_identical": identical}

    def summary_base(self, run_dir: RunDir) -> tuple[str, int | None]:
        """The base folder relative to the run when it is the run's own (``base``) or beside
        it (a sweep's ``../shared-base``), so that the folder holding both can move; else its
        absolute path."""
        base, run = self.base_dir.resolve(), run_dir.path.resolve()
        name = os.path.relpath(base, run) if base.parent in (run, run.parent) else str(base)
        return name, (self.base_dir / "model.safetensors").stat().st_size

    def summary_figures(self, result, test, checks, counts) -> dict[str, Any]:
        return {
            "test_accuracy": test["accuracy"],
            "test_loss": test["loss"],
            **self.class_figures(test),
            **checks,
            **self.pretrain_facts,
        }

    def compare(self, run_dir: RunDir, summary: dict[str, Any]) -> None:
        rows = compare(self.config, self.base_dir, self.encoded, len(self.labels), run_dir)
        title = f"{self.config.run_name}: transfer to {self.config.data.name}"
        print(run_dir.write_comparison(rows, title=title), flush=True)

    @classmethod
    def run(cls, config: Config, run_dir: RunDir, resume: Path | None = None) -> dict[str, Any]:
        # The model is tiny: one thread beats two, whose hand-offs cost more than the products
        # (15x faster on a busy 2-core machine).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return super().run(config, run_dir, resume)
        finally:
            torch.set_num_threads(threads)

    def trainable_report(self) -> str:
        """The transfer step's, on a small stand-in vocabulary (the real one is built from the
        data when training starts)."""
        model = TextClassifier(1000, 50, 5, self.config.model.hidden)
        model.new_head(2)
        model = engines.apply_lora(model, self.config.lora)
        trainable, total = engines.parameter_counts(model)
        lines = [f"{n}: {tuple(p.shape)}" for n, p in model.named_parameters() if p.requires_grad]
        return (
            "transfer step (vocabulary of 1,000 words for the count; the real one is larger):\n  "
            + "\n  ".join(lines)
            + f"\ntrainable {trainable:,} of {total:,}"
        )

    def plan(self) -> dict[str, Any]:
        """The transfer step's plan, with the pretraining's (``pretrain``) unless
        ``model.pretrained`` names a base."""
        plan = super().plan()
        if not self.config.model.pretrained:
            news = load_dataset(self.config.pretrain.data)
            sizes = {name: len(split) for name, split in news.items()}
            plan["pretrain"] = plan_of(sizes, pretrain_settings(self.config))
        return plan

    # ------------------------------------------------------------ a finished run
    def recall(self, run_dir: Path, summary: dict[str, Any]) -> None:
        super().recall(run_dir, summary)
        self.base_dir = run_dir / summary["base_model"]  # "base" (in the run) or an absolute path

    def reload_base(self):
        """(the base with an untrained head for the run's labels, its vocabulary)."""
        return transfer_model(self.base_dir, len(self.labels), None)

    def predictor(self, run_dir: Path) -> ClassicPredictor:
        model, vocab = self.load_adapted(run_dir, self.config.lora.engine)
        return ClassicPredictor(model, vocab, self.labels, self.config.data.max_length)

    @classmethod
    def merged_predictor(cls, folder: Path, record: dict[str, Any]) -> ClassicPredictor:
        model, vocab, saved = load_classic(folder)
        data = DataConfig.model_validate(record.get("data", {}))
        return ClassicPredictor(model.eval(), vocab, saved["labels"], data.max_length)


def _variants(config: Config) -> dict[str, LoraSection | str]:
    lora = config.lora
    seed = lora.model_copy(update=SEED_SETUP)
    both = lora.model_copy(update={"target_modules": ["embedding", "fc1"]})
    variants: dict[str, LoraSection | str] = {"default: " + _describe_lora(lora): lora}
    for label, section in (("seed", seed), ("embedding + fc1", both)):
        if section != lora:
            variants[f"{label}: {_describe_lora(section)}"] = section
    variants.update({"head only": "head", "full fine-tuning": "full"})
    return variants


def _describe_lora(section: LoraSection) -> str:
    targets = section.target_modules
    names = "+".join(targets) if isinstance(targets, list) else str(targets)
    return f"LoRA r={section.r} alpha={section.lora_alpha:g} on {names} + head"


def compare(
    config: Config, base_dir: Path, encoded: dict, classes: int, run_dir: RunDir
) -> list[dict]:
    """Train each setting from the same base on the same split; one row each."""
    rows = []
    for name, setting in _variants(config).items():
        loaders = _loaders(encoded, config.train, config.seed)
        folder = run_dir / "comparison" / name.split(":")[0].replace(" ", "-").replace("+", "")
        section = setting if isinstance(setting, LoraSection) else None
        model, _ = transfer_model(base_dir, classes, section, config.seed)
        if setting == "full":
            model.requires_grad_(True)
        elif setting == "head":
            model.requires_grad_(False)
            model.fc2.requires_grad_(True)
        result = train_loop(
            model, loaders["train"], loaders["validation"], config.train,
            seed=config.seed, show_progress=False,
        )  # fmt: skip
        test = evaluate(model, loaders["test"])
        trainable, total = engines.parameter_counts(model)
        if section is not None:
            size = engines.save(model, folder, str(base_dir))
        else:  # no adapter: the trained tensors themselves are what one would ship
            folder.mkdir(parents=True, exist_ok=True)
            state = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
            save_file(state, str(folder / "weights.safetensors"))
            size = engines.folder_bytes(folder)
        rows.append({
            "setting": name,
            "trainable_params": trainable,
            "trainable_percent": round(100 * trainable / total, 3),
            "adapter_bytes": size,
            "val_accuracy": result.best_metrics["accuracy"],
            "test_accuracy": test["accuracy"],
        })  # fmt: skip
        print(f"compare {name}: test accuracy {test['accuracy']:.4f}", flush=True)
    return rows


# ---------------------------------------------------------------- inference on a finished run


class ClassicPredictor:
    """The run's base model with its adapter, ready for texts."""

    def __init__(self, model, vocab: Vocabulary, labels: list[str], max_length: int):
        self.model, self.vocab, self.labels = model, vocab, labels
        self.max_length = max_length

    @torch.no_grad()
    def predict_proba(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        out = []
        for start in range(0, len(texts), batch_size):
            rows = [
                {"input_ids": self.vocab.encode(t, self.max_length)}
                for t in texts[start : start + batch_size]
            ]
            logits = self.model(**collate(rows)).logits
            out.append(torch.softmax(logits.float(), dim=-1).numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.labels)))


RECIPE = Classic
