"""The sweeps behind docs/guide.md, as data: every figure in the guide comes from one of them.

    python -m lorakit.guide --list                 # each sweep's `lorakit sweep` command
    python -m lorakit.guide --only alpha           # run one (all of them without --only)
    python -m lorakit.guide --only alpha --small   # every run shrunk to seconds: a smoke test
    python -m lorakit.guide --report-only          # figures and tables again from the runs

A sweep runs in ``--runs`` (``runs/guide/NAME``); its plots are copied to ``--figures``
(``docs/guide/NAME-<plot>.png``) and its per-setting table (mean and spread over the seeds, the
Pareto fronts, the figures each run's summary.json and comparison.json hold beside the sweep's
metric) written to ``docs/guide/NAME.md``. ``layer`` and ``inspect`` train nothing: the figure
of a LoRA layer, and what `lorakit inspect` and `lorakit train --dry-run` say of the two
models. ``--small`` keeps each grid key's first two
values, runs one seed, and adds the recipe's small settings (a few steps on little data).
``--set KEY=VALUE`` goes to every run (``model.name=...`` for a model of one's own).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Circle, FancyBboxPatch
from pandas.api.types import is_numeric_dtype

from lorakit import api
from lorakit.inspect import condense_names
from lorakit.report.plots import save_figure
from lorakit.report.runfiles import PLOTS_DIR, write_atomically
from lorakit.report.sweep import (
    format_value,
    grid_keys,
    markdown_table,
    read_sweep_table,
    settings_markdown,
    standard_error,
)
from lorakit.rundir import read_run_summary

SEEDS = 3
# The guide's runs are shorter than the recipes' defaults, so that every sweep together reruns
# in about two hours on two cores (docs/guide/timings.md); each figure's command carries them.
MINILM = ("train.epochs=1", "data.max_train_samples=4000")
INSTRUCT = (
    "data.max_train_samples=800",
    "data.max_eval_samples=200",
    "train.eval_every=0",
    "train.checkpoint_every=0",
)
FORGETTING = (
    "data.max_train_samples=2000",
    "data.max_eval_samples=100",
    "train.eval_every=0",
    "train.checkpoint_every=0",
    "compare=true",
    "data.forgetting_on=bbc-news",
)
TARGETS = (
    "query,value",
    "query,key,value",
    "query,key,value,attention.output.dense",
    "query,key,value,attention.output.dense,intermediate.dense,output.dense",
    "query,key,value,attention.output.dense,intermediate.dense,output.dense,word_embeddings",
)
# a few steps on little data, per recipe; the test split stays whole, so figures stay comparable
SMALL = {
    "sentiment": ["data.max_train_samples=64", "train.max_steps=2", "train.epochs=1"],
    "classic": ["pretrain.epochs=1", "train.epochs=1", "data.max_train_samples=300"],
    "instruct": ["data.max_train_samples=32", "data.max_eval_samples=16", "train.max_steps=2",
                 "train.batch_size=8", "train.eval_every=0", "train.checkpoint_every=0"],
    "causal-lm": ["data.max_train_samples=64", "data.max_eval_samples=16", "train.max_steps=2",
                  "train.eval_every=0", "train.checkpoint_every=0"],
}  # fmt: skip


@dataclass(frozen=True)
class GuideSweep:
    """One `lorakit sweep`: a question of the guide, the recipe and grid that answer it."""

    name: str
    question: str
    recipe: str
    grid: tuple[str, ...]  # --grid items
    settings: tuple[str, ...] = ()  # --set items for every run
    seeds: int = SEEDS
    figures: tuple[str, ...] = ()  # summary.json keys tabled per setting, beside the metric

    def shrunk(self) -> GuideSweep:
        """The same sweep in seconds: two values a grid key, one seed, the small settings."""
        grid = tuple(_first_values(item, 2) for item in self.grid)
        settings = (*self.settings, *SMALL.get(self.recipe, ()))
        return GuideSweep(self.name, self.question, self.recipe, grid, settings, 1, self.figures)

    def command(self, out: Path, extra: Sequence[str] = ()) -> list[str]:
        """The `lorakit sweep` command line."""
        words = ["lorakit", "sweep", self.recipe]
        for item in self.grid:
            words += ["--grid", item]
        words += ["--seeds", str(self.seeds), "--out", str(out)]
        for item in (*self.settings, *extra):
            words += ["--set", item]
        return words


SWEEPS = (
    GuideSweep("r-sentiment", "How does accuracy move with the rank r, with alpha/r and with "
               "rsLoRA's alpha/sqrt(r) scaling (alpha fixed at 16)?",
               "sentiment", ("r=1,4,16,64", "use_rslora=false,true"), MINILM),
    GuideSweep("alpha", "What does alpha do at a fixed r = 8 (the update's scale alpha/r)?",
               "sentiment", ("lora_alpha=2,8,32,128",), (*MINILM, "lora.r=8")),
    GuideSweep("targets", "Which modules to adapt: attention's query/value, query/key/value, "
               "its output, the MLP, the word embeddings (the head always trains)", "sentiment",
               (f"target_modules={'|'.join(TARGETS)}",), MINILM),
    GuideSweep("methods", "LoRA against full fine-tuning and training the head only, on the "
               "same data and selection rule (each run's comparison.json)", "sentiment",
               ("r=8",), (*MINILM, "compare=true", "data.forgetting_on=bbc-news")),
    GuideSweep("r-instruct", "How do perplexity and verdict accuracy move with r on an LLM?",
               "instruct", ("r=1,4,16,64",), INSTRUCT, seeds=2,
               figures=("test_perplexity", "test_verdict_accuracy",
                        "test_generated_verdict_accuracy", "base_test_verdict_accuracy",
                        "base_test_generated_verdict_accuracy")),
    GuideSweep("forgetting", "How far does domain adaptation move the model on other text, "
               "LoRA against full fine-tuning?", "causal-lm", ("r=8",), FORGETTING, seeds=2),
    GuideSweep("classic", "The classic path: a GloVe classifier pretrained on news topics, "
               "moved to review sentiment by LoRA, against other ways to train it", "classic",
               ("r=2",), ("compare=true",),
               figures=("pretrain_test_accuracy", "test_accuracy")),
)  # fmt: skip


def _first_values(item: str, count: int) -> str:
    key, _, values = item.partition("=")
    separator = "|" if "|" in values else ","
    return f"{key}={separator.join(values.split(separator)[:count])}"


def find(name: str) -> GuideSweep:
    for sweep in SWEEPS:
        if sweep.name == name:
            return sweep
    names = ", ".join([*(s.name for s in SWEEPS), *STEPS])
    raise api.ConfigError(f"--only {name!r}: no such guide sweep; choose one of {names}")


def run(sweep: GuideSweep, runs: Path, figures: Path, extra: Sequence[str] = ()) -> Path:
    """Run ``sweep`` into ``runs/NAME``, then write its figures and table (`report`)."""
    out = runs / sweep.name
    print("$ " + shlex.join(sweep.command(out, extra)), flush=True)
    api.sweep(sweep.recipe, list(sweep.grid), out=out, overrides=[*sweep.settings, *extra],
              seeds=sweep.seeds)  # fmt: skip
    return report(sweep, runs, figures, extra)


def report(sweep: GuideSweep, runs: Path, figures: Path, extra: Sequence[str] = ()) -> Path:
    """Copy the plots of the sweep in ``runs/NAME`` into ``figures`` and write its table there."""
    out = runs / sweep.name
    record = json.loads((out / "sweep.json").read_text(encoding="utf-8"))
    figures.mkdir(parents=True, exist_ok=True)
    for plot in sorted((out / PLOTS_DIR).glob("*.png")):
        shutil.copyfile(plot, figures / f"{sweep.name}-{plot.name}")
    text = f"# {sweep.name}: {sweep.question}\n\n`{shlex.join(sweep.command(out, extra))}`\n\n"
    text += (f"{record['succeeded']} of {record['succeeded'] + record['failed']} runs succeeded "
             f"in {record['seconds'] / 60:.0f} minutes.\n")  # fmt: skip
    settings = settings_markdown(out, per_setting=True, max_cell=200)
    # the sweep's own links to its plots, pointed at their copies beside this table
    text += settings.replace(f"]({PLOTS_DIR}/", f"]({sweep.name}-")
    text += _test_noise(out)
    if sweep.figures:
        text += "\n## Figures per setting (mean ± sample standard deviation over the seeds)\n\n"
        text += _figures_table(out, sweep.figures)
    comparison = _comparison(out)
    if comparison:
        columns, rows = comparison
        text += ("\n## Comparison (each run's comparison.json: mean ± sample standard deviation "
                 "over the seeds)\n\n")  # fmt: skip
        text += markdown_table(columns, rows)
        plot = _plot_comparison(out, figures / f"{sweep.name}-comparison.png")
        text += f"\n![comparison]({plot.name})\n"
    return write_atomically(figures / f"{sweep.name}.md", text)


def _test_noise(out: Path) -> str:
    """For an accuracy: one binomial standard error on the test split, at the runs' mean."""
    runs = _ok_runs(out)
    if "test_accuracy" not in runs.columns or "test_examples" not in runs.columns:
        return ""
    accuracy, examples = runs["test_accuracy"].mean(), int(runs["test_examples"].max())
    error = standard_error(accuracy, examples)
    return (f"\nTest noise: at the runs' mean test accuracy, {format_value(accuracy)}, one "
            f"binomial standard error sqrt(p(1-p)/n) on {examples} test examples is "
            f"{format_value(error)}.\n")  # fmt: skip


