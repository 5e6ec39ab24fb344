"""The engine on whole models: parameter counts, merge and unmerge, named adapters, init
options, target matching, adapter files and their errors, fingerprints, rank and alpha patterns."""

import json
import time
import warnings

import pytest
import torch
from torch import nn

import lorakit.lora as lora
from lorakit.lora.patterns import MATCH_SECONDS
from tiny_models import tiny_bert, tiny_gpt2


def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return {"input_ids": torch.randint(0, 120, (4, 12), generator=g)}


def out(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch()).logits


def adapted(**kwargs) -> nn.Module:
    options = dict(
        r=4,
        lora_alpha=8,
        target_modules=["query", "value", "word_embeddings"],
        modules_to_save=["classifier"],
        init_lora_weights=False,
    )
    options.update(kwargs)
    return lora.inject(tiny_bert(num_labels=3), lora.LoraConfig(**options))


def test_parameter_count_of_a_rank_2_linear():
    model = nn.Sequential(nn.Linear(100, 128), nn.ReLU(), nn.Linear(128, 2))
    lora.inject(model, lora.LoraConfig(r=2, target_modules=["0"]))
    assert model[0].lora_A["default"].weight.shape == (2, 100)
    assert model[0].lora_B["default"].weight.shape == (128, 2)
    count = lora.trainable_parameters(model)
    assert count.trainable == 456
    assert count.total == 100 * 128 + 128 + 128 * 2 + 2 + 456
    assert f"{count.trainable:,}" in str(count)


def test_default_init_starts_at_the_base_model():
    base = out(tiny_bert(num_labels=3))
    model = lora.inject(tiny_bert(num_labels=3), lora.LoraConfig(target_modules=["query", "value"]))
    assert torch.equal(out(model), base)


def test_merge_unmerge_unload_and_disable():
    base = out(tiny_bert(num_labels=3))
    model = adapted()
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    unmerged = out(model)
    assert (unmerged - base).abs().max() > 1e-3

    lora.merge_adapter(model, safe_merge=True)
    assert (out(model) - unmerged).abs().max() <= 1e-4
    with lora.disable_adapters(model):  # merged weights are taken out inside the block
        assert (out(model) - base).abs().max() <= 1e-5
    assert (out(model) - unmerged).abs().max() <= 1e-4

    lora.unmerge_adapter(model)
    for name, param in model.named_parameters():
        if name in base_weights:
            assert (param - base_weights[name]).abs().max() <= 1e-6, name
    with lora.disable_adapters(model):  # unmerge leaves float rounding only
        assert (out(model) - base).abs().max() <= 1e-5

    types_before = {n: type(m) for n, m in tiny_bert(num_labels=3).named_modules()}
    lora.unload(model)
    assert {n: type(m) for n, m in model.named_modules()} == types_before
    assert (out(model) - base).abs().max() <= 1e-5


def test_merge_and_unload_keeps_outputs_and_module_types():
    model = adapted()
    expected = out(model)
    merged = lora.merge_and_unload(model)
    assert not any(
        isinstance(m, (lora.LoraLayer, lora.ModulesToSaveWrapper)) for m in merged.modules()
    )
    assert (out(merged) - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("how", ["merge_and_unload", "merge_adapter"])
def test_merging_into_a_tied_head_leaves_the_input_embeddings_alone(how):
    gpt2 = tiny_gpt2(vocab_size=100, n_positions=64)
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight  # GPT-2 ties them
    model = lora.inject(gpt2, lora.LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"]))
    with torch.no_grad():
        model.lm_head.lora_B["default"].weight.normal_(std=0.5)
    ids = torch.randint(0, 100, (2, 10))
    model.eval()
    with torch.no_grad():
        expected = model(ids).logits
    embeddings = model.transformer.wte.weight.detach().clone()
    if how == "merge_and_unload":
        model = lora.merge_and_unload(model)
        head = model.lm_head.weight
    else:
        lora.merge_adapter(model)
        head = model.lm_head.base_layer.weight
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(model.transformer.wte.weight, embeddings)  # only the head changed
    assert head is not model.transformer.wte.weight and not model.config.tie_word_embeddings
    if how == "merge_adapter":
        lora.unmerge_adapter(model)
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)
            with lora.disable_adapters(model):  # the base again: head = embeddings
                base = model(ids).logits
        torch.testing.assert_close(model.lm_head.base_layer.weight, embeddings)
        assert not torch.allclose(base, expected, atol=1e-3)


def test_safe_merge_refuses_nan():
    model = adapted()
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.self.query.lora_B["default"].weight[0, 0] = float(
            "nan"
        )
    with pytest.raises(lora.LoraError, match="NaN"):
        lora.merge_adapter(model, safe_merge=True)


def test_one_optimizer_step_changes_only_adapter_and_head():
    model = adapted().train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or ".modules_to_save." in n for n in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**batch(), labels=torch.tensor([0, 1, 2, 0])).loss.backward()
    optimizer.step()
    for name, param in model.named_parameters():
        changed = not torch.equal(param, before[name])
        assert changed == (name in trainable), name


