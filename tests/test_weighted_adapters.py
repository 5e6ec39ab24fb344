"""add_weighted_adapter: adapters combined into one, against PEFT 0.21.2 and against the maths.

PEFT is the oracle where it is right; where lorakit differs, a test here shows from the
definition which one is right. What PEFT 0.21.2 still does (each checked below):
- rsLoRA: the new adapter copies the first one's use_rslora with r = lora_alpha = new rank, so
  its update comes out √r too large (`test_rslora_adapters_combine_at_their_own_scale`);
- rank_pattern: dropped from the new config, so a linear combination of adapters that have one
  holds tensors its own config does not describe, and its saved file does not load
  (`test_rank_pattern_survives_a_linear_combination`);
- linear: combines A and B separately, which gives cross terms B_i·A_j between different
  adapters, and (Σ√w_i)² instead of Σ w_i for an adapter with itself. PEFT's docs call linear
  "a very rough approximation"; lorakit keeps PEFT's definition, and `cat` (or `svd`) is the exact
  sum (`test_linear_of_different_adapters_has_cross_terms_cat_has_none`).
"""

import json
import math
import re

import peft
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lorakit
import lorakit.lora as lora
from lorakit.cli import main
from lorakit.lora.arithmetic import COMBINATION_TYPES, merge_tensors
from tiny_models import tiny_bert, tiny_gpt2, tiny_llama

MODELS = {
    "bert": (tiny_bert, ["query", "value"]),
    "gpt2": (tiny_gpt2, ["c_attn", "c_fc"]),
    "llama": (tiny_llama, ["q_proj", "v_proj", "down_proj"]),
}
DENSITY = {t: 0.5 for t in COMBINATION_TYPES if t not in ("cat", "linear", "svd")}
TOKENS = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(1))


def trained_adapters(make, targets, configs=None, seed=0):
    """A lorakit model with adapters "a" and "b" as training leaves them (B no longer zero)."""
    configs = configs or [{}, {}]
    model = make()
    for name, options in zip("ab", configs, strict=True):
        torch.manual_seed(seed + ord(name))
        config = lora.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": targets, **options})
        if lora.configs(model):
            lora.add_adapter(model, name, config)
        else:
            lora.inject(model, config, adapter_name=name)
    with torch.no_grad():
        for name, param in lora.adapter_parameters(model).items():
            if "lora_B" in name:
                param.normal_(generator=torch.Generator().manual_seed(len(name)))
    return model


def peft_copy(make, model):
    """The same adapters, tensor for tensor, on a PEFT model of the same base."""
    theirs = None
    for name, config in lora.configs(model).items():
        fields = {k: v for k, v in config.to_dict().items() if k not in ("extra",)}
        if theirs is None:
            theirs = peft.get_peft_model(make(), peft.LoraConfig(**fields), adapter_name=name)
        else:
            theirs.add_adapter(name, peft.LoraConfig(**fields))
    state = {f"base_model.model.{k}": v for k, v in model.state_dict().items()}
    assert not theirs.load_state_dict(state, strict=False).unexpected_keys
    return theirs


def lora_tensors(model, name, prefix=""):
    return {
        k.removeprefix(prefix): v
        for k, v in model.state_dict().items()
        if f".{name}." in k and "lora_" in k
    }


def delta(model, path, name):
    return model.get_submodule(path).get_delta_weight(name)


# ---------------------------------------------------------------- the same as PEFT
@pytest.mark.parametrize("combination_type", COMBINATION_TYPES)
@pytest.mark.parametrize("model_name", MODELS)
def test_lorakit_combination_equals_peft(model_name, combination_type):
    """Bit for bit; dare's masks too, with torch seeded alike (the new adapter's own start draws
    what PEFT's draws, then the masks come in the same order)."""
    make, targets = MODELS[model_name]
    ours = trained_adapters(make, targets)
    theirs = peft_copy(make, ours)
    options = dict(density=DENSITY.get(combination_type))
    torch.manual_seed(7)
    lora.add_weighted_adapter(ours, ["a", "b"], [0.7, -0.4], "ab", combination_type, **options)
    torch.manual_seed(7)
    theirs.add_weighted_adapter(["a", "b"], [0.7, -0.4], "ab", combination_type, **options)
    expected = lora_tensors(theirs, "ab", "base_model.model.")
    got = lora_tensors(ours, "ab")
    assert got.keys() == expected.keys()
    for key, tensor in got.items():
        assert torch.equal(tensor, expected[key]), key
    theirs.set_adapter("ab")
    lora.set_adapter(ours, "ab")
    with torch.no_grad():
        assert torch.equal(ours(input_ids=TOKENS).logits, theirs(input_ids=TOKENS).logits)