def _ok_runs(out: Path) -> pd.DataFrame:
    table = read_sweep_table(out)
    return table[table["status"] == "ok"]


def _mean_spread(values: Sequence[float]) -> str:
    """``mean ± std`` (sample standard deviation) in the digits the value needs."""
    series = pd.Series(values, dtype=float)
    mean, std = series.mean(), series.std()
    if pd.isna(std):
        return format_value(mean)
    return f"{format_value(mean)} ± {format_value(std)}"


def _figures_table(out: Path, keys: Sequence[str]) -> str:
    """Per setting: the mean and spread over its seeds of each summary.json ``keys``."""
    runs = _ok_runs(out)
    grid = [k for k in grid_keys(list(runs.columns)) if k != "seed"]
    rows = []
    for _, group in runs.groupby(grid, sort=False) if grid else [((), runs)]:
        summaries = [read_run_summary(out / Path(d).name) for d in group["run_dir"]]
        setting = ", ".join(f"{k.split('.')[-1]}={group.iloc[0][k]}" for k in grid)
        row = {"setting": setting, "runs": len(summaries)}
        for key in keys:
            values = [s[key] for s in summaries if s.get(key) is not None]
            row[key] = _mean_spread(values) if values else ""
        rows.append(row)
    return markdown_table(["setting", "runs", *keys], rows)


