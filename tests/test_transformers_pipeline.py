"""The transformers pipeline on a tiny BERT built from a config, and once on MiniLM."""

import json
import shutil

import peft
import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
)

from lorakit import api
from lorakit.config import load_config
from lorakit.models.transformer import (
    MINILM_HUB_ID,
    load_sequence_classifier,
    minilm_path,
    resolve_model,
)
from lorakit.network import OfflineError
from lorakit.recipes import recipe_path
from lorakit.recipes import sequence_classification as pipeline
from lorakit.recipes.base import load_task_data
from lorakit.rundir import RunDir


def run_recipe(tmp_path, overrides, recipe="sentiment"):
    config = load_config(recipe_path(recipe), overrides)
    run_dir = RunDir(tmp_path / "run")
    run_dir.write_config(config)
    return pipeline.RECIPE.run(config, run_dir), run_dir.path


@pytest.mark.parametrize("engine", ["lorakit", "peft"])
def test_csv_with_string_labels_trains_with_no_code(tmp_path, tiny_bert_dir, stars_csv, engine):
    summary, run = run_recipe(tmp_path, [
        f"data.path={stars_csv}", "data.text_column=review", "data.label_column=stars",
        f"model.name={tiny_bert_dir}", f"lora.engine={engine}", "lora.target_modules=query,value",
        "train.epochs=2", "train.batch_size=32", "train.lr=5e-3",
    ])  # fmt: skip
    assert summary["labels"] == ["bad", "great", "okay"]
    assert summary["engine"] == engine
    # (a random tiny BERT learns little in two epochs: learning is checked on MiniLM below)
    assert summary["reload_lorakit_identical"] and summary["reload_peft_identical"]
    assert summary["trainable_params"] < summary["total_params"]
    assert sum(map(sum, summary["confusion_matrix"])) == 48  # every test row, counted once
    assert summary["base_model"] == summary["base_model_path"] == str(tiny_bert_dir.resolve())
    labels = json.loads((run / "adapter" / "labels.json").read_text())
    assert labels["id2label"] == {"0": "bad", "1": "great", "2": "okay"}
    for name in ("config.toml", "environment.json", "metrics.jsonl", "summary.json",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors"):  # fmt: skip
        assert (run / name).is_file(), name
    events = [
        json.loads(line)["event"] for line in (run / "metrics.jsonl").read_text().splitlines()
    ]
    assert {"eval", "epoch", "test"} <= set(events)

    # `lorakit eval` reloads base + adapter and reproduces the recorded accuracy exactly
    assert api.evaluate(run)["accuracy"] == summary["test_accuracy"]

    # the adapter loads in plain PEFT on the base and predicts the same
    predictor = pipeline.RECIPE.load_predictor(run)
    texts = ["wonderful superb film", "dull tedious plot", "average passable scenes"]
    ours = predictor.predict_proba(texts)
    torch.manual_seed(summary["seed"])
    base = AutoModelForSequenceClassification.from_pretrained(
        tiny_bert_dir, num_labels=3, ignore_mismatched_sizes=True
    )
    theirs = peft.PeftModel.from_pretrained(base, run / "adapter").eval()
    batch = predictor.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        probs = torch.softmax(theirs(**batch).logits, -1).numpy()
    assert abs(probs - ours).max() < 1e-5


def test_hf_trainer_writes_the_same_run_directory(tmp_path, tiny_bert_dir, stars_csv):
    summary, run = run_recipe(tmp_path, [
        f"data.path={stars_csv}", "data.text_column=review", "data.label_column=stars",
        f"model.name={tiny_bert_dir}", "train.trainer=hf", "train.epochs=2",
        "train.lr=5e-3", "lora.target_modules=query,value",
    ])  # fmt: skip
    assert summary["trainer"] == "hf"
    assert summary["best_step"] > 0 and summary["reload_lorakit_identical"]
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == [1.0, 2.0]
    assert all("accuracy" in e for e in events if e["event"] == "eval")


def test_hub_id_without_network_fails_fast_naming_the_default(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OfflineError, match="model.name='minilm'"):
        resolve_model("distilbert-base-uncased")


DAMAGES = {
    "config.json": lambda folder: (folder / "config.json").write_text("{"),
    "model type": lambda folder: (folder / "config.json").write_text('{"model_type": "nosuch"}'),
    "no weights": lambda folder: (folder / "model.safetensors").unlink(),
    "cut weights": lambda folder: (folder / "model.safetensors").write_bytes(b"\x10\x00"),
    "tokenizer": lambda folder: (folder / "tokenizer.json").write_text("{"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_model_folder_is_one_error_naming_it(tiny_bert_dir, tmp_path, damage):
    from lorakit.inspect import inspect
    from lorakit.models import ModelError

    folder = tmp_path / "model"
    shutil.copytree(tiny_bert_dir, folder)
    DAMAGES[damage](folder)
    with pytest.raises(ModelError, match=f"cannot load the model in {folder}"):
        load_sequence_classifier(str(folder), ["negative", "positive"])
    if damage != "tokenizer":  # inspect reads the model alone
        with pytest.raises(ModelError, match=f"cannot load the model in {folder}"):
            inspect(folder)


@pytest.mark.slow
def test_minilm_learns_topics_in_a_few_steps(tmp_path):
    """The real model on real news: far above the majority class (0.23) after 40 steps."""
    summary, _ = run_recipe(tmp_path, [
        "data.max_train_samples=640", "data.max_length=64", "train.epochs=1",
        "train.batch_size=16", "train.lr=3e-3", "train.warmup_ratio=0",
        "train.checkpoint_every=0",
    ], recipe="topics")  # fmt: skip
    assert summary["base_model"] == MINILM_HUB_ID  # what PEFT users name it by
    assert summary["base_model_path"] == minilm_path()
    assert summary["trainable_params"] / summary["total_params"] < 0.01
    assert summary["adapter_bytes"] < 1_000_000
    assert summary["test_accuracy"] > 0.7
    assert summary["reload_lorakit_identical"] and summary["reload_peft_identical"]


def hf_setup(stars_csv, tiny_bert_dir, overrides):
    """(config, model with LoRA, loaders) of `sentiment` on the stars CSV under the HF Trainer."""
    from lorakit.data.tokenize import classification_loaders, tokenize_splits

    config = load_config(recipe_path("sentiment"), [
        f"data.path={stars_csv}", "data.text_column=review", "data.label_column=stars",
        f"model.name={tiny_bert_dir}", "train.trainer=hf", "train.max_steps=3", *overrides,
    ])  # fmt: skip
    dsd = load_task_data(config)
    model, tokenizer, _ = pipeline.build_model(config, dsd["train"].features["label"].names)
    loaders = classification_loaders(tokenize_splits(dsd, tokenizer, 64), tokenizer, 16, 16, 0)
    return config, model, loaders


def train_hf(config, model, loaders, tmp_path):
    from lorakit.train.hf_trainer import train_with_hf_trainer

    train_with_hf_trainer(
        model, loaders["train"].dataset, loaders["validation"].dataset,
        loaders["train"].collate_fn, config.train, run_dir=None, seed=0,
        output_dir=str(tmp_path / "hf"),
    )  # fmt: skip


def test_hf_trainer_under_bf16_leaves_an_fp32_model(tmp_path, tiny_bert_dir, stars_csv):
    """accelerate wraps forward in autocast for bf16; after training the model computes in fp32
    again, so the recorded test accuracy is what a reload computes."""
    config, model, loaders = hf_setup(stars_csv, tiny_bert_dir, ["train.bf16=true"])
    train_hf(config, model, loaders, tmp_path)
    batch = next(iter(loaders["test"]))
    model.eval()
    with torch.no_grad():
        called = model(**batch).logits
        unwrapped = type(model).forward(model, **batch).logits  # the class's own forward
    assert torch.equal(called, unwrapped)


def test_hf_trainer_takes_the_lora_plus_groups(tmp_path, tiny_bert_dir, stars_csv):
    """train.lora_plus_ratio reaches the Trainer: with A's lr vanishing, only B moves."""
    from lorakit.lora import lora_layers

    config, model, loaders = hf_setup(stars_csv, tiny_bert_dir, [
        "train.bf16=false", "train.lr=1e-10", "train.lora_plus_ratio=1e8", "train.warmup_ratio=0",
    ])  # fmt: skip
    layer = next(layer for _, layer in lora_layers(model))
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    a_before, b_before = A.detach().clone(), B.detach().clone()
    train_hf(config, model, loaders, tmp_path)
    assert (A - a_before).abs().max() < 1e-6
    assert (B - b_before).abs().max() > 1e-4


def test_hf_trainer_takes_gradient_checkpointing(tmp_path, tiny_bert_dir, stars_csv):
    """train.gradient_checkpointing is on while the Trainer trains, and off again afterwards."""
    from lorakit.nn.checkpointing import is_checkpointing

    config, model, loaders = hf_setup(
        stars_csv, tiny_bert_dir, ["train.gradient_checkpointing=true"]
    )
    seen = []
    model.register_forward_pre_hook(
        lambda module, args: seen.append(is_checkpointing(module)) if module.training else None
    )
    train_hf(config, model, loaders, tmp_path)
    assert len(seen) == 3 and all(seen)
    assert not is_checkpointing(model)


def test_compare_trains_lora_full_and_head_from_the_same_start(tmp_path, tiny_bert_dir, stars_csv):
    summary, run = run_recipe(tmp_path, [
        f"data.path={stars_csv}", "data.text_column=review", "data.label_column=stars",
        f"model.name={tiny_bert_dir}", "lora.target_modules=query,value", "train.epochs=2",
        "train.batch_size=32", "train.lr=5e-3", "compare=true", "data.forgetting_on=bbc-news",
    ])  # fmt: skip
    lora, full, head = json.loads((run / "comparison.json").read_text())
    assert [lora["method"], full["method"], head["method"]] == [
        "LoRA r=8", "full fine-tuning", "head only"]  # fmt: skip
    # the LoRA row is the run itself, trained again from the same seed
    assert lora["test_accuracy"] == summary["test_accuracy"]
    assert lora["trainable_params"] == summary["trainable_params"]
    classifier = load_sequence_classifier(str(tiny_bert_dir), ["a", "b", "c"])[0].classifier
    assert head["trainable_params"] == sum(p.numel() for p in classifier.parameters())
    # every weight of the base: the LoRA run's total less its A and B matrices and the trained
    # copy of the head that modules_to_save keeps beside the original
    assert full["trainable_params"] == summary["total_params"] - lora["trainable_params"]
    assert full["trainable_percent"] == 100
    assert head["checkpoint_bytes"] < lora["checkpoint_bytes"] < full["checkpoint_bytes"]
    assert full["lr"] == pytest.approx(5e-3 * pipeline.FULL_LR_FRACTION)
    assert head["lr"] == pytest.approx(5e-3 * pipeline.HEAD_LR_FACTOR)
    assert all(row["step_seconds"] > 0 and row["added_peak_rss_bytes"] >= 0
               for row in (lora, full, head))  # fmt: skip
    assert "| head only |" in (run / "comparison.md").read_text()
    # a probe fitted on the base reads bbc-news topics from each trained encoder: training the
    # head alone leaves the encoder as it was, so the probe reads it exactly as the base
    assert summary["forgetting_on"] == "bbc-news"
    assert head["other_probe_accuracy"] == summary["base_other_probe_accuracy"] > 0.2
    assert full["other_probe_accuracy"] != head["other_probe_accuracy"]
