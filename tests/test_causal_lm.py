"""Loading and scoring causal LMs, and generation, on a small GPT-2 with a real BPE tokenizer."""

import math
import shutil
import time

import pytest
import torch

from lorakit.data import load_dataset
from lorakit.data.causal import pack_texts, padded_lm_dataset
from lorakit.generate import generate
from lorakit.models import ModelError
from lorakit.models.causal_lm import ChoiceScorer, load_causal_lm
from lorakit.network import OfflineError
from lorakit.train.metrics import perplexity
from tiny_models import save_tiny_causal_lm


@pytest.fixture(scope="module")
def reviews():
    return load_dataset("rotten-tomatoes")["test"]["text"][:24]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, reviews):
    texts = load_dataset("bbc-news")["train"]["text"][:200]
    folder = tmp_path_factory.mktemp("gpt2")
    model, tokenizer = save_tiny_causal_lm(folder, texts, vocab_size=600, width=32)
    return folder, model, tokenizer


def test_load_causal_lm_reads_a_local_folder(saved_model, reviews):
    folder, model, _ = saved_model
    loaded, tokenizer = load_causal_lm(folder)
    ids = tokenizer(reviews[0], return_tensors="pt")["input_ids"]
    loaded_weights, weights = loaded.state_dict(), model.state_dict()
    assert loaded_weights.keys() == weights.keys()
    assert all(torch.equal(loaded_weights[k], weights[k]) for k in weights)
    # Same weights, but at other memory addresses: the CPU's matmul kernels may then sum in
    # another order, so the logits agree to rounding, not always bit for bit.
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    assert tokenizer.pad_token is not None


def test_hub_id_without_network_names_the_offline_model(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty local cache
    start = time.perf_counter()
    with pytest.raises(OfflineError, match="tiny-gpt2"):
        load_causal_lm("openai-community/gpt2")
    assert time.perf_counter() - start < 10


def test_missing_or_damaged_folder_is_reported(saved_model, tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_causal_lm(tmp_path / "no-such-model")
    damaged = tmp_path / "damaged"
    shutil.copytree(saved_model[0], damaged)
    (damaged / "model.safetensors").write_bytes(b"\x10\x00")  # cut short
    with pytest.raises(ModelError, match=f"cannot load the model in {damaged}"):
        load_causal_lm(damaged)


def test_perplexity_of_blocks_is_exp_of_the_model_loss(saved_model, reviews):
    _, model, tokenizer = saved_model
    blocks = pack_texts(tokenizer, reviews, 32)
    ids = blocks[:]["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert perplexity(model, blocks, batch_size=3) == pytest.approx(math.exp(loss), rel=1e-4)


def test_padding_does_not_change_perplexity(saved_model, reviews):
    _, model, tokenizer = saved_model
    rows = padded_lm_dataset(tokenizer, reviews, max_length=128)
    one_at_a_time = perplexity(model, rows, batch_size=1)
    assert perplexity(model, rows, batch_size=8) == pytest.approx(one_at_a_time, rel=1e-4)


def test_choice_log_likelihood_is_the_direct_sum(saved_model, reviews):
    _, model, tokenizer = saved_model
    # prompts of different lengths, the longest first: batched by length with left padding,
    # each row must still score as if it were alone
    prompts = [f"Review: {reviews[0]} {reviews[1]}\nVerdict:", f"Review: {reviews[2]}\nVerdict:"]
    choices = (" fresh", " rotten", " so-so")
    scores = ChoiceScorer(tokenizer, prompts, choices, 128, batch_size=2)(model)
    assert scores.shape == (2, 3)
    eos = tokenizer.eos_token_id
    for i, prompt in enumerate(prompts):
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        for j, choice in enumerate(choices):
            c_ids = tokenizer(choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([[eos, *p_ids, *c_ids]])
            with torch.no_grad():
                log_probs = model(ids).logits.log_softmax(-1)[0]
            start = 1 + len(p_ids)
            direct = sum(log_probs[start - 1 + k, t].item() for k, t in enumerate(c_ids))
            assert scores[i, j].item() == pytest.approx(direct, abs=1e-4)


def test_greedy_generation_is_deterministic_and_streams(saved_model):
    _, model, tokenizer = saved_model
    pieces = []
    text = generate(model, tokenizer, "The film", 12, temperature=0, on_text=pieces.append)
    assert text == generate(model, tokenizer, "The film", 12, temperature=0, stream=False)
    assert "".join(pieces).rstrip("\n") == text
    ids = tokenizer(tokenizer.eos_token + "The film", return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert text == tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def test_sampling_repeats_with_a_seed(saved_model):
    _, model, tokenizer = saved_model
    first = generate(
        model, tokenizer, "Shares", 16, temperature=1.2, top_p=0.9, seed=3, stream=False
    )
    again = generate(
        model, tokenizer, "Shares", 16, temperature=1.2, top_p=0.9, seed=3, stream=False
    )
    assert first == again and first


@pytest.mark.parametrize(("option", "value"), [("temperature", -1.0), ("top_p", 0.0)])
def test_generate_rejects_bad_options(saved_model, option, value):
    _, model, tokenizer = saved_model
    with pytest.raises(ValueError, match=option):
        generate(model, tokenizer, "x", **{option: value})