def test_several_named_adapters():
    model = adapted()
    first = out(model)
    lora.add_adapter(
        model, "other", lora.LoraConfig(r=2, target_modules=["key"], init_lora_weights=False)
    )
    assert torch.equal(out(model), first)  # adding does not switch
    lora.set_adapter(model, "other")
    second = out(model)
    assert (second - first).abs().max() > 1e-4
    assert all(
        "other" in n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n
    )
    lora.set_adapter(model, "default")
    assert torch.equal(out(model), first)
    lora.delete_adapter(model, "other")
    assert sorted(lora.configs(model)) == ["default"]
    with pytest.raises(lora.LoraError, match="no adapter named 'other'"):
        lora.set_adapter(model, "other")


def test_set_adapter_on_a_merged_model_unmerges_first():
    """The merged adapter stayed in the weights and added to the one set active (PEFT unmerges)."""
    model = adapted()
    first = out(model)
    lora.add_adapter(
        model, "other", lora.LoraConfig(r=2, target_modules=["key"], init_lora_weights=False)
    )
    lora.set_adapter(model, "other")
    second = out(model)
    lora.merge_adapter(model)
    with pytest.warns(UserWarning, match="unmerging first"):
        lora.set_adapter(model, "default")
    assert (out(model) - first).abs().max() <= 1e-5
    assert not any(layer.merged for _, layer in lora.lora_layers(model))
    lora.set_adapter(model, "other")
    assert (out(model) - second).abs().max() <= 1e-5


def test_rslora_scaling():
    model = lora.inject(
        tiny_bert(num_labels=3),
        lora.LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["query"]),
    )
    layer = model.bert.encoder.layer[0].attention.self.query
    assert layer.scaling["default"] == pytest.approx(8 / 2)


def test_gaussian_init_and_bias_all():
    model = lora.inject(
        tiny_bert(num_labels=3),
        lora.LoraConfig(target_modules=["query"], init_lora_weights="gaussian", bias="all"),
    )
    layer = model.bert.encoder.layer[0].attention.self.query
    assert layer.lora_A["default"].weight.std().item() == pytest.approx(1 / 8, rel=0.3)
    assert layer.base_layer.bias.requires_grad
    assert any(k.endswith("bias") for k in lora.adapter_state_dict(model))


# ---------------------------------------------------------------- errors that name the fix
def test_targets_that_match_nothing_list_the_names_closest_first():
    with pytest.raises(lora.TargetModulesError) as err:
        lora.inject(tiny_bert(num_labels=3), lora.LoraConfig(target_modules=["q_lin", "v_lin"]))
    message = str(err.value)
    assert "matched no module" in message
    assert "query" in message and "value" in message and "dense" in message
    assert message.index("value") < message.index("dense")  # closest first


def test_target_of_unsupported_type_is_named():
    with pytest.raises(lora.TargetModulesError, match="LayerNorm"):
        lora.inject(tiny_bert(num_labels=3), lora.LoraConfig(target_modules=["LayerNorm"]))


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"r": 0}, "r must be a positive integer"),
        ({"r": -2}, "r must be a positive integer"),
        ({"lora_dropout": 1.0}, "lora_dropout must be in [0, 1)"),
        ({"lora_dropout": -0.1}, "lora_dropout must be in [0, 1)"),
        ({"bias": "some"}, "bias must be"),
        ({"target_modules": []}, "target_modules is empty"),
        ({"target_modules": 5}, "target_modules must be a list of module names"),
        ({"exclude_modules": [1]}, "exclude_modules must be a list of module names"),
        ({"modules_to_save": "classifier"}, "modules_to_save must be a list of module names"),
        ({"layers_to_transform": "1"}, "layers_to_transform must be a layer index"),
        ({"layers_pattern": "layers"}, "layers_pattern is set without layers_to_transform"),
        (
            {"target_modules": ".*query", "layers_to_transform": [0]},
            "need target_modules as a list",
        ),
    ],
)
def test_bad_config_values(kwargs, words):
    options = {"target_modules": ["query"], **kwargs}
    with pytest.raises(lora.LoraError) as err:
        lora.LoraConfig(**options)
    assert words in str(err.value)


