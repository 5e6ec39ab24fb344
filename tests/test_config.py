"""Config validation: every class of bad value fails before any work, naming its key."""

import dataclasses
import subprocess
import sys
import tomllib

import pytest

from lorakit.config import Config, ConfigError, load_config, parse_value, to_toml, validate
from lorakit.recipes import recipe_path


def problems(overrides, base="classic"):
    with pytest.raises(ConfigError) as caught:
        load_config(recipe_path(base), overrides)
    return caught.value.problems


def test_builtin_recipe_is_valid():
    config = load_config(recipe_path("classic"))
    assert config.recipe == "classic"
    assert config.lora.modules_to_save == ["fc2"]


def test_unknown_key_suggests_the_closest():
    [line] = problems(["train.bach_size=8"])
    assert line.startswith("train.bach_size: unknown key")
    assert "train.batch_size" in line


def test_unknown_section_is_named():
    [line] = problems(["trian.epochs=2"])
    assert line.startswith("trian: unknown key") and "train" in line


def test_wrong_type_names_key_and_value():
    [line] = problems(["train.lr=fast"])
    assert line.startswith("train.lr:") and "number" in line and "'fast'" in line


@pytest.mark.parametrize(
    ("override", "start"),
    [
        ("lora.r=0", "lora.r: must be a positive integer"),
        ("train.batch_size=0", "train.batch_size: must be greater"),
        ("lora.lora_dropout=1.5", "lora.lora_dropout: must be in [0, 1)"),
        ("lora.lora_alpha=nan", "lora.lora_alpha: must be a finite number"),
        ("train.warmup_ratio=-0.1", "train.warmup_ratio: must be greater"),
        ("data.max_length=0", "data.max_length: must be greater"),
    ],
)
def test_impossible_values(override, start):
    [line] = problems([override])
    assert line.startswith(start)


def test_choice_lists_what_it_accepts():
    [line] = problems(["lora.engine=torch"])
    assert line.startswith("lora.engine:") and "'lorakit' or 'peft'" in line


def test_empty_target_modules():
    [line] = problems(["lora.target_modules=[]"])
    assert line.startswith("lora.target_modules:") and "empty" in line


def test_a_module_is_not_both_targeted_and_saved():
    # sentiment saves the classifier whole; LoRA on it too trained a muddle that PEFT can't load
    [line] = problems(["lora.target_modules=query,classifier"], base="sentiment")
    assert line.startswith("lora.modules_to_save:") and "'classifier'" in line


def test_one_saved_module_needs_no_list_syntax():
    config = load_config(recipe_path("sentiment"), ["lora.modules_to_save=pooler"])
    assert config.lora.modules_to_save == ["pooler"]


def test_malformed_override():
    [line] = problems(["train.epochs"])
    assert "train.epochs" in line and "KEY=VALUE" in line


def test_all_problems_reported_together():
    lines = problems(["lora.r=-1", "train.epochs=0", "nope=1"])
    assert [line.split(":")[0] for line in lines] == ["lora.r", "train.epochs", "nope"]


