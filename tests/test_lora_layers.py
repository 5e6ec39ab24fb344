"""The LoRA layer computes W0·x + (alpha/r)·B·A·x: its fused branch, the in-place branch without
autograd and bf16 autocast each against the plain formula, gradients included."""

import math

import pytest
import torch
from torch import nn

import lorakit.lora as lora
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
