"""`python -m lorakit.guide`: the guide's sweeps as commands, and one run small."""

import shlex

import pytest

from lorakit.config import ConfigError
from lorakit.guide import SWEEPS, find, main
from lorakit.sweep import combinations, parse_grid, validate_all, with_seeds


def test_list_prints_one_lorakit_sweep_command_per_sweep(capsys, tmp_path):
    assert main(["--list", "--runs", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    commands = [shlex.split(line) for line in lines if not line.startswith("#")]
    assert len(commands) == len(SWEEPS) >= 7
    names = {s.name for s in SWEEPS}
    assert {"r-sentiment", "r-instruct", "alpha", "rslora", "targets", "methods"} <= names
    for words, sweep in zip(commands, SWEEPS, strict=True):
        assert words[:3] == ["lorakit", "sweep", sweep.recipe]
        assert words[words.index("--seeds") + 1] == "3"
        assert words[words.index("--out") + 1] == str(tmp_path / sweep.name)


def test_alpha_command_and_its_small_form():
    alpha = find("alpha")
    assert alpha.command("runs/guide/alpha", ["model.name=x"]) == [
        "lorakit", "sweep", "sentiment", "--grid", "lora_alpha=1,4,8,16,32,64", "--seeds", "3",
        "--out", "runs/guide/alpha", "--set", "lora.r=8", "--set", "model.name=x",
    ]  # fmt: skip
    small = alpha.shrunk()
    assert small.grid == ("lora_alpha=1,4",) and small.seeds == 1
    assert "train.max_steps=2" in small.settings
    assert find("targets").shrunk().grid == ("target_modules=query|query,value",)


@pytest.mark.parametrize("sweep", SWEEPS, ids=lambda s: s.name)
def test_every_guide_sweep_is_a_valid_sweep(sweep):
    combos = with_seeds(combinations(parse_grid(sweep.grid)), 1, sweep.recipe, [])
    validate_all(sweep.recipe, [*sweep.settings], combos)


def test_only_names_a_known_sweep(capsys):
    with pytest.raises(SystemExit):
        main(["--only", "nope", "--list"])
    assert "r-sentiment" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        find("nope")


@pytest.mark.slow
def test_small_alpha_sweep_writes_figures_and_table(tmp_path, tiny_bert_dir, capsys):
    figures = tmp_path / "guide"
    extra = ["--set", f"model.name={tiny_bert_dir}"]
    assert main(["--only", "alpha", "--small", "--runs", str(tmp_path / "runs"),
                 "--figures", str(figures), *extra]) == 0  # fmt: skip
    table = (figures / "alpha.md").read_text()
    assert "lorakit sweep sentiment --grid lora_alpha=1,4 --seeds 1" in table
    assert "| lora_alpha=1 | 1 |" in table and "## Pareto front" in table
    assert (figures / "alpha-quality_vs_cost.png").is_file()
    assert (figures / "alpha-metric_vs_trainable_params.png").is_file()