def test_folder_without_adapter_files(tmp_path):
    with pytest.raises(lora.AdapterFileError, match="adapter_config.json"):
        lora.load_adapter(tiny_bert(num_labels=3), tmp_path)
    with pytest.raises(lora.AdapterFileError, match="not a folder"):
        lora.load_adapter(tiny_bert(num_labels=3), tmp_path / "nowhere")


def test_truncated_or_corrupted_weights(tmp_path):
    lora.save_adapter(adapted(), tmp_path)
    weights = tmp_path / lora.WEIGHTS_NAME
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(lora.AdapterFileError, match="truncated or corrupted"):
        lora.load_adapter(tiny_bert(num_labels=3), tmp_path)
    weights.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(lora.AdapterFileError, match="truncated or corrupted"):
        lora.load_adapter(tiny_bert(num_labels=3), tmp_path)
    (tmp_path / lora.CONFIG_NAME).write_text("{not json")
    with pytest.raises(lora.AdapterFileError, match="not valid JSON"):
        lora.load_adapter(tiny_bert(num_labels=3), tmp_path)
    (tmp_path / lora.CONFIG_NAME).write_text('["r", 4]')
    with pytest.raises(lora.AdapterFileError, match="not a JSON object"):
        lora.load_adapter(tiny_bert(num_labels=3), tmp_path)


@pytest.mark.parametrize(
    ("field", "words"),
    [({"r": "4"}, "r must be a positive integer"), ({"peft_type": "IA3"}, "only LoRA adapters")],
)
def test_a_bad_value_in_adapter_config_names_the_file(tmp_path, field, words):
    """The error said what was wrong (r must be ...) but not that it came from this file."""
    lora.save_adapter(adapted(), tmp_path)
    config = json.loads((tmp_path / lora.CONFIG_NAME).read_text())
    (tmp_path / lora.CONFIG_NAME).write_text(json.dumps({**config, **field}))
    with pytest.raises(lora.AdapterFileError) as err:
        lora.load_adapter(tiny_bert(num_labels=3), tmp_path)
    assert str(tmp_path / lora.CONFIG_NAME) in str(err.value) and words in str(err.value)


def test_shape_mismatch_names_the_tensor_and_both_shapes(tmp_path):
    lora.save_adapter(adapted(), tmp_path)
    config = json.loads((tmp_path / lora.CONFIG_NAME).read_text())
    config["r"] = 2
    (tmp_path / lora.CONFIG_NAME).write_text(json.dumps(config))
    model = tiny_bert(num_labels=3)
    with pytest.raises(lora.AdapterShapeError) as err:
        lora.load_adapter(model, tmp_path)
    message = str(err.value)
    assert "lora_embedding_A" in message and "(4, 120)" in message and "(2, 120)" in message
    assert not any(isinstance(m, lora.LoraLayer) for m in model.modules())  # nothing half-done