def test_missing_recipe_key():
    with pytest.raises(ConfigError, match="^recipe: missing"):
        validate({"train": {"epochs": 1}})


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("recipe = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_override_values_are_toml_literals_then_strings():
    assert parse_value("3") == 3 and parse_value("1e-3") == 0.001
    assert parse_value("true") is True
    assert parse_value("fc1,embedding") == ["fc1", "embedding"]
    assert parse_value('["a", "b"]') == ["a", "b"]
    assert parse_value("runs/x") == "runs/x"
    config = load_config(recipe_path("classic"), ["lora.target_modules=fc1,embedding", "lora.r=4"])
    assert config.lora.target_modules == ["fc1", "embedding"] and config.lora.r == 4


def test_short_names_set_the_one_setting_they_name_as_in_sweeps():
    config = load_config(
        recipe_path("sentiment"), ["r=4", "text_column=body", "label_column=stars", "lr=1e-3"]
    )
    assert config.lora.r == 4 and config.train.lr == 1e-3
    assert (config.data.text_column, config.data.label_column) == ("body", "stars")
    with pytest.raises(
        ConfigError, match=r"--set name: is ambiguous; write one of data\.name, model\.name"
    ):
        load_config(recipe_path("sentiment"), ["name=x"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(recipe_path("sentiment"), ["rr=4"])


def test_resolved_toml_reads_back_identical():
    config = load_config(
        recipe_path("classic"), ["train.lr=0.002", "data.max_train_samples=100", "seed=7",
                                 r'lora.rank_pattern={fc1 = 2, "h\\.0\\..*" = 3}']
    )  # fmt: skip
    assert config.lora.rank_pattern == {"fc1": 2, r"h\.0\..*": 3}
    text = to_toml(config, header="a header\nover two lines")
    assert Config.model_validate(tomllib.loads(text)) == config


def test_lora_alpha_is_any_finite_number_as_in_peft():
    for alpha in (0, -8, 0.5):
        config = load_config(recipe_path("classic"), [f"lora.lora_alpha={alpha}"])
        assert config.lora.lora_alpha == alpha


def test_bad_rank_pattern_is_named():
    with pytest.raises(ConfigError, match="lora.rank_pattern: 'fc1' -> 0 is not valid"):
        load_config(recipe_path("classic"), ["lora.rank_pattern={fc1 = 0}"])


def test_bf16_auto_follows_the_hardware(monkeypatch):
    import torch

    auto = load_config(recipe_path("sentiment"), ["train.bf16=auto"]).train
    assert auto.bf16 == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for native in (True, False):
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda n=native: n)
        assert auto.use_bf16 is native
    assert load_config(recipe_path("sentiment"), ["train.bf16=false"]).train.use_bf16 is False
    assert load_config(recipe_path("sentiment"), ["train.bf16=true"]).train.use_bf16 is True
    with pytest.raises(ConfigError, match="train.bf16"):
        load_config(recipe_path("sentiment"), ["train.bf16=sometimes"])


def test_reading_a_config_imports_no_torch():
    code = (
        "import sys, lorakit.config; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules; "
        "import lorakit; assert callable(lorakit.inject) and 'torch' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_lora_section_is_the_engines_config():
    """Every LoraConfig field (but those the pipeline sets) is a key, with the same default."""
    from lorakit.config import SET_BY_THE_PIPELINE, LoraSection
    from lorakit.lora.config import LoraConfig

    engine_fields = {f.name for f in dataclasses.fields(LoraConfig)} - set(SET_BY_THE_PIPELINE)
    assert set(LoraSection.model_fields) == engine_fields | {"engine"}
    assert LoraSection().lora_config() == LoraConfig()


@pytest.mark.parametrize("engine", ["lorakit", "peft"])
def test_layer_and_exclude_settings_reach_the_engine(engine, tiny_bert_dir):
    from transformers import BertForSequenceClassification

    from lorakit.train import engines

    config = load_config(recipe_path("sentiment"), [
        f"lora.engine={engine}", "lora.target_modules=query,value", "lora.exclude_modules=.*value",
        "lora.layers_to_transform=1", "lora.layers_pattern=layer",
    ])  # fmt: skip
    assert config.lora.layers_to_transform == 1 and config.lora.exclude_modules == ".*value"
    model = BertForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    model = engines.apply_lora(model, config.lora, task_type="SEQ_CLS")
    adapted = [n.removeprefix("base_model.model.") for n, m in model.named_modules()
               if hasattr(m, "lora_A")]  # fmt: skip
    assert adapted == ["bert.encoder.layer.1.attention.self.query"]


def test_settings_that_do_not_apply_to_the_pipeline_are_left_out_of_the_toml():
    """MiniLM runs have no GloVe embeddings or hidden width: config.toml (and the report, which
    shows it) leaves those out; the classic recipe keeps them; input still accepts them."""
    sentiment = load_config(recipe_path("sentiment"), ["model.hidden=64"])
    text = to_toml(sentiment)
    assert "embeddings" not in text and "hidden" not in text
    assert 'name = "minilm"' in text
    classic = to_toml(load_config(recipe_path("classic")))
    assert 'embeddings = "glove-6b-50d"' in classic and "hidden = 128" in classic
    custom = Config(recipe="mine", pipeline="classic", model={"hidden": 32})
    assert "hidden = 32" in to_toml(custom)


def test_a_file_of_ones_own_names_the_run_and_its_description():
    """`--set data.path=docs.csv` on any recipe: the data's name is the file's, the description
    names the file, the run is named after both; a name given with the path is kept."""
    config = load_config(recipe_path("sentiment"), ["data.path=/data/docs.csv"])
    assert config.data.name == "docs" and config.run_name == "sentiment-docs"
    assert "docs.csv" in config.description and "rotten-tomatoes" not in config.description
    assert load_config(recipe_path("sentiment")).run_name == "sentiment"
    named = load_config(recipe_path("topics"), ["data.path=/data/docs.csv", "data.name=news"])
    assert named.data.name == "news" and named.run_name == "topics-news"
    # the resolved config (RUN_DIR/config.toml) reads back as it was written
    again = Config.model_validate(tomllib.loads(to_toml(config)))
    assert again == config


def test_the_classify_recipe_asks_for_a_file():
    config = load_config(recipe_path("classify"), ["data.path=my docs.csv"])
    assert config.pipeline == "sequence-classification" and config.model.name == "minilm"
    assert config.run_name == "classify-my-docs" and config.data.name == "my docs"
    assert problems([], base="classify") == [
        "data: give the data: data.path=FILE (a .csv, .jsonl or .parquet file or a folder) "
        "or data.name=a built-in dataset"
    ]