@pytest.mark.parametrize("combination_type", ["cat", "svd"])
def test_mixed_ranks_combine_with_cat_and_svd_as_in_peft(combination_type):
    make, targets = MODELS["gpt2"]
    ours = trained_adapters(make, targets, [{"r": 4}, {"r": 2, "lora_alpha": 3}])
    theirs = peft_copy(make, ours)
    lora.add_weighted_adapter(ours, ["a", "b"], [1.0, 0.5], "ab", combination_type)
    theirs.add_weighted_adapter(["a", "b"], [1.0, 0.5], "ab", combination_type)
    expected = lora_tensors(theirs, "ab", "base_model.model.")
    for key, tensor in lora_tensors(ours, "ab").items():
        assert torch.equal(tensor, expected[key]), key


def test_factor_wise_types_need_equal_ranks():
    model = trained_adapters(*MODELS["gpt2"], [{"r": 4}, {"r": 2}])
    with pytest.raises(lora.LoraError, match="same r.*use 'cat' or 'svd'"):
        lora.add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "ab", "linear")


# ---------------------------------------------------------------- where PEFT 0.21.2 errs
def test_rslora_adapters_combine_at_their_own_scale():
    make, targets = MODELS["bert"]
    ours = trained_adapters(make, targets, [{"use_rslora": True}, {"use_rslora": True}])
    theirs = peft_copy(make, ours)
    lora.add_weighted_adapter(ours, ["a", "b"], [1.0, 1.0], "ab", "cat")
    theirs.add_weighted_adapter(["a", "b"], [1.0, 1.0], "ab", "cat")
    path = "bert.encoder.layer.0.attention.self.query"
    exact = delta(ours, path, "a") + delta(ours, path, "b")  # cat's definition: Σ w_i·ΔW_i
    assert torch.allclose(delta(ours, path, "ab"), exact, atol=1e-6)
    peft_delta = theirs.get_submodule(f"base_model.model.{path}").get_delta_weight("ab")
    assert torch.allclose(peft_delta, math.sqrt(8) * exact, atol=1e-5)  # PEFT: √r too large


def test_rank_pattern_survives_a_linear_combination(tmp_path):
    make, targets = MODELS["gpt2"]
    pattern = {"rank_pattern": {"c_fc": 2}}
    ours = trained_adapters(make, targets, [pattern, pattern])
    theirs = peft_copy(make, ours)
    lora.add_weighted_adapter(ours, ["a", "b"], [0.6, 0.4], "ab", "linear")
    theirs.add_weighted_adapter(["a", "b"], [0.6, 0.4], "ab", "linear")
    lora.set_adapter(ours, "ab")
    with torch.no_grad():
        expected = ours(input_ids=TOKENS).logits
    lora.save_adapter(ours, tmp_path / "ours", adapter_name="ab")
    for loaded in (
        lora.load_adapter(make(), tmp_path / "ours"),
        peft.PeftModel.from_pretrained(make(), str(tmp_path / "ours")),
    ):
        with torch.no_grad():
            assert (loaded(input_ids=TOKENS).logits - expected).abs().max() <= 1e-5
    assert theirs.peft_config["ab"].rank_pattern == {}  # PEFT forgets the pattern
    theirs.save_pretrained(tmp_path / "peft", selected_adapters=["ab"])
    with pytest.raises(RuntimeError, match="size mismatch"):
        peft.PeftModel.from_pretrained(make(), str(tmp_path / "peft" / "ab"))


def test_linear_of_different_adapters_has_cross_terms_cat_has_none():
    make, targets = MODELS["bert"]
    model = trained_adapters(make, targets)
    path = "bert.encoder.layer.0.attention.self.value"
    lora.add_weighted_adapter(model, ["a", "b"], [0.5, 0.5], "linear", "linear")
    lora.add_weighted_adapter(model, ["a", "b"], [0.5, 0.5], "cat", "cat")
    exact = 0.5 * delta(model, path, "a") + 0.5 * delta(model, path, "b")
    assert torch.allclose(delta(model, path, "cat"), exact, atol=1e-6)
    layer = model.get_submodule(path)
    s = layer.scaling["a"]
    A, B = {n: layer.lora_A[n].weight for n in "ab"}, {n: layer.lora_B[n].weight for n in "ab"}
    cross = 0.5 * s * (B["a"] @ A["b"] + B["b"] @ A["a"])
    assert torch.allclose(delta(model, path, "linear"), exact + cross, atol=1e-5)


