"""PiSSA and OLoRA starts (`init_lora_weights`), and their conversion to plain LoRA, against PEFT."""

import json
import re
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file

import lorakit.lora as lora
from lorakit.config import ConfigError, load_config
from lorakit.lora.initialisation import INITIAL, UNTOUCHED
from tiny_models import tiny_bert, tiny_gpt2

BERT_TARGETS = ["query", "value", "dense"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]
TOKENS = torch.randint(0, 97, (3, 12), generator=torch.Generator().manual_seed(1))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def both_engines(make, init, targets, seed=3, **options):
    """lorakit's and PEFT's model with the same base weights and the same seed."""
    settings = dict(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=init, **options)
    torch.manual_seed(seed)
    ours = lora.inject(make(), lora.LoraConfig(**settings))
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(make(), peft.LoraConfig(**settings))
    return ours, theirs


def peft_tensors(model) -> dict[str, torch.Tensor]:
    return {k.removeprefix("base_model.model."): v for k, v in model.state_dict().items()}


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_lorakit_start_equals_peft_start(init):
    """A, B and the residual base weight are PEFT's, bit for bit (pissa_niter's randomized SVD
    draws from torch's generator in the same order, so the same seed gives the same factors)."""
    ours, theirs = both_engines(tiny_bert, init, BERT_TARGETS)
    expected = peft_tensors(theirs)
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
@pytest.mark.parametrize("make, targets", [(tiny_bert, BERT_TARGETS), (tiny_gpt2, GPT2_TARGETS)])
def test_the_model_computes_as_before_right_after_the_start(make, targets, init):
    torch.manual_seed(0)
    base = logits(make())
    torch.manual_seed(0)
    model = lora.inject(
        make(), lora.LoraConfig(r=4, target_modules=targets, init_lora_weights=init)
    )
    assert (logits(model) - base).abs().max() <= 1e-5
    with lora.disable_adapters(model):  # the residual alone is not the base: W0 moved into B·A
        assert (logits(model) - base).abs().max() > 1e-3


def test_pissa_on_gpt2_conv1d_equals_peft():
    ours, theirs = both_engines(tiny_gpt2, "pissa", GPT2_TARGETS)
    expected = peft_tensors(theirs)
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_peft_olora_takes_gpt2_conv1d_weights_the_wrong_way_round():
    """PEFT 0.21.2's olora_init decomposes the stored Conv1D matrix (in × out) as if it were
    out × in: A and B get each other's shapes, and the model no longer runs (c_attn: 32 -> 96).
    lorakit decomposes W0 itself, and the model computes as before (the test above)."""
    _, theirs = both_engines(tiny_gpt2, "olora", ["c_attn"])
    layer = theirs.base_model.model.transformer.h[0].attn.c_attn
    assert tuple(layer.lora_A["default"].weight.shape) == (4, 96)  # should be r × in = 4 × 32
    with pytest.raises(RuntimeError):
        logits(theirs)


def test_embeddings_keep_the_ordinary_start_as_in_peft():
    ours, theirs = both_engines(tiny_gpt2, "pissa", ["wte", "c_attn"])
    embedding = ours.transformer.wte
    assert not embedding.lora_embedding_A["default"].abs().sum()  # A = 0: no change
    assert not hasattr(embedding, UNTOUCHED)
    assert (logits(ours) - logits(theirs)).abs().max() <= 1e-5


