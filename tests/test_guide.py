"""`python -m lorakit.guide`: the guide's sweeps as commands, and one run small."""

import json
import re
import shlex
from pathlib import Path

import pytest

from lorakit.config import ConfigError
from lorakit.guide import SWEEPS, GuideSweep, find, main, run
from lorakit.report.sweep import format_value
from lorakit.sweep import combinations, parse_grid, validate_all, with_seeds


def test_list_prints_one_lorakit_sweep_command_per_sweep(capsys, tmp_path):
    assert main(["--list", "--runs", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    commands = [shlex.split(line) for line in lines if not line.startswith("#")]
    assert len(commands) == len(SWEEPS) >= 7
    names = {s.name for s in SWEEPS}
    assert {"r-sentiment", "r-instruct", "alpha", "targets", "methods", "forgetting"} <= names
    for words, sweep in zip(commands, SWEEPS, strict=True):
        assert words[:3] == ["lorakit", "sweep", sweep.recipe]
        assert int(words[words.index("--seeds") + 1]) >= 2  # a spread to report
        assert words[words.index("--out") + 1] == str(tmp_path / sweep.name)


def test_alpha_command_and_its_small_form():
    alpha = find("alpha")
    assert alpha.command("runs/guide/alpha", ["model.name=x"]) == [
        "lorakit", "sweep", "sentiment", "--grid", "lora_alpha=2,8,32,128", "--seeds", "3",
        "--out", "runs/guide/alpha", "--set", "train.epochs=1", "--set",
        "data.max_train_samples=4000", "--set", "lora.r=8", "--set", "model.name=x",
    ]  # fmt: skip
    small = alpha.shrunk()
    assert small.grid == ("lora_alpha=2,8",) and small.seeds == 1
    assert "train.max_steps=2" in small.settings
    assert find("targets").shrunk().grid == ("target_modules=query,value|query,key,value",)


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
    assert "lorakit sweep sentiment --grid lora_alpha=2,8 --seeds 1" in table
    assert "| lora_alpha=2 | 1 |" in table and "## Pareto front" in table
    assert "(alpha-quality_vs_cost.png)" in table  # the panel's copy beside the table
    assert (figures / "alpha-quality_vs_cost.png").is_file()
    assert (figures / "alpha-metric_vs_trainable_params.png").is_file()
    assert (figures / "alpha-metric_vs_lora_alpha.png").is_file()  # the one key that varies
    # the tables come again from the runs, training nothing
    (figures / "alpha.md").unlink()
    assert main(["--only", "alpha", "--small", "--report-only", "--runs", str(tmp_path / "runs"),
                 "--figures", str(figures), *extra]) == 0  # fmt: skip
    assert (figures / "alpha.md").read_text() == table


@pytest.mark.slow
def test_small_methods_sweep_tables_each_method_over_the_seeds(tmp_path, tiny_bert_dir):
    figures = tmp_path / "guide"
    methods = find("methods").shrunk()
    methods = GuideSweep(methods.name, methods.question, methods.recipe, methods.grid,
                         (*methods.settings, f"model.name={tiny_bert_dir}"), seeds=2)  # fmt: skip
    run(methods, tmp_path / "runs", figures)
    table = (figures / "methods.md").read_text()
    section = table.split("## Comparison")[1]
    for method in ("LoRA r=8", "full fine-tuning", "head only"):
        assert f"| {method} | 2 |" in section
    runs = sorted((tmp_path / "runs" / "methods").glob("*/comparison.json"))
    full = [json.loads(path.read_text())[1] for path in runs]  # both seeds' full fine-tuning
    assert len(full) == 2 and all(row["method"] == "full fine-tuning" for row in full)
    lines = [line.split(" | ") for line in section.splitlines() if line.startswith("| ")]
    header, row = lines[0], next(line for line in lines if line[0] == "| full fine-tuning")
    cell = row[header.index("test_accuracy")]
    mean = sum(r["test_accuracy"] for r in full) / 2
    assert cell.startswith(f"{format_value(mean)} ± ")
    assert (figures / "methods-comparison.png").is_file()


GUIDE = Path(__file__).parent.parent / "docs" / "guide.md"
# a measured figure: a decimal (0.7806, 1.26) or a count with thousands separators (111,362)
FIGURE = re.compile(r"(?<![\w.,])\d{1,3}(?:,\d{3})+(?![\d,])|(?<![\w.])\d+\.\d+(?![\d.])")


def test_every_figure_in_the_guide_is_in_a_table_the_script_wrote():
    tables = " ".join(p.read_text() for p in GUIDE.with_suffix("").glob("*.*")
                      if p.suffix in (".md", ".txt"))  # fmt: skip
    text = GUIDE.read_text()
    figures = FIGURE.findall(re.sub(r"`[^`]*`", "", text))  # commands are not measurements
    assert len(figures) > 20
    missing = sorted({f for f in figures if f not in tables})
    assert not missing, f"figures in docs/guide.md that no docs/guide table carries: {missing}"
    for link in re.findall(r"\]\((guide/[^)]+)\)", text):
        assert (GUIDE.parent / link).is_file(), link