def test_linear_of_an_adapter_with_itself():
    """[1, -1] gives no update (the sign sits on A). [0.5, 0.5] gives (√.5 + √.5)² = 2 times
    the update, not 1 (the factor-wise definition, in PEFT as here); cat gives 1 time."""
    model = trained_adapters(*MODELS["bert"])
    path = "bert.encoder.layer.1.attention.self.query"
    lora.add_weighted_adapter(model, ["a", "a"], [1.0, -1.0], "zero", "linear")
    assert not delta(model, path, "zero").abs().max()
    lora.add_weighted_adapter(model, ["a", "a"], [0.5, 0.5], "twice", "linear")
    lora.add_weighted_adapter(model, ["a", "a"], [0.5, 0.5], "once", "cat")
    assert torch.allclose(delta(model, path, "twice"), 2 * delta(model, path, "a"), atol=1e-6)
    assert torch.allclose(delta(model, path, "once"), delta(model, path, "a"), atol=1e-6)


def test_a_module_saved_whole_keeps_its_trained_copy():
    """PEFT gives the new adapter a fresh copy of the base's module; lorakit the trained one."""
    model = trained_adapters(tiny_bert, ["query"], [{"modules_to_save": ["classifier"]}, {}])
    with torch.no_grad():
        model.classifier.modules_to_save["a"].weight.add_(1.0)
    lora.add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "ab", "cat")
    saved = model.classifier.modules_to_save
    assert torch.equal(saved["ab"].weight, saved["a"].weight)


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(weights=[1.0]), "1 weight.*2 adapter.*one weight per adapter"),
        (dict(combination_type="average"), "unknown combination type 'average'; use one of"),
        (dict(combination_type="ties"), "needs a density in \\(0, 1\\]"),
        (dict(combination_type="ties", density=1.5), "needs a density in \\(0, 1\\]"),
        (dict(combination_type="dare_linear", density=0), "needs a density in \\(0, 1\\]"),
        (dict(majority_sign_method="mean", combination_type="ties", density=0.5), "'total' or"),
        (dict(adapter_name="a"), "already has an adapter named 'a'"),
    ],
)
def test_bad_arguments_are_one_line_errors(arguments, message):
    model = trained_adapters(*MODELS["gpt2"])
    call = {"adapters": ["a", "b"], "weights": [1.0, 1.0], "adapter_name": "ab", **arguments}
    with pytest.raises(lora.LoraError, match=message) as err:
        lora.add_weighted_adapter(model, **call)
    assert "\n" not in str(err.value)


def test_pissa_adapters_are_combined_once_converted():
    model = tiny_gpt2()
    lora.inject(model, lora.LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights="pissa"))
    lora.add_adapter(model, "b", lora.LoraConfig(r=2, target_modules=["c_attn"]))
    with pytest.raises(lora.LoraError, match="convert_to_lora=True"):
        lora.add_weighted_adapter(model, ["default", "b"], [1.0, 1.0], "ab", "cat")


def test_exported_from_lorakit():
    assert lorakit.add_weighted_adapter is lora.add_weighted_adapter


# ---------------------------------------------------------------- adapter folders and the CLI
def saved_pair(tmp_path, make, targets):
    model = trained_adapters(make, targets)
    for name in "ab":
        lora.save_adapter(model, tmp_path / name, adapter_name=name)
    return model


@pytest.mark.parametrize("combination_type", ["cat", "svd", "linear", "ties", "magnitude_prune"])
def test_folders_combine_as_the_model_does(tmp_path, combination_type):
    make, targets = MODELS["llama"]
    model = saved_pair(tmp_path, make, targets)
    density = DENSITY.get(combination_type)
    lora.add_weighted_adapter_files(
        [tmp_path / "a", tmp_path / "b"], [0.7, 0.3], tmp_path / "ab", combination_type,
        density=density,
    )  # fmt: skip
    lora.add_weighted_adapter(
        model, ["a", "b"], [0.7, 0.3], "ab", combination_type, density=density
    )
    lora.set_adapter(model, "ab")
    with torch.no_grad():
        expected = model(input_ids=TOKENS).logits
        for loaded in (
            lora.load_adapter(make(), tmp_path / "ab"),
            peft.PeftModel.from_pretrained(make(), str(tmp_path / "ab")),
        ):
            assert (loaded(input_ids=TOKENS).logits - expected).abs().max() <= 1e-5


