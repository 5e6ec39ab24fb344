"""Quantized frozen bases (`model.quantize`): a tiny random Llama held in int8 or NF4 by
bitsandbytes, LoRA beside it in fp32; training, the adapter on the unquantized base (lorakit and
PEFT), the merge into dequantized weights, the config's checks."""

import json
from itertools import pairwise

import pytest
import torch
from torch import nn

import lorakit.api as lk
import lorakit.lora as lora
from lorakit.config import ConfigError, validate
from lorakit.models.causal_lm import load_causal_lm
from lorakit.models.quantize import (
    dequantize_model,
    dequantize_weight,
    is_quantized,
    quantization_of,
    quantize_model,
)

pytest.importorskip("bitsandbytes")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# nf4 on the tiny random Llama: the adapter on the fp32 base vs on the NF4 base (measured
# about 0.05 on logits of about 0.3 at most); int8: about 0.002
CLOSE = {"int8": 0.01, "nf4": 0.15}


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def batch(tokenizer) -> dict[str, torch.Tensor]:
    texts = ["A gorgeous, witty, seductive movie.", "The plot is nothing but clichés."]
    return tokenizer(texts, padding=True, return_tensors="pt")


def trained(model, tokenizer, steps: int = 8) -> list[float]:
    """LoRA on every linear layer; `steps` AdamW steps on one batch; the losses."""
    torch.manual_seed(0)
    lora.inject(
        model, lora.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    )
    inputs = batch(tokenizer)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module", params=["int8", "nf4"])
def quantized_run(request, tiny_llama_dir, tmp_path_factory):
    """(mode, model, tokenizer, losses, adapter folder): the tiny Llama quantized, trained, saved."""
    torch.set_num_threads(1)
    model, tokenizer = load_causal_lm(tiny_llama_dir, quantize=request.param)
    losses = trained(model, tokenizer)
    adapter = tmp_path_factory.mktemp("adapter") / request.param
    lora.save_adapter(model, adapter)
    return request.param, model.eval(), tokenizer, losses, adapter


def test_every_linear_but_the_output_head_is_quantized(tiny_llama_dir):
    model, _ = load_causal_lm(tiny_llama_dir, quantize="nf4")
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert not is_quantized(linears.pop("lm_head"))
    assert linears and all(is_quantized(m) for m in linears.values())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert {p.dtype for n, p in model.named_parameters() if "proj" not in n} == {torch.float32}
    assert quantization_of(model) == "nf4" and not any(p.requires_grad for p in model.parameters())


def test_a_quantized_base_trains_its_adapter_alone(quantized_run):
    mode, model, _, losses, _ = quantized_run
    assert all(b < a for a, b in pairwise(losses)) and losses[-1] < losses[0] - 0.1, losses
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora.adapter_parameters(model))
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in lora.adapter_parameters(model).values())
    assert quantization_of(model) == mode  # the base is still held quantized


def test_the_adapter_loads_on_the_unquantized_base_in_lorakit_and_peft(
    quantized_run, tiny_llama_dir
):
    import peft
    from transformers import AutoModelForCausalLM

    mode, model, tokenizer, _, adapter = quantized_run
    inputs = batch(tokenizer)
    with torch.no_grad():
        expected = model(**inputs).logits
        base, _ = load_causal_lm(tiny_llama_dir)
        with pytest.warns(lora.FingerprintWarning):  # trained on other (quantized) weights
            ours = lora.load_adapter(base, adapter).eval()(**inputs).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
        theirs = peft.PeftModel.from_pretrained(plain, adapter).eval()(**inputs).logits
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert (ours - expected).abs().max() < CLOSE[mode]


def test_merge_goes_into_the_dequantized_weights(quantized_run, tiny_llama_dir):
    mode, _, tokenizer, _, adapter = quantized_run
    model, _ = load_causal_lm(tiny_llama_dir, quantize=mode)
    lora.load_adapter(model, adapter)
    q_proj = model.model.layers[0].self_attn.q_proj
    dequantized = dequantize_weight(q_proj.base_layer)
    with pytest.raises(lora.LoraError, match="dequantize"):  # never rounded into the codes
        lora.merge_adapter(model)
    inputs = batch(tokenizer)
    with torch.no_grad():
        expected = model(**inputs).logits
        merged = lora.merge_and_unload(dequantize_model(model))
        assert quantization_of(merged) == "none"
        weight = merged.model.layers[0].self_attn.q_proj.weight
        delta = weight - dequantized
        assert delta.abs().max() > 0 and weight.dtype == torch.float32
        change = (merged(**inputs).logits - expected).abs().max()
    if mode == "nf4":  # the base computes with the dequantized weights itself
        assert change < 1e-4
    else:  # LLM.int8() rounds the inputs to int8 too (measured: 0.3% of the largest logit)
        assert change < 0.01 * expected.abs().max()


@pytest.fixture(scope="module")
def nf4_run(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "nf4"
    overrides = [f"model.name={tiny_llama_dir}", "model.quantize=nf4",
                 "data.max_train_samples=40", "data.max_eval_samples=8", "causal.block_size=32",
                 "train.max_steps=2", "train.batch_size=4", "train.eval_batch_size=8",
                 "train.eval_every=0", "train.checkpoint_every=0"]  # fmt: skip
    return lk.train("causal-lm", out=out, overrides=overrides), out


def test_a_run_records_its_quantized_base_and_merges(nf4_run, tmp_path):
    summary, run_dir = nf4_run
    assert summary["quantize"] == "nf4"
    assert summary["reload_lorakit_identical"]
    out = lk.merge(run_dir, tmp_path / "merged")
    record = json.loads((out / "merge.json").read_text())
    assert record["quantize"] == "nf4" and record["max_abs_diff"] <= record["tolerance"]
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        ({"model": {"quantize": "int4"}}, "'none', 'int8' or 'nf4'"),
        ({"model": {"quantize": "nf4"}, "compare": True}, "full fine-tuning"),
        ({"model": {"quantize": "int8"}, "task": "classification"}, "causal-lm"),
    ],
)
def test_config_errors_are_one_line(settings, says):
    base = {"recipe": "causal-lm", "pipeline": "causal_lm", "task": "causal-lm"}
    with pytest.raises(ConfigError) as caught:
        validate({**base, **settings})
    message = str(caught.value)
    assert "\n" not in message and says in message and "model.quantize" in message


def test_quantize_none_leaves_the_model_alone(tiny_llama_dir):
    model, _ = load_causal_lm(tiny_llama_dir)
    assert quantize_model(model, "none") is model and quantization_of(model) == "none"