def _comparison_rows(out: Path) -> pd.DataFrame:
    """Every run's comparison.json rows, with the row's name in ``compared``."""
    frames = []
    for path in sorted(out.glob("*/comparison.json")):
        rows = json.loads(path.read_text(encoding="utf-8"))
        frame = pd.DataFrame(rows)
        frames.append(frame.rename(columns={frame.columns[0]: "compared"}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _comparison(out: Path) -> tuple[list[str], list[dict[str, Any]]] | None:
    """Each compared method's mean ± spread over the runs, for every numeric column."""
    rows = _comparison_rows(out)
    if rows.empty:
        return None
    numeric = [c for c in rows.columns if c != "compared" and is_numeric_dtype(rows[c])]
    table = []
    for name, group in rows.groupby("compared", sort=False):
        table.append({"compared": name, "runs": len(group),
                      **{c: _mean_spread(group[c].dropna()) for c in numeric}})  # fmt: skip
    return ["compared", "runs", *numeric], table


def _plot_comparison(out: Path, path: Path) -> Path:
    """One panel per measured column of the comparison, four to a row: each method's mean, its
    spread as an error bar; a column spanning two decades or more on a log axis."""
    rows = _comparison_rows(out)
    skip = {"lr", "best_step", "trainable_percent", "vs_base"}
    columns = [c for c in rows.columns
               if c != "compared" and c not in skip and is_numeric_dtype(rows[c])]  # fmt: skip
    names = list(dict.fromkeys(rows["compared"]))
    across = min(4, len(columns))
    down = math.ceil(len(columns) / across)
    figure = Figure(figsize=(3.4 * across, 3.3 * down))
    panels = figure.subplots(down, across, squeeze=False).flatten()
    for ax, column in zip(panels, columns, strict=False):
        groups = [rows.loc[rows["compared"] == n, column].astype(float) for n in names]
        means = [g.mean() for g in groups]
        spreads = [0 if pd.isna(g.std()) else g.std() for g in groups]
        ax.bar(range(len(names)), means, yerr=spreads, capsize=4, color="tab:blue", alpha=0.8)
        ax.set_xticks(range(len(names)), [textwrap.fill(str(n), 14) for n in names], fontsize=8)
        ax.set_title(column.replace("_", " "), fontsize=9)
        positive = [m for m in means if m > 0]
        if positive and max(positive) >= 100 * min(positive):
            ax.set_yscale("log")
    for ax in panels[len(columns) :]:
        ax.set_visible(False)
    figure.tight_layout()
    return save_figure(figure, path)


# ---------------------------------------------------------------- what trains nothing
MODELS = {"minilm": "sentiment", "smollm2": "instruct"}  # each model, with a recipe that uses it


def inspect_models(figures: Path) -> list[Path]:
    """For MiniLM and SmolLM2, `lorakit inspect MODEL` (``inspect-MODEL.txt``) and every
    trainable tensor that the recipe's LoRA adds, layers collapsed (``lora-MODEL.txt``)."""
    figures.mkdir(parents=True, exist_ok=True)
    written = []
    for model, recipe in MODELS.items():
        text = f"$ lorakit inspect {model}\n{api.inspect(model)}"
        written.append(write_atomically(figures / f"inspect-{model}.txt", text))
        config = api.resolve_config(recipe)
        text = (
            f"trainable tensors of `lorakit train {recipe}` (lora.r = {config.lora.r}, "
            f"target_modules = {config.lora.target_modules})\n\n{_trainable(config)}"
        )
        written.append(write_atomically(figures / f"lora-{model}.txt", text))
    return written


def _trainable(config) -> str:
    """The trainable tensors of the recipe's model with LoRA, repeats across layers collapsed."""
    from lorakit.recipes import causal_lm, sequence_classification
    from lorakit.train import engines

    if config.task == "causal-lm":
        base, _ = causal_lm.load_base(config)
        model = engines.apply_lora(base, config.lora, task_type="CAUSAL_LM")
    else:
        model, _, _ = sequence_classification.build_model(config, ["negative", "positive"])
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    rows = []
    for pattern, names in condense_names(list(shapes)):
        shape = " x ".join(map(str, shapes[names[0]]))
        each = math.prod(shapes[names[0]])
        rows.append({"tensor": pattern, "shape": shape, "count": len(names),
                     "parameters": each * len(names)})  # fmt: skip
    trainable = sum(row["parameters"] for row in rows)
    total = sum(p.numel() for p in model.parameters())
    rows.append({"tensor": "trainable in all", "parameters": trainable})
    rows.append({"tensor": "every parameter (base + LoRA)", "parameters": total})
    return markdown_table(["tensor", "shape", "count", "parameters"], rows, max_cell=120)


def draw_layer(figures: Path) -> Path:
    """The LoRA layer: the frozen W0 beside the trainable A and B, summed at the output."""
    figure = Figure(figsize=(7.5, 3.6))
    ax = figure.subplots()
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 5)
    ax.axis("off")

    def box(x, y, w, h, text, colour):
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.05", fc=colour,
                                    ec="black", lw=1))  # fmt: skip
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=9)

    def arrow(x0, y0, x1, y1):
        ax.annotate("", (x1, y1), (x0, y0), arrowprops={"arrowstyle": "->", "lw": 1.2})

    box(0.2, 2.1, 1.2, 0.8, "x\n(k)", "white")
    box(2.4, 3.3, 2.6, 1.2, "W0 (d × k)\nfrozen", "#d0d0d0")
    box(2.4, 0.4, 1.6, 1.2, "A (r × k)\nrandom start", "#a5d8ff")
    box(4.6, 0.4, 1.6, 1.2, "B (d × r)\nzero start", "#a5d8ff")
    box(6.8, 0.5, 1.0, 1.0, "× α/r", "#ffe066")
    ax.add_patch(Circle((8.3, 2.5), 0.3, fc="white", ec="black"))
    ax.text(8.3, 2.5, "+", ha="center", va="center", fontsize=12)
    box(9.0, 2.1, 0.9, 0.8, "h\n(d)", "white")
    arrow(1.4, 2.7, 2.4, 3.9)
    arrow(1.4, 2.3, 2.4, 1.0)
    arrow(4.0, 1.0, 4.6, 1.0)
    arrow(6.2, 1.0, 6.8, 1.0)
    arrow(5.0, 3.9, 8.1, 2.7)
    arrow(7.8, 1.0, 8.1, 2.3)
    arrow(8.6, 2.5, 9.0, 2.5)
    ax.text(5.0, 2.45, "h = W0·x + (α/r)·B·A·x    trainable: r·(k + d) numbers, not d·k",
            ha="center", fontsize=9)  # fmt: skip
    figure.tight_layout()
    return save_figure(figure, figures / "lora-layer.png")