def test_cli_merge_adapters_writes_an_adapter_folder(tmp_path, capsys):
    make, targets = MODELS["gpt2"]
    saved_pair(tmp_path, make, targets)
    code = main([
        "merge-adapters", str(tmp_path / "a"), str(tmp_path / "b"), "--weights", "0.5,0.5",
        "--method", "ties", "--density", "0.5", "--out", str(tmp_path / "ab"),
    ])  # fmt: skip
    assert code == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "ab")
    config = json.loads((tmp_path / "ab" / lora.CONFIG_NAME).read_text())
    assert config["r"] == 4 and not config["use_rslora"]
    peft.PeftModel.from_pretrained(make(), str(tmp_path / "ab"))
    lora.load_adapter(make(), tmp_path / "ab")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--weights", "0.5"], "1 weight\\(s\\) for 2 adapter"),
        (["--weights", "0.5,x"], "--weights '0.5,x': give one number per adapter"),
        (["--weights", "1,1", "--method", "mean"], "unknown combination type 'mean'"),
        (["--weights", "1,1", "--method", "ties", "--density", "2"], "density in \\(0, 1\\]"),
    ],
)
def test_cli_bad_input_is_one_line(tmp_path, capsys, extra, message):
    saved_pair(tmp_path, *MODELS["gpt2"])
    code = main(["merge-adapters", str(tmp_path / "a"), str(tmp_path / "b"),
                 "--out", str(tmp_path / "ab"), *extra])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and re.search(message, err), err


def test_adapters_of_different_bases_are_refused(tmp_path, capsys):
    model = trained_adapters(*MODELS["gpt2"])
    lora.save_adapter(model, tmp_path / "a", adapter_name="a", base_model_name_or_path="gpt2")
    lora.save_adapter(model, tmp_path / "b", adapter_name="b", base_model_name_or_path="other")
    code = main(["merge-adapters", str(tmp_path / "a"), str(tmp_path / "b"),
                 "--weights", "1,1", "--out", str(tmp_path / "ab")])  # fmt: skip
    assert code == 2
    assert "different base models" in capsys.readouterr().err


# ---------------------------------------------------------------- properties of the arithmetic
def one_layer(shape, ranks, alphas, rslora=False):
    """A model of one Linear layer (out × in = shape) with adapters "a0", "a1", ... of `ranks`."""
    torch.manual_seed(sum(shape) + sum(ranks))
    model = nn.Sequential(nn.Linear(shape[1], shape[0]))
    for i, (r, alpha) in enumerate(zip(ranks, alphas, strict=True)):
        config = lora.LoraConfig(
            r=r, lora_alpha=alpha, target_modules=["0"], init_lora_weights=False, use_rslora=rslora
        )
        lora.add_adapter(model, f"a{i}", config)
    return model


shapes = st.tuples(st.integers(2, 12), st.integers(2, 12))
weights = st.floats(-2, 2, allow_nan=False).filter(lambda w: abs(w) > 1e-3)
few = dict(max_examples=25, deadline=None)


@settings(**few)
@given(shapes, st.lists(st.integers(1, 5), min_size=1, max_size=3), st.data(), st.booleans())
def test_cat_is_the_weighted_sum_of_the_updates(shape, ranks, data, rslora):
    ws = data.draw(st.lists(weights, min_size=len(ranks), max_size=len(ranks)))
    alphas = data.draw(st.lists(st.integers(1, 16), min_size=len(ranks), max_size=len(ranks)))
    model = one_layer(shape, ranks, alphas, rslora)
    names = [f"a{i}" for i in range(len(ranks))]
    combination = "cat" if len(ranks) > 1 else "linear"
    lora.add_weighted_adapter(model, names, ws, "sum", combination)
    layer = model[0]
    exact = sum(w * layer.get_delta_weight(n) for n, w in zip(names, ws, strict=True))
    assert torch.allclose(layer.get_delta_weight("sum"), exact, atol=1e-5)
    assert layer.r["sum"] == (sum(ranks) if len(ranks) > 1 else ranks[0])


