"""The fast path's treatment of the frozen base: dropout, bf16 weights, attention kernel."""

import peft
import pytest
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification

import lorakit.lora as lora
from lorakit.nn.frozen_base import bf16_frozen_base, set_model_dropout


def with_adapter(folder, engine: str) -> nn.Module:
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    options = dict(r=4, lora_alpha=8, target_modules=["query", "value"], lora_dropout=0.2)
    if engine == "peft":
        config = peft.LoraConfig(**options, modules_to_save=["classifier"], task_type="SEQ_CLS")
        return peft.get_peft_model(model, config)
    return lora.inject(model, lora.LoraConfig(**options, modules_to_save=["classifier"]))


@pytest.mark.parametrize("engine", ["lorakit", "peft"])
def test_model_dropout_changes_and_lora_dropout_stays(tiny_bert_dir, engine):
    model = with_adapter(tiny_bert_dir, engine)
    changed = set_model_dropout(model, 0.0)
    dropouts = {n: m.p for n, m in model.named_modules() if isinstance(m, nn.Dropout)}
    lora_ones = {n: p for n, p in dropouts.items() if "lora_dropout" in n}
    model_ones = {n: p for n, p in dropouts.items() if "lora_dropout" not in n}
    assert len(lora_ones) == 4 and set(lora_ones.values()) == {0.2}  # 2 layers x query, value
    assert changed == len(model_ones) >= 2 * 3 + 2  # 3 a layer, embeddings, head
    assert set(model_ones.values()) == {0.0}
    base_config = model.config if engine == "lorakit" else model.base_model.model.config
    assert base_config.hidden_dropout_prob == 0.0
    assert base_config.attention_probs_dropout_prob == 0.0


def test_model_dropout_out_of_range_is_refused(tiny_bert_dir):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        set_model_dropout(with_adapter(tiny_bert_dir, "lorakit"), 1.0)


@pytest.mark.parametrize("engine", ["lorakit", "peft"])
def test_bf16_frozen_base_inside_and_exact_restore_after(tiny_bert_dir, engine):
    model = with_adapter(tiny_bert_dir, engine)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    trainable = set(before) - frozen
    assert frozen and trainable
    kernel = model.config._attn_implementation
    batch = {"input_ids": torch.tensor([[101, 2023, 2003, 1037, 3231, 102]] * 2),
             "labels": torch.tensor([0, 1])}  # fmt: skip
    with bf16_frozen_base(model):
        dtypes = {n: p.dtype for n, p in model.named_parameters()}
        norms = {n for n in frozen if "LayerNorm" in n}  # fp32: they take either input dtype
        assert {dtypes[n] for n in frozen - norms} == {torch.bfloat16}
        assert norms and {dtypes[n] for n in norms} == {torch.float32}
        assert {dtypes[n] for n in trainable} == {torch.float32}  # the optimizer's weights
        assert model.config._attn_implementation == "eager"
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        grads = [p.grad for n, p in model.named_parameters() if n in trainable]
        assert all(g is not None and g.dtype == torch.float32 for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)
    after = dict(model.named_parameters())
    for name, value in before.items():
        assert after[name].dtype == torch.float32
        assert torch.equal(after[name], value), name  # bit for bit, not a bf16 round trip
    assert model.config._attn_implementation == kernel


def test_bf16_frozen_base_restores_after_an_error(tiny_bert_dir):
    model = with_adapter(tiny_bert_dir, "lorakit")
    weight = model.bert.embeddings.word_embeddings.weight.detach().clone()
    with pytest.raises(RuntimeError, match="stop"), bf16_frozen_base(model):
        raise RuntimeError("stop")
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, weight)


@pytest.mark.parametrize("engine", ["lorakit", "peft"])
def test_bf16_frozen_base_keeps_modules_with_a_trainable_bias_in_fp32(tiny_bert_dir, engine):
    # bias="all" trains a LayerNorm's bias beside its frozen weight; LayerNorm is outside bf16
    # autocast, so a bf16 weight beside an fp32 bias would stop the forward inside torch
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    options = dict(r=4, lora_alpha=8, target_modules=["query", "value"], bias="all")
    if engine == "peft":
        model = peft.get_peft_model(model, peft.LoraConfig(**options, task_type="SEQ_CLS"))
    else:
        model = lora.inject(model, lora.LoraConfig(**options))
    norm = next(m for m in model.modules() if isinstance(m, nn.LayerNorm))
    assert norm.bias.requires_grad and not norm.weight.requires_grad
    batch = {"input_ids": torch.tensor([[101, 2023, 2003, 1037, 3231, 102]] * 2),
             "labels": torch.tensor([0, 1])}  # fmt: skip
    with bf16_frozen_base(model):
        assert norm.weight.dtype == torch.float32
        frozen_alone = model.base_model.model if engine == "peft" else model
        embeddings = frozen_alone.bert.embeddings.word_embeddings.weight
        assert embeddings.dtype == torch.bfloat16  # a module with nothing trainable still is
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
    assert norm.bias.grad is not None and norm.bias.grad.abs().sum() > 0


@pytest.mark.parametrize("engine", ["lorakit", "peft"])
def test_bf16_frozen_base_takes_fp32_hidden_states_from_a_trainable_embedding(
    tiny_bert_dir, engine
):
    # modules_to_save = ["word_embeddings"] trains a copy of the embedding in fp32, and an
    # embedding is outside bf16 autocast: its fp32 output met the next LayerNorm's weights
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    options = dict(r=4, target_modules=["query"], modules_to_save=["word_embeddings"])
    if engine == "peft":
        model = peft.get_peft_model(model, peft.LoraConfig(**options, task_type="SEQ_CLS"))
    else:
        model = lora.inject(model, lora.LoraConfig(**options))
    batch = {"input_ids": torch.tensor([[101, 2023, 2003, 1037, 3231, 102]] * 2),
             "labels": torch.tensor([0, 1])}  # fmt: skip
    with bf16_frozen_base(model), torch.autocast("cpu", dtype=torch.bfloat16):
        model(**batch).loss.backward()
    copy = next(p for n, p in model.named_parameters() if "modules_to_save" in n)
    assert copy.grad is not None and copy.grad.abs().sum() > 0
