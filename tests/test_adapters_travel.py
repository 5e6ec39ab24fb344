"""Adapter folders that load elsewhere: the base's public id, the label names beside the
adapter, and (for lorakit) the local folder and the weights' fingerprint in the file's header."""

from __future__ import annotations

import json
import shutil
import warnings

import peft
import torch
from safetensors import safe_open
from transformers import AutoModelForSequenceClassification

import lorakit.lora as lora
from lorakit.models.transformer import (
    MINILM_HUB_ID,
    load_sequence_classifier,
    minilm_path,
    public_name,
    resolve_model,
)
from lorakit.train import engines
from tiny_models import tiny_bert

LABELS = ["negative", "positive"]
TEXTS = ["a wonderful, moving film", "dull", "the plot drags on and on"]


def test_the_packaged_minilm_is_named_by_its_hub_id(tmp_path):
    for name in ("minilm", "all-MiniLM-L6-v2", MINILM_HUB_ID, minilm_path()):
        assert public_name(name) == MINILM_HUB_ID
    assert resolve_model(MINILM_HUB_ID) == minilm_path()  # offline: the packaged copy
    snapshot = (
        tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-135M-Instruct" / "snapshots" / "a1"
    )
    snapshot.mkdir(parents=True)
    assert public_name(str(snapshot)) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert public_name("org/model") == "org/model"  # a hub id stays itself
    folder = tmp_path / "my-model"  # a model of one's own has no public name: its folder
    folder.mkdir()
    assert public_name(str(folder)) == str(folder.resolve())


def test_a_moved_adapter_folder_loads_by_its_public_id_in_peft_and_lorakit(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tokenizer, resolved = load_sequence_classifier("minilm", LABELS)
    config = lora.LoraConfig(
        r=4, target_modules=["query", "value"], task_type="SEQ_CLS", init_lora_weights=False
    )
    model = lora.inject(model, config).eval()
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**batch).logits
    saved = tmp_path / "run" / "adapter"
    engines.save(model, saved, public_name(resolved), base_path=resolved, labels=LABELS)
    folder = shutil.move(saved, tmp_path / "elsewhere")

    fields = json.loads((folder / "adapter_config.json").read_text())
    assert fields["base_model_name_or_path"] == MINILM_HUB_ID
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
        header = f.metadata()
    assert header["base_model"] == MINILM_HUB_ID
    assert header["base_model_path"] == minilm_path()
    assert header["base_fingerprint"]

    # plain PEFT: the config names the base, labels.json its head's labels
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PEFT warns of keys it does not know: there are none
        peft_config = peft.PeftConfig.from_pretrained(str(folder))
    labels = json.loads((folder / "labels.json").read_text())
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(
        resolve_model(peft_config.base_model_name_or_path),
        id2label={int(i): name for i, name in labels["id2label"].items()},
        label2id=labels["label2id"],
    )
    theirs = peft.PeftModel.from_pretrained(base, str(folder)).eval()
    assert theirs.config.id2label == {0: "negative", 1: "positive"}
    with torch.no_grad():
        assert (theirs(**batch).logits - expected).abs().max() <= 1e-5

    # lorakit: the same public id, the same weights (no fingerprint warning)
    again, _, _ = load_sequence_classifier(peft_config.base_model_name_or_path, LABELS)
    with warnings.catch_warnings():
        warnings.simplefilter("error", lora.FingerprintWarning)
        again = lora.load_adapter(again, folder)
    with torch.no_grad():
        assert (again(**batch).logits - expected).abs().max() <= 1e-5


def test_the_peft_engine_records_the_public_id_and_the_labels(tmp_path):
    model = peft.get_peft_model(
        tiny_bert(), peft.LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS")
    )
    engines.save(model, tmp_path, "org/tiny-bert", base_path="/models/tiny-bert", labels=LABELS)
    fields = json.loads((tmp_path / "adapter_config.json").read_text())
    assert fields["base_model_name_or_path"] == "org/tiny-bert"
    assert json.loads((tmp_path / "labels.json").read_text()) == {
        "id2label": {"0": "negative", "1": "positive"},
        "label2id": {"negative": 0, "positive": 1},
    }


def test_an_adapter_without_labels_writes_no_labels_file(tmp_path):
    model = lora.inject(tiny_bert(), lora.LoraConfig(r=2, target_modules=["query"]))
    engines.save(model, tmp_path, "tiny-bert")
    assert not (tmp_path / "labels.json").exists()
