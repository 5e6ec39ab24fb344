"""lorakit's fast dropout: the mask's statistics, its seed, its gradient, and its place in models."""

import pytest
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, GPT2Config
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask

import lorakit.lora as lora
import lorakit.nn.fast_dropout as fd
from lorakit.nn.fast_dropout import dropout, fast_dropout, matmul_attention
from lorakit.nn.frozen_base import set_model_dropout
from tiny_models import tiny_gpt2


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_and_scale_make_an_unbiased_dropout(p):
    torch.manual_seed(0)
    x = torch.full((500_000,), 2.0)
    y = dropout(x, p)
    kept = y != 0
    assert abs(kept.float().mean().item() - (1 - p)) < 0.003  # > 4 standard errors
    assert abs(y.mean().item() - 2.0) < 0.02
    assert torch.all(y[kept] == y[kept][0])  # one scale, 1/(1-p) for the rounded p
    assert y[kept][0].item() == pytest.approx(2.0 / (1 - p), rel=1e-4)


def test_masks_follow_torchs_seed():
    x = torch.ones(10_000)
    torch.manual_seed(1)
    first, second = dropout(x, 0.5), dropout(x, 0.5)
    torch.manual_seed(1)
    assert torch.equal(dropout(x, 0.5), first)
    assert not torch.equal(first, second)


def test_backward_multiplies_by_the_same_mask():
    torch.manual_seed(0)
    x = torch.randn(64, 33, requires_grad=True)
    y = dropout(x, 0.3)
    y.backward(torch.ones_like(y))
    assert torch.allclose(x.grad, y.detach() / x.detach())  # d(x * m)/dx = m


def test_off_when_not_training_or_p_zero():
    x = torch.randn(4, 4)
    assert dropout(x, 0.5, training=False) is x
    assert dropout(x, 0.0) is x
    assert dropout(x, 0.999_999).eq(0).all()  # below the 16-bit resolution: PyTorch's dropout


def test_context_switches_the_model_and_restores_it(tiny_bert_dir):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    model = lora.inject(model, lora.LoraConfig(r=4, target_modules=["query"], lora_dropout=0.1))
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(dropouts) >= 2 + 2 * 3  # LoRA's 2, and 3 a layer in the model
    kernel = model.config._attn_implementation
    batch = {"input_ids": torch.tensor([[101, 2023, 2003, 102, 0], [101, 2023, 2003, 1037, 102]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 0], [1] * 5])}  # fmt: skip
    model.eval()
    with torch.no_grad():
        before = model(**batch).logits
    with fast_dropout(model):
        assert model.config._attn_implementation == fd.ATTENTION
        assert all("forward" in m.__dict__ for m in dropouts)
        with torch.no_grad():
            inside = model(**batch).logits
    assert model.config._attn_implementation == kernel
    assert not any("forward" in m.__dict__ for m in dropouts)
    assert torch.allclose(inside, before, atol=1e-6)


def test_training_steps_without_dropout_are_unchanged(tiny_bert_dir):
    def losses(fast: bool) -> list[float]:
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
        set_model_dropout(model, 0.0)
        model = lora.inject(model, lora.LoraConfig(r=4, target_modules=["query", "value"]))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 1e-2)
        batch = {
            "input_ids": torch.randint(1000, 2000, (4, 12)),
            "labels": torch.tensor([0, 1] * 2),
        }
        model.train()
        result = []
        with fast_dropout(model) if fast else torch.enable_grad():
            for _ in range(5):
                loss = model(**batch).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                result.append(loss.item())
        return result

    assert losses(fast=True) == pytest.approx(losses(fast=False), rel=1e-6)


def _masks_drawn(monkeypatch) -> list[tuple[int, ...]]:
    shapes = []
    original = fd.keep_mask

    def spy(shape, p, dtype):
        shapes.append(tuple(shape))
        return original(shape, p, dtype)

    monkeypatch.setattr(fd, "keep_mask", spy)
    return shapes


def test_attention_dropout_goes_through_the_fast_mask(tiny_bert_dir, monkeypatch):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    set_model_dropout(model, 0.0)
    model.config.attention_probs_dropout_prob = 0.5
    for layer in model.bert.encoder.layer:
        layer.attention.self.dropout.p = 0.5
    shapes = _masks_drawn(monkeypatch)
    batch = {"input_ids": torch.randint(1000, 2000, (3, 7))}
    model.train()
    with fast_dropout(model):
        torch.manual_seed(0)
        first = model(**batch).logits
        second = model(**batch).logits
        torch.manual_seed(0)
        again = model(**batch).logits
    assert shapes[:2] == [(3, 4, 7, 7)] * 2  # batch, heads, queries, keys; one a layer
    assert not torch.allclose(first, second) and torch.equal(first, again)


def test_gpt2_trains_inside(monkeypatch):
    model = tiny_gpt2(vocab_size=50, n_positions=16)  # GPT-2's dropout: 0.1 throughout
    shapes = _masks_drawn(monkeypatch)
    ids = torch.randint(0, 50, (2, 9))
    model.train()
    with fast_dropout(model):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    assert (2, 4, 9, 9) in shapes and (2, 9, 32) in shapes  # attention and hidden dropout
    assert torch.isfinite(loss) and model.transformer.wte.weight.grad is not None


@pytest.mark.parametrize("causal", [False, True])
def test_matmul_attention_equals_sdpa(causal):
    torch.manual_seed(0)
    batch, heads, length, head_dim = 2, 4, 6, 8
    q, k, v = (torch.randn(batch, heads, length, head_dim) for _ in range(3))
    padding = torch.tensor([[1] * length, [1] * (length - 2) + [0, 0]])
    config = GPT2Config(n_embd=heads * head_dim, n_head=heads)
    config._attn_implementation = "eager"  # an additive float mask, as lorakit's attention gets
    make = create_causal_mask if causal else create_bidirectional_mask
    embeds = torch.zeros(batch, length, heads * head_dim)
    kwargs = {"position_ids": torch.arange(length)[None], "cache": None} if causal else {}
    mask = make(config=config, inputs_embeds=embeds, attention_mask=padding, **kwargs)
    assert mask is not None and mask.dtype == torch.float32
    module = nn.Module().eval()
    module.is_causal = causal
    ours, _ = matmul_attention(module, q, k, v, mask)
    reference, _ = sdpa_attention_forward(module, q, k, v, mask)
    assert torch.allclose(ours, reference, atol=1e-6)


def test_attention_stays_for_models_off_the_cpu():
    model = tiny_gpt2(vocab_size=50, n_positions=16, n_layer=1).to("meta")
    kernel = model.config._attn_implementation
    with fast_dropout(model):
        assert model.config._attn_implementation == kernel


def test_causal_attention_without_a_mask_stays_causal():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 4, dtype=torch.bfloat16) for _ in range(3))
    module = nn.Module().train()
    module.is_causal = True  # a model that asks for causal attention by flag, with no mask
    ours, _ = fd.attention(module, q, k, v, None)
    reference, _ = sdpa_attention_forward(module, q, k, v, None)
    assert torch.equal(ours, reference)