def train_a_little(model, steps=3):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.5)
    for _ in range(steps):
        loss = model(input_ids=TOKENS, labels=TOKENS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_converted_adapter_loads_in_peft_on_the_untouched_base(tmp_path, init):
    torch.manual_seed(0)
    model = lora.inject(tiny_gpt2(), lora.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], init_lora_weights=init,
    ))  # fmt: skip
    expected = logits(train_a_little(model))
    lora.save_adapter(model, tmp_path, convert_to_lora=True)

    saved = json.loads((tmp_path / lora.CONFIG_NAME).read_text())
    assert (saved["r"], saved["lora_alpha"], saved["init_lora_weights"]) == (8, 16, True)
    with warnings.catch_warnings():  # the file records the fingerprint of the untouched base
        warnings.simplefilter("error", lora.FingerprintWarning)
        loaded = lora.load_adapter(tiny_gpt2(), tmp_path)
    assert (logits(loaded) - expected).abs().max() <= 1e-5
    in_peft = peft.PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path)).eval()
    assert (logits(in_peft) - expected).abs().max() <= 1e-5


def test_conversion_from_the_initial_folder_equals_peft(tmp_path):
    """PEFT's route: the adapter saved right after the start, then
    save_pretrained(path_initial_model_for_weight_conversion=...). lorakit takes the same
    option and writes the same tensors and config; PEFT's converted file loads in lorakit."""
    ours, theirs = both_engines(tiny_bert, "pissa", ["query", "value"])
    lora.save_adapter(ours, tmp_path / "ours-initial")
    theirs.save_pretrained(tmp_path / "peft-initial")
    with torch.no_grad():  # the same "training" for both
        for model in (ours, theirs):
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.add_(0.01 * torch.ones_like(param))
    lora.save_adapter(
        ours, tmp_path / "ours", path_initial_model_for_weight_conversion=tmp_path / "ours-initial"
    )
    theirs.save_pretrained(
        tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "peft-initial")
    )
    ours_file = load_file(tmp_path / "ours" / lora.WEIGHTS_NAME)
    peft_file = load_file(tmp_path / "peft" / lora.WEIGHTS_NAME)
    lora_keys = {k for k in ours_file if ".lora_" in k}
    assert lora_keys == set(peft_file)  # PEFT's conversion keeps the LoRA tensors alone
    for key in lora_keys:
        assert torch.equal(ours_file[key], peft_file[key]), key
    for field in ("r", "lora_alpha", "init_lora_weights"):
        ours_config = json.loads((tmp_path / "ours" / lora.CONFIG_NAME).read_text())
        peft_config = json.loads((tmp_path / "peft" / lora.CONFIG_NAME).read_text())
        assert ours_config[field] == peft_config[field], field
    # lorakit's own record of the start gives the same file as the initial folder
    lora.save_adapter(ours, tmp_path / "recorded", convert_to_lora=True)
    recorded = load_file(tmp_path / "recorded" / lora.WEIGHTS_NAME)
    assert all(torch.equal(recorded[k], ours_file[k]) for k in ours_file)

    torch.manual_seed(3)
    base = tiny_bert()
    batch = {"input_ids": TOKENS % 120}
    with torch.no_grad():
        expected = ours(**batch).logits
        loaded = lora.load_adapter(base, tmp_path / "peft")
        assert (loaded(**batch).logits - expected).abs().max() <= 1e-5


def test_rslora_with_patterns_converts_with_the_same_scaling(tmp_path):
    """PEFT refuses this conversion (alpha_pattern would need √2, not 2); lorakit scales it."""
    torch.manual_seed(0)
    config = lora.LoraConfig(
        r=4, lora_alpha=8, use_rslora=True, target_modules=["c_attn", "c_fc"],
        rank_pattern={"c_fc": 2}, alpha_pattern={"c_fc": 3}, init_lora_weights="pissa",
    )  # fmt: skip
    model = train_a_little(lora.inject(tiny_gpt2(), config))
    lora.save_adapter(model, tmp_path, convert_to_lora=True)
    loaded = lora.load_adapter(tiny_gpt2(), tmp_path)
    assert (logits(loaded) - logits(model)).abs().max() <= 1e-5


