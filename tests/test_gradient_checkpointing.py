"""train.gradient_checkpointing: a LoRA model's blocks recompute their activations in the backward
pass, with the same gradients, and the model is as before after training."""

import peft
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit.lora as lora
from lorakit.config import ConfigError, TrainConfig
from lorakit.nn.checkpointing import gradient_checkpointing, is_checkpointing
from lorakit.nn.fast_dropout import fast_dropout
from lorakit.train.loop import train_loop
from lorakit.train.metrics import evaluate_causal

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # a tiny model: one thread is faster


def tiny_llama_with_lora(engine: str = "lorakit", dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=128, attention_dropout=dropout,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    # B not zero, so that A has a gradient too
    options = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=dropout)
    if engine == "peft":
        return peft.get_peft_model(model, peft.LoraConfig(**options, init_lora_weights=False))
    return lora.inject(model, lora.LoraConfig(**options, init_lora_weights=False))


def batch(seed: int = 0, rows: int = 2, length: int = 16) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 128, (rows, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def lora_gradients(model: torch.nn.Module, inputs: dict) -> tuple[dict, int]:
    """({name: gradient} of the trainable tensors, tensors autograd saved for the backward)."""
    model.zero_grad(set_to_none=True)
    saved = 0

    def pack(tensor):
        nonlocal saved
        saved += 1
        return tensor

    torch.manual_seed(1)  # the same dropout masks in every call
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(**inputs).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return grads, saved


@pytest.mark.parametrize("engine", ["lorakit", "peft"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_checkpointed_lora_gradients_equal_the_plain_ones(engine, dropout):
    model = tiny_llama_with_lora(engine, dropout).train()
    with fast_dropout(model):  # the loop's dropout: the recompute must draw the same masks
        plain, saved_plain = lora_gradients(model, batch())
        with gradient_checkpointing(model):
            assert is_checkpointing(model)
            checkpointed, saved_checkpointed = lora_gradients(model, batch())
    assert saved_checkpointed < saved_plain / 2  # it does recompute instead of keeping
    assert plain.keys() == checkpointed.keys() and len(plain) == 8  # A and B of 2 x 2 layers
    for name, grad in plain.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7)
    assert not is_checkpointing(model)


def test_the_model_is_as_before_afterwards():
    """Off again, and no hook on the input embedding (transformers adds one when enabling)."""
    model = tiny_llama_with_lora()
    embedding = model.get_input_embeddings()
    hooks = dict(embedding._forward_hooks)
    with gradient_checkpointing(model):
        pass
    assert not is_checkpointing(model)
    assert dict(embedding._forward_hooks) == hooks
    assert not model.get_input_embeddings()(torch.tensor([1])).requires_grad


def causal_loaders(rows: int = 8) -> tuple[DataLoader, DataLoader]:
    data = [{k: v[0] for k, v in batch(seed).items()} for seed in range(rows)]
    return DataLoader(data, batch_size=2), DataLoader(data[:4], batch_size=4)


def test_the_loop_trains_with_checkpointing_and_turns_it_off():
    model = tiny_llama_with_lora()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    seen = []

    def loss_fn(model, batch):
        seen.append(is_checkpointing(model))
        return model(**batch).loss

    train, val = causal_loaders()
    config = TrainConfig(epochs=1, max_steps=2, lr=1e-2, gradient_checkpointing=True)
    result = train_loop(
        model, train, val, config, seed=0, metric="loss", show_progress=False,
        evaluate_fn=evaluate_causal, loss_fn=loss_fn,
    )  # fmt: skip
    assert result.steps == 2 and seen == [True, True]
    assert not is_checkpointing(model)
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not p.equal(before[n])]
    assert len(moved) == len(before)


def test_a_model_without_checkpointing_is_a_config_error():
    model = torch.nn.Linear(4, 2)
    data = [{"x": torch.zeros(4)}] * 2
    config = TrainConfig(epochs=1, gradient_checkpointing=True)
    with pytest.raises(ConfigError, match=r"set train\.gradient_checkpointing = false"):
        train_loop(model, DataLoader(data), DataLoader(data), config, show_progress=False)
