"""DoRA (`use_dora`): lorakit's layers against PEFT's, adapters both ways, merge and the norm.

Every model here is tiny (width 32, two layers) and every adapter non-trivial: random A and B
(`init_lora_weights=False`) and a magnitude vector moved away from the column norms it starts at,
so that a wrong norm, a wrong axis or a dropped magnitude changes the logits.
"""

import json

import peft
import pytest
import torch
from torch import nn

import lorakit.lora as lora
from lorakit.lora import dora
from tiny_models import tiny_bert, tiny_gpt2


def tiny_llama():
    """A 2-layer Llama (SmolLM2's shape in miniature: grouped-query attention, tied embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=True,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


# name -> (model builder, targets, task_type): Linear, GPT-2's Conv1D and Embedding layers
MODELS = {
    "bert": (tiny_bert, ["query", "value", "word_embeddings"], "SEQ_CLS"),
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj", "wte"], None),
    "llama": (tiny_llama, ["q_proj", "v_proj", "down_proj", "embed_tokens"], None),
}


def input_ids() -> torch.Tensor:
    return torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(1))


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def dora_options(name: str, **more) -> dict:
    _, targets, task_type = MODELS[name]
    options = dict(r=4, lora_alpha=8, target_modules=targets, task_type=task_type,
                   use_dora=True, init_lora_weights=False)  # fmt: skip
    return {**options, **more}


def spread_magnitudes(model: nn.Module) -> None:
    """Each magnitude vector times a random factor in [0.5, 1.5], as training would move it."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(0.5 + torch.rand(param.shape, generator=generator))


def lorakit_dora(name: str, **more) -> nn.Module:
    model = lora.inject(MODELS[name][0](), lora.LoraConfig(**dora_options(name, **more)))
    spread_magnitudes(model)
    return model.eval()


def peft_dora(name: str, **more) -> nn.Module:
    config = peft.LoraConfig(**dora_options(name, **more))
    model = peft.get_peft_model(MODELS[name][0](), config)
    spread_magnitudes(model)
    return model.eval()