def test_an_unconverted_pissa_adapter_loads_as_peft_loads_it(tmp_path):
    """Saved as it is (PEFT's default), the file says "pissa": loading runs the same exact SVD on
    the untouched base, then takes the trained A and B, in PEFT and lorakit alike."""
    torch.manual_seed(0)
    model = lora.inject(
        tiny_gpt2(), lora.LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights="pissa")
    )
    expected = logits(train_a_little(model))
    lora.save_adapter(model, tmp_path)
    assert (logits(lora.load_adapter(tiny_gpt2(), tmp_path)) - expected).abs().max() <= 1e-5
    in_peft = peft.PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path)).eval()
    assert (logits(in_peft) - expected).abs().max() <= 1e-5


def test_an_unconverted_randomized_pissa_adapter_is_refused(tmp_path):
    torch.manual_seed(0)
    config = lora.LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights="pissa_niter_2")
    lora.save_adapter(lora.inject(tiny_gpt2(), config), tmp_path)
    with pytest.raises(lora.AdapterFileError, match="cannot be rebuilt.*convert_to_lora=True"):
        lora.load_adapter(tiny_gpt2(), tmp_path)


def test_the_layer_keeps_what_the_conversion_needs():
    torch.manual_seed(0)
    base = tiny_gpt2()
    before = base.transformer.h[0].attn.c_attn.weight.detach().clone()
    model = lora.inject(
        base, lora.LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights="olora")
    )
    layer = model.transformer.h[0].attn.c_attn
    assert torch.equal(getattr(layer, UNTOUCHED), before)
    A0, B0 = getattr(layer, INITIAL)["default"]
    assert torch.equal(A0, layer.lora_A["default"].weight)
    assert not torch.equal(layer.base_layer.weight, before)


@pytest.mark.parametrize("value", ["pisa", "pissa_niter_", "pissa_niter_x", "OLoRA", "corda"])
def test_unknown_starts_are_one_line_errors_naming_the_allowed_values(value):
    with pytest.raises(lora.LoraConfigError) as err:
        lora.LoraConfig(init_lora_weights=value)
    message = str(err.value)
    assert "\n" not in message
    assert all(name in message for name in ("'gaussian'", "'pissa'", "'pissa_niter_N'", "'olora'"))


def test_the_start_is_a_set_key(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('recipe = "sentiment"\n')
    config = load_config(path, ["lora.init_lora_weights=pissa_niter_4"])
    assert config.lora.init_lora_weights == "pissa_niter_4"
    assert load_config(path, ["lora.init_lora_weights=true"]).lora.init_lora_weights is True
    with pytest.raises(ConfigError, match="init_lora_weights"):
        load_config(path, ["lora.init_lora_weights=svd"])


def test_inspect_shows_how_an_adapter_started(tmp_path):
    from lorakit.inspect import inspect

    torch.manual_seed(0)
    config = lora.LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights="olora")
    model = lora.inject(tiny_gpt2(), config)
    lora.save_adapter(model, tmp_path / "as-is")
    lora.save_adapter(model, tmp_path / "converted", convert_to_lora=True)
    assert re.search(r"init_lora_weights +olora\n", inspect(tmp_path / "as-is"))
    assert re.search(r"init_lora_weights +True\n", inspect(tmp_path / "converted"))


def test_a_run_saves_its_pissa_adapter_converted(tmp_path):
    """What a run does (train.engines): the adapter folder loads on the untouched base."""
    from lorakit.config import LoraSection
    from lorakit.train import engines

    section = LoraSection(r=4, target_modules=["c_attn"], init_lora_weights="pissa_niter_2")
    torch.manual_seed(0)
    model = train_a_little(engines.apply_lora(tiny_gpt2(), section))
    engines.save(model, tmp_path)
    assert json.loads((tmp_path / lora.CONFIG_NAME).read_text())["init_lora_weights"] is True
    for engine in ("lorakit", "peft"):
        loaded = engines.load(tiny_gpt2(), tmp_path, engine).eval()
        assert (logits(loaded) - logits(model)).abs().max() <= 1e-5
