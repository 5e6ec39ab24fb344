"""Mixed-adapter batches: each row of one forward through its own adapter gives what that
adapter alone gives the row, for adapters of different ranks and targets, and for the base."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorakit.lora import (
    LoraConfig,
    LoraError,
    MixedBatch,
    add_adapter,
    disable_adapters,
    inject,
    set_adapter,
)
from tiny_models import tiny_gpt2

ADAPTERS = {  # name: (rank, targets)
    "a": (4, ["q_proj", "v_proj"]),
    "b": (8, "all-linear"),
    "c": (2, ["down_proj", "o_proj"]),
}


def adapted_llama(folder):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for i, (name, (r, targets)) in enumerate(ADAPTERS.items()):
        config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False)
        (inject if i == 0 else add_adapter)(model, *((config, name) if i == 0 else (name, config)))
    return model


def alone(model, name, input_ids):
    if name is None:
        with disable_adapters(model):
            return model(input_ids).logits
    set_adapter(model, name)
    return model(input_ids).logits


@pytest.mark.parametrize("names", [["a", "b", None, "c", "b"], ["c", None], ["b", "b"]])
def test_every_row_gets_its_own_adapter(tiny_llama_dir, names, one_torch_thread):
    model = adapted_llama(tiny_llama_dir)
    input_ids = torch.randint(0, 1000, (len(names), 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = torch.cat([alone(model, n, input_ids[i : i + 1]) for i, n in enumerate(names)])
        with MixedBatch().rows(model, names):
            mixed = model(input_ids).logits
        plain = alone(model, None, input_ids)
    torch.testing.assert_close(mixed, expected, atol=1e-5, rtol=1e-5)
    for i, name in enumerate(names):  # and the adapters do change the rows they serve
        assert (name is None) == torch.allclose(mixed[i], plain[i], atol=1e-6)


def test_the_layers_are_left_as_they_were(tiny_llama_dir, one_torch_thread):
    model = adapted_llama(tiny_llama_dir)
    set_adapter(model, "b")
    input_ids = torch.arange(10).view(2, 5)
    with torch.no_grad():
        before = model(input_ids).logits
        with MixedBatch().rows(model, ["a", "c"]):
            model(input_ids)
        torch.testing.assert_close(model(input_ids).logits, before, atol=0, rtol=0)


def test_gpt2_conv1d_layers_mix_too(one_torch_thread):
    model = tiny_gpt2().eval()
    inject(model, LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False), "x")
    add_adapter(
        model, "y", LoraConfig(r=2, target_modules=["c_attn", "c_fc"], init_lora_weights=False)
    )
    input_ids = torch.arange(12).view(2, 6)
    with torch.no_grad():
        expected = torch.cat([alone(model, n, input_ids[i : i + 1]) for i, n in enumerate("xy")])
        with MixedBatch().rows(model, ["x", "y"]):
            torch.testing.assert_close(model(input_ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_an_embedding_adapter_cannot_mix(tiny_llama_dir, one_torch_thread):
    model = adapted_llama(tiny_llama_dir)
    add_adapter(model, "e", LoraConfig(r=2, target_modules=["embed_tokens"]))
    with pytest.raises(LoraError, match="serve it alone"):
        with MixedBatch().rows(model, ["e", "a"]):
            pass


def test_a_dora_adapter_cannot_mix(tiny_llama_dir, one_torch_thread):
    model = adapted_llama(tiny_llama_dir)
    add_adapter(model, "d", LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(LoraError, match="DoRA in 'd'"):
        with MixedBatch().rows(model, ["d", "a"]):
            pass
