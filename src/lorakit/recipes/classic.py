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

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import set_seed
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from lorakit.config import Config, LoraSection, TrainConfig, load_config
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
from lorakit.recipes import load_task_data, run_summary, write_reports
from lorakit.rundir import RunDir, read_run_summary
from lorakit.train import engines
from lorakit.train.loop import evaluate, train_loop
from lorakit.train.metrics import confusion_matrix

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
    train_config = config.train.model_copy(
        update={"epochs": section.epochs, "lr": section.lr, "batch_size": section.batch_size}
    )
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


def run(config: Config, run_dir: RunDir, resume: Path | None = None) -> dict[str, Any]:
    """Train and test; ``resume``: a checkpoint folder of this run to continue from."""
    # The model is tiny: one thread beats two, whose hand-offs cost more than the products
    # (15x faster on a busy 2-core machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(config, run_dir, resume)
    finally:
        torch.set_num_threads(threads)


def _run(config: Config, run_dir: RunDir, resume: Path | None) -> dict[str, Any]:
    started = time.monotonic()
    target = load_task_data(config)
    labels = target["train"].features["label"].names
    run_dir.start_environment(config.seed, dataset_fingerprint(target))
    facts: dict[str, Any] = {}
    if config.model.pretrained:
        base_dir = Path(config.model.pretrained)
        load_classic(base_dir)  # fails early on a folder that holds no model
    elif resume is not None:  # pretrained before the checkpoint: RUN_DIR/checkpoints/step-N
        base_dir = Path(resume).parent.parent / "base"
        facts = load_classic(base_dir)[2]["pretrain"]
    else:
        facts = pretrain(config, run_dir, target["train"]["text"])
        base_dir = run_dir / "base"

    model, vocab = transfer_model(base_dir, len(labels), config.lora, config.seed)
    trainable, total = engines.parameter_counts(model)
    print(f"transfer to {config.data.source}: {trainable:,} of {total:,} parameters trainable")
    encoded = _encode(target, vocab, config.data.max_length)
    loaders = _loaders(encoded, config.train, config.seed)
    result = train_loop(
        model, loaders["train"], loaders["validation"], config.train, run_dir=run_dir,
        seed=config.seed, desc=f"LoRA {config.data.source}",
        checkpoint_dir=run_dir / "checkpoints", resume=resume,
    )  # fmt: skip
    engines.save(model, run_dir.adapter_dir, str(base_dir))
    test = evaluate(model, loaders["test"])
    run_dir.log(
        "test", step=result.best_step, split="test", loss=test["loss"], accuracy=test["accuracy"]
    )

    reloaded, _ = transfer_model(base_dir, len(labels), None)
    reloaded = engines.load(reloaded, run_dir.adapter_dir, config.lora.engine)
    again = evaluate(reloaded, loaders["test"])
    identical = again["predictions"] == test["predictions"]
    print(
        f"test accuracy {test['accuracy']:.4f}; reloaded adapter {again['accuracy']:.4f} "
        f"({'identical' if identical else 'DIFFERENT'} predictions)",
        flush=True,
    )
    summary = {
        **run_summary(
            config,
            result,
            base_model="base" if base_dir == run_dir / "base" else str(base_dir.resolve()),
            trainable=trainable,
            total=total,
            adapter_bytes=engines.folder_bytes(run_dir.adapter_dir),
            base_model_bytes=(base_dir / "model.safetensors").stat().st_size,
        ),  # fmt: skip
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "labels": labels,
        "confusion_matrix": confusion_matrix(test["labels"], test["predictions"], len(labels)),
        "reload_test_accuracy": again["accuracy"],
        "reload_identical": identical,
        **facts,
    }
    if config.compare:
        rows = compare(config, base_dir, encoded, len(labels), run_dir)
        table = run_dir.write_comparison(rows, title=f"classic: transfer to {config.data.source}")
        print(table, flush=True)
    summary["total_seconds"] = round(time.monotonic() - started, 2)
    run_dir.write_summary(summary)
    run_dir.finish_environment()
    write_reports(run_dir.path)
    return summary


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

    def __init__(self, run_dir: Path):
        run_dir = Path(run_dir)
        config = load_config(run_dir / "config.toml")
        summary = read_run_summary(run_dir)
        self.labels: list[str] = summary["labels"]
        self.max_length = config.data.max_length
        base_dir = run_dir / summary["base_model"]  # "base" (in the run) or an absolute path
        base, self.vocab = transfer_model(base_dir, len(self.labels), None)
        self.model = engines.load(base, run_dir / "adapter", summary["engine"]).eval()

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


def load_predictor(run_dir: Path) -> ClassicPredictor:
    return ClassicPredictor(run_dir)


def dry_run(config: Config) -> str:
    """The trainable-parameter report of the transfer step, on a small stand-in vocabulary
    (the real one is built from the data when training starts)."""
    model = TextClassifier(1000, 50, 5, config.model.hidden)
    model.new_head(2)
    model = engines.apply_lora(model, config.lora)
    trainable, total = engines.parameter_counts(model)
    lines = [f"{name}: {tuple(p.shape)}" for name, p in model.named_parameters() if p.requires_grad]
    return (
        "transfer step (vocabulary of 1,000 words for the count; the real one is larger):\n  "
        + "\n  ".join(lines)
        + f"\ntrainable {trainable:,} of {total:,}"
    )