def test_fingerprint_mismatch_warns_with_both(tmp_path):
    model = adapted()
    lora.save_adapter(model, tmp_path)
    same = tiny_bert(num_labels=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", lora.FingerprintWarning)
        lora.load_adapter(same, tmp_path)
    other = tiny_bert(num_labels=3)
    with torch.no_grad():
        other.bert.encoder.layer[0].output.dense.weight.add_(0.01)
    with pytest.warns(lora.FingerprintWarning) as record:
        lora.load_adapter(other, tmp_path)
    text = str(record[0].message)
    assert lora.base_fingerprint(same) in text and lora.base_fingerprint(other) in text


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trained_biases_do_not_change_the_fingerprint(tmp_path, bias):
    # the adapter stores the biases it trained, so they are not part of the base it needs
    model = adapted(bias=bias)
    trained = [p for n, p in model.named_parameters() if n.endswith("bias") and p.requires_grad]
    assert trained
    with torch.no_grad():
        for param in trained:
            param.add_(0.5)
    lora.save_adapter(model, tmp_path)
    fresh = tiny_bert(num_labels=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", lora.FingerprintWarning)
        loaded = lora.load_adapter(fresh, tmp_path)
    assert torch.equal(out(loaded), out(model))
    other = tiny_bert(num_labels=3)
    with torch.no_grad():
        other.bert.encoder.layer[0].output.dense.weight.add_(0.01)
    with pytest.warns(lora.FingerprintWarning):  # a changed frozen weight is still seen
        lora.load_adapter(other, tmp_path)


def test_save_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    good = adapted()
    lora.save_adapter(good, tmp_path)
    before = (tmp_path / lora.WEIGHTS_NAME).read_bytes()

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("lorakit.lora.adapter_files.save_file", fail)
    with pytest.raises(lora.AdapterFileError, match="No space"):
        lora.save_adapter(adapted(r=2), tmp_path)
    assert (tmp_path / lora.WEIGHTS_NAME).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [lora.CONFIG_NAME, lora.WEIGHTS_NAME]


def test_reload_reproduces_outputs_and_records_metadata(tmp_path):
    model = adapted()
    lora.save_adapter(model, tmp_path, base_model_name_or_path="tiny-bert")
    _, _, metadata = lora.read_adapter(tmp_path)
    assert metadata["base_model"] == "tiny-bert"
    assert metadata["base_fingerprint"] == lora.base_fingerprint(model)
    loaded = lora.load_adapter(tiny_bert(num_labels=3), tmp_path)
    assert torch.equal(out(loaded), out(model))
    assert lora.trainable_parameters(loaded).trainable == 0  # loaded for inference
    trainable = lora.load_adapter(tiny_bert(num_labels=3), tmp_path, is_trainable=True)
    assert (
        lora.trainable_parameters(trainable).trainable == lora.trainable_parameters(model).trainable
    )


@pytest.mark.parametrize(
    "patterns, message",
    [
        ({"rank_pattern": {"value": 0}}, r"rank_pattern: 'value' -> 0 is not valid"),
        ({"rank_pattern": {"value": 2.5}}, r"rank_pattern: 'value' -> 2.5 is not valid"),
        ({"alpha_pattern": {"value": float("nan")}}, r"alpha_pattern: 'value' -> nan"),
        ({"rank_pattern": {"(value": 2}}, r"'\(value' is not a regular expression"),
        ({"rank_pattern": ["value", 2]}, r"rank_pattern must be a dict"),
    ],
)
def test_bad_rank_or_alpha_patterns_are_named(patterns, message):
    with pytest.raises(lora.LoraError, match=message):
        lora.LoraConfig(target_modules=["query"], **patterns)


def test_for_module_takes_the_first_matching_pattern():
    config = lora.LoraConfig(
        r=8, lora_alpha=16, target_modules=["query", "value"],
        rank_pattern={r"layer\.0\..*": 2, "value": 4}, alpha_pattern={"value": 4},
    )  # fmt: skip
    assert config.for_module("bert.encoder.layer.0.attention.self.value").r == 2
    assert config.for_module("bert.encoder.layer.1.attention.self.value").r == 4
    assert config.for_module("bert.encoder.layer.1.attention.self.value").scaling == 1.0
    assert config.for_module("bert.encoder.layer.1.attention.self.query") is config
    # a pattern must match whole name parts: "alue" is not "value"
    assert (
        lora.LoraConfig(r=8, target_modules=["value"], rank_pattern={"alue": 2})
        .for_module("bert.encoder.layer.1.attention.self.value")
        .r
        == 8
    )


# a pattern that backtracks without end on a module name: Python's `re` never returns
CATASTROPHIC = "(.|..)*y."


@pytest.mark.parametrize(
    ("options", "setting"),
    [
        ({"target_modules": CATASTROPHIC}, "target_modules"),
        ({"target_modules": ".*query", "exclude_modules": CATASTROPHIC}, "exclude_modules"),
        ({"rank_pattern": {CATASTROPHIC: 2}}, "rank_pattern"),
        ({"alpha_pattern": {CATASTROPHIC: 2}}, "alpha_pattern"),
        (
            {"layers_to_transform": [0], "layers_pattern": CATASTROPHIC},
            "layers_pattern",
        ),
    ],
)
def test_a_pattern_that_backtracks_without_end_is_refused_in_bounded_time(options, setting):
    """Module-name regexes come from adapter files: matching them is bounded in time, and the
    model is left as it was."""
    config = lora.LoraConfig(**{"target_modules": ["query", "value"], **options})
    model = tiny_bert(num_labels=3)
    types_before = {n: type(m) for n, m in model.named_modules()}
    start = time.monotonic()
    with pytest.raises(lora.LoraConfigError) as err:
        lora.inject(model, config)
    assert time.monotonic() - start < 3 * MATCH_SECONDS + 1
    assert err.value.key == setting
    assert str(err.value).startswith(f"{setting} {CATASTROPHIC!r} takes too long")
    assert "\n" not in str(err.value)
    assert {n: type(m) for n, m in model.named_modules()} == types_before


def test_regex_settings_must_compile():
    for options, setting in [
        ({"target_modules": "(query"}, "target_modules"),
        ({"target_modules": ["query"], "exclude_modules": "[x"}, "exclude_modules"),
        (
            {"target_modules": ["query"], "layers_to_transform": 0, "layers_pattern": "(l"},
            "layers_pattern",
        ),
    ]:
        with pytest.raises(lora.LoraConfigError, match="is not a regular expression") as err:
            lora.LoraConfig(**options)
        assert err.value.key == setting


def test_the_issue_pattern_matches_nothing_quickly():
    """`(.*.*)*Z` froze `re` for minutes; here it fails as any pattern that matches nothing."""
    start = time.monotonic()
    with pytest.raises(lora.TargetModulesError, match="matched no module"):
        lora.inject(tiny_bert(num_labels=3), lora.LoraConfig(target_modules="(.*.*)*Z"))
    assert time.monotonic() - start < 3 * MATCH_SECONDS + 1


def test_a_merged_adapter_saves_and_loads_with_its_outputs(tmp_path):
    """save_adapter after merge_adapter failed ("unmerge the adapter before fingerprinting the
    base"); PEFT saves a merged adapter as it is."""
    model = adapted(modules_to_save=None)
    expected = out(model)
    lora.merge_adapter(model)
    lora.save_adapter(model, tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("error", lora.FingerprintWarning)
        loaded = lora.load_adapter(tiny_bert(num_labels=3), tmp_path / "adapter")
    assert (out(loaded) - expected).abs().max() <= 1e-5


def test_a_refused_modules_to_save_leaves_the_model_untouched():
    """LoRA layers were injected before modules_to_save was checked, and stayed after its error."""
    model = tiny_bert(num_labels=3)
    config = lora.LoraConfig(target_modules=["query"], modules_to_save=["clasifier"])
    with pytest.raises(lora.TargetModulesError, match="'clasifier'.*matched no module"):
        lora.inject(model, config)
    assert not list(lora.lora_layers(model))


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_an_adapter_loaded_for_training_trains_its_biases(tmp_path, bias):
    """load_adapter(is_trainable=True) froze the biases that inject (and PEFT) train."""
    trained = adapted(bias=bias)
    lora.save_adapter(trained, tmp_path / "adapter")
    loaded = lora.load_adapter(tiny_bert(num_labels=3), tmp_path / "adapter", is_trainable=True)

    def trainable(model):
        return {n for n, p in model.named_parameters() if p.requires_grad}

    assert trainable(loaded) == trainable(trained)
    assert any(n.endswith("bias") and "classifier" not in n for n in trainable(loaded))


def test_a_module_saved_whole_still_shows_its_attributes():
    """`get_input_embeddings().weight` (and num_embeddings, ...) raised AttributeError on the
    ModulesToSaveWrapper; PEFT's wrapper forwards them to the active module."""
    model = adapted(modules_to_save=["word_embeddings"], target_modules=["query"])
    embeddings = model.get_input_embeddings()
    assert isinstance(embeddings, lora.ModulesToSaveWrapper)
    assert embeddings.weight is embeddings.modules_to_save["default"].weight
    assert embeddings.num_embeddings == 120
    with lora.disable_adapters(model):
        assert embeddings.weight is embeddings.original_module.weight


def test_the_fingerprint_is_the_adapters_own_whatever_other_adapters_save(tmp_path):
    """It left out the modules every adapter on the model saves: an adapter saved beside one
    that saves the classifier, or loaded beside one, warned of another base model."""
    model = adapted()  # saves "classifier"
    lora.add_adapter(model, "other", lora.LoraConfig(r=2, target_modules=["key"]))
    lora.save_adapter(model, tmp_path / "other", adapter_name="other")
    lora.save_adapter(adapted(modules_to_save=None), tmp_path / "plain")
    with warnings.catch_warnings():
        warnings.simplefilter("error", lora.FingerprintWarning)
        lora.load_adapter(tiny_bert(num_labels=3), tmp_path / "other")
        lora.load_adapter(adapted(), tmp_path / "plain", adapter_name="plain")