@settings(**few)
@given(shapes, st.integers(1, 5), weights, st.floats(0.1, 4))
def test_linear_scales_as_the_weight(shape, r, w, c):
    """One adapter: linear(w) = w·ΔW, so linear(c·w) = c·linear(w)."""
    model = one_layer(shape, [r], [8])
    lora.add_weighted_adapter(model, ["a0"], [w], "w", "linear")
    lora.add_weighted_adapter(model, ["a0"], [c * w], "cw", "linear")
    layer = model[0]
    assert torch.allclose(layer.get_delta_weight("w"), w * layer.get_delta_weight("a0"), atol=1e-5)
    assert torch.allclose(layer.get_delta_weight("cw"), c * layer.get_delta_weight("w"), atol=1e-5)


@settings(**few)
@given(shapes, st.lists(st.integers(1, 3), min_size=2, max_size=3), st.data())
def test_svd_reproduces_the_sum_up_to_truncation(shape, ranks, data):
    ws = data.draw(st.lists(weights, min_size=len(ranks), max_size=len(ranks)))
    model = one_layer(shape, ranks, [4] * len(ranks))
    names = [f"a{i}" for i in range(len(ranks))]
    layer = model[0]
    exact = sum(w * layer.get_delta_weight(n) for n, w in zip(names, ws, strict=True))
    full = min(sum(ranks), *shape)
    lora.add_weighted_adapter(model, names, ws, "full", "svd", svd_rank=full)
    assert torch.allclose(layer.get_delta_weight("full"), exact, atol=1e-4)
    k = max(1, full - 1)
    lora.add_weighted_adapter(model, names, ws, "cut", "svd", svd_rank=k)
    singular = torch.linalg.svdvals(exact)
    error = torch.linalg.matrix_norm(layer.get_delta_weight("cut") - exact, ord=2)
    assert error <= singular[k] + 1e-4 if k < len(singular) else error <= 1e-4  # Eckart-Young


@settings(**few)
@given(st.lists(st.integers(1, 6), min_size=2, max_size=2), st.integers(2, 4), st.data())
def test_ties_at_density_one_with_agreeing_signs_is_the_mean(shape, count, data):
    """TIES keeps every entry at density 1; where all signs agree each entry is the disjoint
    mean Σ w_i·t_i / n (Yadav et al. 2023); magnitude_prune and dare at density 1 are linear."""
    sign = data.draw(st.sampled_from([1.0, -1.0]))
    tensors = [sign * (torch.rand(shape, generator=torch.Generator().manual_seed(i)) + 0.1)
               for i in range(count)]  # fmt: skip
    ws = torch.tensor(data.draw(st.lists(st.floats(0.1, 2), min_size=count, max_size=count)))
    weighted = sum(w * t for w, t in zip(ws, tensors, strict=True))
    for method in ("ties", "dare_ties"):
        merged = merge_tensors(tensors, ws, method, density=1.0)
        assert torch.allclose(merged, weighted / count, atol=1e-6)
    for method in ("linear", "magnitude_prune", "dare_linear"):
        assert torch.allclose(merge_tensors(tensors, ws, method, density=1.0), weighted, atol=1e-6)


@settings(**few)
@given(st.integers(4, 40), st.floats(0.05, 1.0))
def test_magnitude_pruning_keeps_the_largest_share(size, density):
    tensor = torch.randn(size, generator=torch.Generator().manual_seed(size))
    kept = merge_tensors([tensor], torch.ones(1), "magnitude_prune", density=density)
    k = int(density * size) if density < 1 else size
    assert int((kept != 0).sum()) == k
    if 0 < k < size:
        assert kept.abs()[kept != 0].min() >= tensor.abs()[kept == 0].max()


def test_merge_adapters_takes_run_directories_through_the_api(tmp_path, monkeypatch):
    """A run directory stands for its adapter/ folder; the command is a call of lorakit.api."""
    from lorakit import api

    model = trained_adapters(*MODELS["gpt2"])
    for name in "ab":
        lora.save_adapter(model, tmp_path / f"run-{name}" / "adapter", adapter_name=name)
    calls = []
    original = api.merge_adapters
    monkeypatch.setattr(api, "merge_adapters", lambda *a, **k: calls.append(k) or original(*a, **k))
    runs = [str(tmp_path / "run-a"), str(tmp_path / "run-b")]
    assert main(["merge-adapters", *runs, "--weights", "1,0.5", "--method", "cat",
                 "--out", str(tmp_path / "ab")]) == 0  # fmt: skip
    assert calls[0]["method"] == "cat" and calls[0]["weights"] == [1.0, 0.5]
    assert json.loads((tmp_path / "ab" / lora.CONFIG_NAME).read_text())["r"] == 8
