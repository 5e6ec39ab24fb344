"""The offline tiny GPT-2: tokenizer, pretraining on real bbc-news text, saving and the cache."""

import math

import pytest
import torch
from datasets import DatasetDict
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorakit.data import load_dataset
from lorakit.data.causal import pack_texts
from lorakit.models import ModelError
from lorakit.models.causal_lm import load_causal_lm
from lorakit.models.tiny_gpt2 import (
    ENDOFTEXT,
    TinyGPT2Settings,
    cached_tiny_gpt2,
    default_tiny_gpt2_path,
    train_bpe_tokenizer,
)
from lorakit.recipes import pretrain_tiny_gpt2 as recipe
from lorakit.recipes.pretrain_tiny_gpt2 import (
    ensure_base_model,
    ensure_tiny_gpt2,
    pretrain_tiny_gpt2,
)
from lorakit.train.metrics import perplexity

SMALL = dict(vocab_size=1000, n_layer=2, n_embd=64, n_head=4, n_positions=64)


@pytest.fixture(scope="module")
def bbc():
    return load_dataset("bbc-news")


@pytest.fixture(scope="module")
def pretrained(bbc, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    result = pretrain_tiny_gpt2(
        folder,
        bbc["train"]["text"][:300],
        bbc["validation"]["text"][:30],
        steps=30,
        batch_size=8,
        seq_len=64,
        lr=1e-2,
        seed=0,
        **SMALL,
    )
    return folder, result


def test_bpe_tokenizer_is_lossless_and_gpt2_like(bbc):
    tokenizer = train_bpe_tokenizer(bbc["train"]["text"][:300], vocab_size=1000)
    assert len(tokenizer) <= 1000
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == ENDOFTEXT
    assert tokenizer.eos_token_id == 0
    unseen = bbc["test"]["text"][0] + " naïve café £5 ✓"
    ids = tokenizer(unseen, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == unseen  # byte-level: any text round-trips
    assert len(ids) < len(unseen.encode()) / 2  # merges learned: well under a token per byte


def test_pretraining_lowers_the_loss(pretrained):
    _, result = pretrained
    # from about ln(1000) (a uniform guess) to well below it, on held-out text too
    assert result["last_loss"] < result["first_loss"] - 0.5
    assert result["perplexity"] < 0.6 * math.exp(result["first_loss"])
    assert result["params"] == pytest.approx(
        1000 * 64 + 64 * 64 + 2 * 12 * 64 * 64, rel=0.05
    )  # tied embeddings, positions, two blocks


def test_saved_folder_loads_offline_and_scores_the_same(pretrained, bbc):
    folder, result = pretrained
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    assert tokenizer.eos_token == ENDOFTEXT and model.config.eos_token_id == tokenizer.eos_token_id
    val = pack_texts(tokenizer, bbc["validation"]["text"][:30], 64)
    assert perplexity(model, val, batch_size=16) == pytest.approx(result["perplexity"], rel=1e-4)
    again = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    ids = val[:2]["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def test_cache_path_follows_lorakit_cache_and_settings(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    path = default_tiny_gpt2_path()
    assert path.parent == tmp_path and path.name.startswith("tiny-gpt2-")
    assert default_tiny_gpt2_path(TinyGPT2Settings(steps=7)) != path


def test_ensure_pretrains_once_then_reuses(monkeypatch, tmp_path, bbc):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    # the real corpus, cut to a few hundred articles to keep the test short
    small = DatasetDict({split: bbc[split].select(range(100)) for split in bbc})
    monkeypatch.setattr(recipe, "load_dataset", lambda name: small)
    settings = TinyGPT2Settings(
        steps=3, batch_size=4, seq_len=64, vocab_size=500, n_layer=1, n_embd=32, n_head=2
    )
    folder = ensure_tiny_gpt2(settings=settings, progress=None)
    assert folder == default_tiny_gpt2_path(settings)
    assert (folder / "pretraining.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no temporary folder left

    def must_not_train(*args, **kwargs):
        raise AssertionError("pretrained again although the cache was complete")

    monkeypatch.setattr(recipe, "pretrain_tiny_gpt2", must_not_train)
    assert ensure_tiny_gpt2(settings=settings) == folder
    assert cached_tiny_gpt2(settings) == folder


def test_interrupted_pretraining_leaves_nothing(monkeypatch, tmp_path):
    def interrupted(out_dir, *args, **kwargs):
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(recipe, "pretrain_tiny_gpt2", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_tiny_gpt2(tmp_path / "model", progress=None)
    assert list(tmp_path.iterdir()) == []


def test_loading_tiny_gpt2_never_trains(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))

    def must_not_train(*args, **kwargs):
        raise AssertionError("loading a model started pretraining")

    monkeypatch.setattr(recipe, "pretrain_tiny_gpt2", must_not_train)
    with pytest.raises(ModelError, match="lorakit train pretrain-tiny-gpt2"):
        load_causal_lm("tiny-gpt2")
    assert list(tmp_path.iterdir()) == []
    assert ensure_base_model("some/folder") == "some/folder"  # other names: nothing to prepare