# ---------------------------------------------------------------- adapters both ways
@pytest.mark.parametrize("name", MODELS)
def test_lorakit_dora_adapter_loads_in_peft_with_the_same_logits(tmp_path, name):
    ours = lorakit_dora(name)
    ids = input_ids()
    expected = logits(ours, ids)
    with lora.disable_adapters(ours):
        assert (logits(ours, ids) - expected).abs().max() > 1e-3  # the adapter does something
    lora.save_adapter(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / lora.CONFIG_NAME).read_text())["use_dora"] is True

    theirs = peft.PeftModel.from_pretrained(MODELS[name][0](), tmp_path / "ours").eval()
    assert (logits(theirs, ids) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("name", MODELS)
def test_peft_dora_adapter_loads_in_lorakit_with_the_same_logits(tmp_path, name):
    theirs = peft_dora(name)
    ids = input_ids()
    expected = logits(theirs, ids)
    theirs.save_pretrained(tmp_path / "peft", save_embedding_layers=False)
    _, tensors, _ = lora.read_adapter(tmp_path / "peft")
    assert any(key.endswith(".lora_magnitude_vector") for key in tensors)

    ours = lora.load_adapter(MODELS[name][0](), tmp_path / "peft")
    assert (logits(ours, ids) - expected).abs().max() <= 1e-5
    with lora.disable_adapters(ours):
        assert (logits(ours, ids) - expected).abs().max() > 1e-3


def test_dora_with_rslora_moves_both_ways(tmp_path):
    ids = input_ids()
    ours = lorakit_dora("llama", use_rslora=True, lora_alpha=16)
    layer = ours.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(16 / 2)
    expected = logits(ours, ids)
    lora.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    assert (logits(theirs, ids) - expected).abs().max() <= 1e-5

    theirs = peft_dora("llama", use_rslora=True, lora_alpha=16)
    theirs.save_pretrained(tmp_path / "peft", save_embedding_layers=False)
    ours = lora.load_adapter(tiny_llama(), tmp_path / "peft")
    assert (logits(ours, ids) - logits(theirs, ids)).abs().max() <= 1e-5


def test_peft_trained_dora_adapter_with_dropout_loads_in_lorakit(tmp_path):
    ids, labels = input_ids(), torch.tensor([0, 1, 1])
    theirs = peft_dora("bert", lora_dropout=0.1).train()
    optimizer = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        theirs(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    theirs.save_pretrained(tmp_path / "peft", save_embedding_layers=False)
    ours = lora.load_adapter(tiny_bert(), tmp_path / "peft")
    assert (logits(ours, ids) - logits(theirs.eval(), ids)).abs().max() <= 1e-5


def test_training_steps_match_peft_with_dropout():
    """The same start, seed and batches give the same losses and weights in both engines: the
    gradient of the magnitude, the detached norm, and the base recomputed on the dropped-out
    input in training (PEFT's rule when lora_dropout > 0)."""
    ids, labels = input_ids(), torch.tensor([0, 1, 1])
    ours = lorakit_dora("bert", lora_dropout=0.2)
    theirs = peft.get_peft_model(
        tiny_bert(), peft.LoraConfig(**dora_options("bert", lora_dropout=0.2))
    )
    peft.set_peft_model_state_dict(
        theirs, {k: v.detach().clone() for k, v in lora.adapter_state_dict(ours).items()}
    )
    losses = {}
    for engine, model in (("lorakit", ours), ("peft", theirs)):
        model.train()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        torch.manual_seed(3)
        losses[engine] = []
        for _ in range(3):
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[engine].append(loss.item())
    assert losses["lorakit"] == pytest.approx(losses["peft"], rel=1e-5, abs=1e-6)
    assert losses["lorakit"][0] != pytest.approx(losses["lorakit"][-1], rel=1e-3)  # it trained
    theirs_state = peft.get_peft_model_state_dict(theirs)
    for key, tensor in lora.adapter_state_dict(ours).items():
        assert (tensor - theirs_state[key]).abs().max() <= 1e-5, key


def test_an_untouched_dora_adapter_leaves_the_model_as_it_was():
    ids = input_ids()
    base = logits(tiny_llama(), ids)
    model = lora.inject(
        tiny_llama(), lora.LoraConfig(target_modules=MODELS["llama"][1], use_dora=True)
    )
    assert torch.equal(logits(model.eval(), ids), base)


# ---------------------------------------------------------------- merging
@pytest.mark.parametrize("name", MODELS)
def test_merge_gives_the_unmerged_outputs_and_unmerge_restores_the_base(name):
    model = lorakit_dora(name)
    ids = input_ids()
    weights = {n: layer.base_layer.weight.detach().clone() for n, layer in lora.lora_layers(model)}
    expected = logits(model, ids)
    lora.merge_adapter(model)
    assert (logits(model, ids) - expected).abs().max() <= 1e-4
    lora.unmerge_adapter(model)
    for n, layer in lora.lora_layers(model):
        assert (layer.base_layer.weight - weights[n]).abs().max() <= 1e-5, n
    assert (logits(model, ids) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("name", MODELS)
def test_merge_and_unload_writes_the_weights_peft_writes(tmp_path, name):
    ours = lorakit_dora(name)
    lora.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(MODELS[name][0](), tmp_path / "ours")
    ours_merged = dict(lora.merge_and_unload(ours).named_parameters())
    theirs_merged = dict(theirs.merge_and_unload().named_parameters())
    # lorakit unties a merged embedding from the output head (lm_head keeps the base's weight)
    assert set(theirs_merged) <= set(ours_merged)
    for key, param in theirs_merged.items():
        assert (ours_merged[key] - param).abs().max() <= 1e-5, key


def test_a_dora_adapter_merged_over_another_uses_the_unmerged_base():
    """The norm is always that of W0 + s·B·A, as in forward, whatever is merged already."""
    ids = input_ids()
    model = lorakit_dora("gpt2")
    lora.add_adapter(model, "second", lora.LoraConfig(**dora_options("gpt2")))
    spread_magnitudes(model)
    layer = model.transformer.h[0].attn.c_attn
    base = layer.base_layer.weight.detach().clone()
    layer.merge(["default", "second"])
    for name in ("default", "second"):
        norm = dora.weight_norm(base, *layer.lora_factors(name), layer.scaling[name], True)
        expected = torch.linalg.norm(base.T + layer.get_delta_weight(name).T, dim=1)
        assert (norm - expected).abs().max() <= 1e-5
    layer.unmerge()
    assert (layer.base_layer.weight - base).abs().max() <= 1e-5
    with lora.disable_adapters(model):
        assert logits(model, ids).shape == (3, 16, 97)


# ---------------------------------------------------------------- the norm and its cache
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_fast_norm_gives_the_norm_of_the_full_weight(fan_in_fan_out):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 40, generator=generator)  # out x in, or in x out when fan_in_fan_out
    out_features = 40 if fan_in_fan_out else 48
    in_features = 48 if fan_in_fan_out else 40
    A = torch.randn(6, in_features, generator=generator)
    B = torch.randn(out_features, 6, generator=generator) * 0.3
    full = (weight.T if fan_in_fan_out else weight) + 1.5 * B @ A
    expected = torch.linalg.norm(full, dim=1)
    norm = dora.weight_norm(weight, A, B, 1.5, fan_in_fan_out)
    assert (norm - expected).abs().max() <= 1e-5 * expected.max()


def test_the_norm_is_cached_in_eval_and_recomputed_when_weights_change(monkeypatch):
    ids = input_ids()
    model = lorakit_dora("llama")
    calls = []
    fast = dora.weight_norm
    monkeypatch.setattr(dora, "weight_norm", lambda *a, **k: calls.append(1) or fast(*a, **k))
    first = logits(model, ids)
    computed = len(calls)
    assert computed == len(list(lora.lora_layers(model)))
    assert torch.equal(logits(model, ids), first) and len(calls) == computed  # from the cache

    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B["default"].weight.mul_(2)  # a change the cache must see
    changed = logits(model, ids)
    assert len(calls) == computed + 1
    fresh = lora.load_adapter(tiny_llama(), _saved(model))
    assert (logits(fresh, ids) - changed).abs().max() <= 1e-6

    model.train()
    assert all(not layer._dora_norms.kept for _, layer in lora.lora_layers(model))
    before = len(calls)
    model(input_ids=ids)  # training computes the norm on every step
    model(input_ids=ids)
    assert len(calls) == before + 2 * computed


def _saved(model: nn.Module):
    import tempfile
    from pathlib import Path

    folder = Path(tempfile.mkdtemp()) / "adapter"
    lora.save_adapter(model, folder)
    return folder


def test_magnitude_is_a_trainable_adapter_parameter_under_peft_names():
    model = lorakit_dora("gpt2")
    names = set(lora.adapter_parameters(model))
    assert "transformer.h.0.attn.c_attn.lora_magnitude_vector.default" in names
    assert "transformer.wte.lora_magnitude_vector.default" in names
    layer = model.transformer.h[0].attn.c_attn
    assert layer.lora_magnitude_vector["default"].shape == (96,)
    assert model.transformer.wte.lora_magnitude_vector["default"].shape == (32,)
    lora.set_adapter(model, "default")
    assert layer.lora_magnitude_vector["default"].requires_grad
    keys = set(lora.adapter_state_dict(model))
    assert "base_model.model.transformer.h.0.attn.c_attn.lora_magnitude_vector" in keys


def test_dora_under_bf16_autocast_stays_close_to_fp32():
    from lorakit.nn.frozen_base import bf16_frozen_base

    ids = input_ids()
    model = lorakit_dora("llama")
    expected = logits(model, ids)
    with bf16_frozen_base(model), torch.autocast("cpu", dtype=torch.bfloat16):
        got = logits(model, ids)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
    assert (got.float() - expected).abs().max() <= 0.05 * expected.abs().max()
    assert model.model.layers[0].self_attn.q_proj.lora_magnitude_vector["default"].grad is not None
    assert torch.equal(logits(model.eval(), ids), expected)  # the fp32 base is back, bit for bit


# ---------------------------------------------------------------- config and inspect
def test_use_dora_is_a_config_key_and_shows_in_inspect(tmp_path):
    from lorakit.config import load_config
    from lorakit.inspect import describe_adapter, inspect
    from lorakit.recipes import recipe_path

    overrides = ["lora.use_dora=true", "lora.use_rslora=true"]
    config = load_config(recipe_path("sentiment"), overrides)
    assert config.lora.use_dora is True
    assert config.lora.lora_config().use_dora is True
    assert lora.LoraConfig(use_dora=True).to_dict()["use_dora"] is True
    with pytest.raises(lora.LoraConfigError, match="use_dora must be True or False"):
        lora.LoraConfig(use_dora="yes")

    lora.save_adapter(lorakit_dora("gpt2"), tmp_path / "adapter")
    info = describe_adapter(tmp_path / "adapter")
    assert info["use_dora"] is True and info["use_rslora"] is False
    text = inspect(tmp_path / "adapter")
    assert "use_dora" in text and "True" in text


def test_the_server_counts_the_magnitude_as_the_adapter_s_not_the_base_s(tmp_path):
    from lorakit.serve.registry import base_tensors

    lora.save_adapter(lorakit_dora("bert"), tmp_path / "adapter")
    _, tensors, _ = lora.read_adapter(tmp_path / "adapter")
    assert any("lora_magnitude_vector" in key for key in tensors)
    assert base_tensors(tiny_bert(), ["classifier"], tensors) == []


@pytest.mark.parametrize("engine", ["lorakit", "peft"])
def test_lora_use_dora_trains_dora_in_either_engine_and_loads_in_the_other(tmp_path, engine):
    from lorakit.config import LoraSection
    from lorakit.train import engines

    ids = input_ids()
    section = LoraSection(engine=engine, r=4, target_modules=["c_attn"], use_dora=True,
                          init_lora_weights=False)  # fmt: skip
    model = engines.apply_lora(tiny_gpt2(), section)
    assert any("lora_magnitude_vector" in n for n, p in model.named_parameters() if p.requires_grad)
    spread_magnitudes(model)
    expected = logits(model.eval(), ids)
    engines.save(model, tmp_path)
    other = "peft" if engine == "lorakit" else "lorakit"
    loaded = engines.load(tiny_gpt2(), tmp_path, engine=other).eval()
    assert (logits(loaded, ids) - expected).abs().max() <= 1e-5
