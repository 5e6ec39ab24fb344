"""`lorakit merge`: a tiny BERT run merged into a folder plain transformers loads."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from lorakit import api, lora
from lorakit.cli import main
from lorakit.config import Config, to_toml
from lorakit.merge import MergeError, merge
from lorakit.models.transformer import minilm_path
from tiny_models import (
    NEGATIVE,
    POSITIVE,
    save_tiny_bert,
    tiny_gpt2,
    train_small_classic,
    write_reviews_csv,
)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished `sentiment`-pipeline run on a 2-layer BERT with MiniLM's tokenizer."""
    root = tmp_path_factory.mktemp("merge")
    save_tiny_bert(root / "bert")
    write_reviews_csv(root / "reviews.csv", {"good": POSITIVE, "bad": NEGATIVE}, rows=200,
                      columns=("text", "label"))  # fmt: skip
    api.train("sentiment", out=root / "run", overrides=[
        f"data.path={root / 'reviews.csv'}", f"model.name={root / 'bert'}",
        "lora.target_modules=query,value,dense", "train.epochs=1", "train.lr=1e-2",
    ])  # fmt: skip
    return root / "run"


def test_merged_folder_loads_in_plain_transformers(tiny_run, tmp_path):
    out = merge(tiny_run, tmp_path / "merged")
    record = json.loads((out / "merge.json").read_text())
    assert record["max_abs_diff"] <= 1e-4 and record["texts"] > 0
    assert record["loads_with"] == "AutoModelForSequenceClassification"
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert not list(tmp_path.glob(".merged*"))  # no temporary folder left

    texts = ["the plot was brilliant and moving", "a dull and tedious ending"]
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert not any("lora" in name for name, _ in model.named_parameters())
    with torch.no_grad():
        merged = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits
    expected = api.load_predictor(tiny_run).predict_proba(texts)
    assert torch.allclose(torch.softmax(merged, -1), torch.from_numpy(expected), atol=1e-4)
    # LoRA did change the model: the merged weights are not the base's
    base = AutoModelForSequenceClassification.from_pretrained(tiny_run.parent / "bert")
    query = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(model.state_dict()[query], base.state_dict()[query])
    assert model.config.id2label == {0: "bad", 1: "good"}


def test_merged_transformers_folder_loads_in_lorakit_without_an_adapter(tiny_run, tmp_path, capsys):
    out = merge(tiny_run, tmp_path / "merged")
    texts = ["the plot was brilliant and moving", "a dull and tedious ending"]
    run, merged = api.predict(tiny_run, texts), api.predict(out, texts)
    assert [r["label"] for r in merged] == [r["label"] for r in run]
    for ours, theirs in zip(run, merged, strict=True):
        assert theirs["probability"] == pytest.approx(ours["probability"], abs=1e-4)
    assert api.evaluate(out)["accuracy"] == api.evaluate(tiny_run)["accuracy"]
    capsys.readouterr()
    assert main(["predict", str(out), texts[0]]) == 0
    assert capsys.readouterr().out.startswith(run[0]["label"] + "\t")


@pytest.fixture(scope="module")
def classic_run(tmp_path_factory):
    """A finished `classic` run, pretrained on a small 3-class file, transferred to reviews."""
    return train_small_classic(tmp_path_factory.mktemp("merge-classic"))


def test_merged_classic_model_loads_in_lorakit_predict_and_eval(classic_run, tmp_path, capsys):
    """The GloVe classifier is no transformers model: lorakit loads its merged folder."""
    out = merge(classic_run, tmp_path / "merged")
    record = json.loads((out / "merge.json").read_text())
    assert record["loads_with"] == "lorakit.models.classic.load_classic"
    assert "lorakit predict" in record["load"]
    texts = ["wonderful superb film", "dull tedious plot", "moving and funny"]
    run, merged = api.predict(classic_run, texts), api.predict(out, texts)
    for ours, theirs in zip(run, merged, strict=True):
        assert theirs["label"] == ours["label"]
        assert theirs["probability"] == pytest.approx(ours["probability"], abs=1e-5)
    evaluated = api.evaluate(out)
    assert evaluated["accuracy"] == api.evaluate(classic_run)["accuracy"]
    assert evaluated["recorded_test_accuracy"] == record["test_accuracy"]
    capsys.readouterr()
    assert main(["predict", str(out), texts[0]]) == 0
    assert capsys.readouterr().out.startswith(run[0]["label"] + "\t")


def test_merge_refuses_an_existing_folder(tiny_run, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MergeError, match="--force"):
        merge(tiny_run, out)
    assert (out / "keep.txt").read_text() == "mine"
    merge(tiny_run, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "merge.json").is_file()


def test_merge_under_a_file_is_refused(tiny_run, tmp_path):
    (tmp_path / "taken").write_text("mine")
    with pytest.raises(MergeError, match="cannot make .*taken"):
        merge(tiny_run, tmp_path / "taken" / "merged")


def test_merge_needs_a_finished_run(tmp_path):
    with pytest.raises(MergeError, match="not a finished run directory"):
        merge(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("targets", [["c_attn"], ["c_attn", "lm_head"]])
def test_causal_lm_run_merges_for_auto_model_for_causal_lm(tmp_path, targets):
    """A causal-LM run directory (task "causal-lm"), made here from a tiny GPT-2 with LoRA on
    its Conv1D attention (and on its output head, which GPT-2 ties to the token embedding) and
    a trained-looking (non-zero) B."""
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    gpt2 = tiny_gpt2(vocab_size=len(tokenizer), n_positions=64)
    gpt2.save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    model = lora.inject(gpt2, lora.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    run = tmp_path / "run"
    lora.save_adapter(model, run / "adapter", base_model_name_or_path=str(tmp_path / "gpt2"))
    config = Config(recipe="tiny-causal", task="causal-lm", model={"name": str(tmp_path / "gpt2")})
    (run / "config.toml").write_text(to_toml(config))
    summary = {"recipe": "tiny-causal", "task": "causal-lm", "base_model": str(tmp_path / "gpt2")}
    (run / "summary.json").write_text(json.dumps(summary))

    out = merge(run, tmp_path / "merged")
    record = json.loads((out / "merge.json").read_text())
    assert record["loads_with"] == "AutoModelForCausalLM" and record["max_abs_diff"] <= 1e-4
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2").eval()
    batch = tokenizer(["The striker scored twice."], return_tensors="pt")
    with torch.no_grad():
        expected = model.eval()(**batch).logits
        assert torch.allclose(merged(**batch).logits, expected, atol=1e-4)
        assert not torch.allclose(base(**batch).logits, expected, atol=1e-3)  # LoRA mattered
    # the input embeddings are the base's: a head adapter changed the (now untied) head only
    assert torch.equal(merged.transformer.wte.weight, base.transformer.wte.weight)