STEPS = {"layer": draw_layer, "inspect": inspect_models}  # the guide's parts that train nothing


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorakit.guide", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--list", action="store_true", help="print each sweep's command")
    parser.add_argument("--only", metavar="NAME", help="run this sweep (or layer, inspect) only")
    parser.add_argument("--small", action="store_true", help="shrink every run (a smoke test)")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: figures and tables again from --runs")  # fmt: skip
    parser.add_argument("--runs", type=Path, default=Path("runs/guide"), help="sweep folders")
    parser.add_argument("--figures", type=Path, default=Path("docs/guide"),
                        help="plots and tables for the guide")  # fmt: skip
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting for every run (repeatable)")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        if args.only in STEPS:
            print(STEPS[args.only](args.figures), flush=True)
            return 0
        chosen = [find(args.only)] if args.only else list(SWEEPS)
    except api.ConfigError as error:
        parser.error(str(error))
    if args.small:
        chosen = [sweep.shrunk() for sweep in chosen]
    if args.list:
        for sweep in chosen:
            print(f"# {sweep.name}: {sweep.question}")
            print(shlex.join(sweep.command(args.runs / sweep.name, args.extra)))
        return 0
    if not args.only:
        for step in STEPS.values():
            print(step(args.figures), flush=True)
    for sweep in chosen:
        if args.report_only:
            if not (args.runs / sweep.name / "sweep.json").is_file():
                print(f"{sweep.name}: no sweep in {args.runs / sweep.name}, skipped", flush=True)
                continue
            print(report(sweep, args.runs, args.figures, args.extra), flush=True)
        else:
            print(run(sweep, args.runs, args.figures, args.extra), flush=True)
    if not args.only:
        print(write_timings(args.runs, args.figures), flush=True)
    return 0


def write_timings(runs: Path, figures: Path) -> Path:
    """``timings.md``: how long each sweep in ``runs`` took, and all of them together."""
    rows = []
    for sweep in SWEEPS:
        path = runs / sweep.name / "sweep.json"
        record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        if "seconds" in record:  # a finished sweep
            rows.append({"sweep": sweep.name, "runs": record["combinations"],
                         "minutes": round(record["seconds"] / 60, 1)})  # fmt: skip
    total = round(sum(row["minutes"] for row in rows), 1)
    rows.append({"sweep": "all", "runs": sum(row["runs"] for row in rows), "minutes": total})
    text = ("# How long the guide's sweeps took\n\nEach sweep's `seconds` (sweep.json), one "
            "after another on the machine the guide names.\n\n")  # fmt: skip
    return write_atomically(figures / "timings.md", text + markdown_table(list(rows[0]), rows))


if __name__ == "__main__":
    raise SystemExit(main())
