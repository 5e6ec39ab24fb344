"""The sweeps behind docs/guide.md, as data: every figure in the guide comes from one of them.

    python -m lorakit.guide --list                 # each sweep's `lorakit sweep` command
    python -m lorakit.guide --only alpha           # run one (all of them without --only)
    python -m lorakit.guide --only alpha --small   # every run shrunk to seconds: a smoke test

A sweep runs in ``--runs`` (``runs/guide/NAME``); its plots are copied to ``--figures``
(``docs/guide/NAME-<plot>.png``) and its per-setting table (mean and spread over the seeds, the
Pareto fronts) written to ``docs/guide/NAME.md``. ``--small`` keeps each grid key's first two
values, runs one seed, and adds the recipe's small settings (a few steps on little data).
``--set KEY=VALUE`` goes to every run (``model.name=...`` for a model of one's own).
"""

from __future__ import annotations

import argparse
import shlex
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lorakit import api
from lorakit.report.runfiles import PLOTS_DIR, write_atomically
from lorakit.report.sweep import (
    markdown_table,
    read_sweep_table,
    setting_summary,
    settings_markdown,
    sweep_metric,
)

SEEDS = 3
# The guide's runs are shorter than the recipes' defaults so that every sweep reruns in an
# afternoon on two cores; each figure's command carries these settings.
MINILM = ("train.epochs=1", "data.max_train_samples=4000")
INSTRUCT = ("data.max_train_samples=1000", "data.max_eval_samples=200", "train.eval_every=0",
            "train.checkpoint_every=0")
FORGETTING = ("data.max_train_samples=2000", "data.max_eval_samples=100", "train.eval_every=0",
              "train.checkpoint_every=0", "compare=true", "causal.forgetting_on=bbc-news")
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

    def shrunk(self) -> GuideSweep:
        """The same sweep in seconds: two values a grid key, one seed, the small settings."""
        grid = tuple(_first_values(item, 2) for item in self.grid)
        settings = (*self.settings, *SMALL.get(self.recipe, ()))
        return GuideSweep(self.name, self.question, self.recipe, grid, settings, 1)

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
               ("r=8",), (*MINILM, "compare=true")),
    GuideSweep("r-instruct", "How do perplexity and verdict accuracy move with r on an LLM?",
               "instruct", ("r=1,8,64",), INSTRUCT, seeds=2),
    GuideSweep("forgetting", "How far does domain adaptation move the model on other text, "
               "LoRA against full fine-tuning?", "causal-lm", ("r=8",), FORGETTING, seeds=2),
    GuideSweep("classic", "The classic path: a GloVe classifier pretrained on news topics, "
               "moved to review sentiment by LoRA, against other ways to train it", "classic",
               ("r=2",), ("compare=true",)),
)  # fmt: skip


def _first_values(item: str, count: int) -> str:
    key, _, values = item.partition("=")
    separator = "|" if "|" in values else ","
    return f"{key}={separator.join(values.split(separator)[:count])}"


def find(name: str) -> GuideSweep:
    for sweep in SWEEPS:
        if sweep.name == name:
            return sweep
    names = ", ".join(s.name for s in SWEEPS)
    raise api.ConfigError(f"--only {name!r}: no such guide sweep; choose one of {names}")


def run(sweep: GuideSweep, runs: Path, figures: Path, extra: Sequence[str] = ()) -> Path:
    """Run ``sweep`` into ``runs/NAME``; copy its plots and write its table into ``figures``."""
    out = runs / sweep.name
    print("$ " + shlex.join(sweep.command(out, extra)), flush=True)
    record = api.sweep(sweep.recipe, list(sweep.grid), out=out,
                       overrides=[*sweep.settings, *extra], seeds=sweep.seeds)  # fmt: skip
    figures.mkdir(parents=True, exist_ok=True)
    for plot in sorted((out / PLOTS_DIR).glob("*.png")):
        shutil.copyfile(plot, figures / f"{sweep.name}-{plot.name}")
    text = f"# {sweep.name}: {sweep.question}\n\n`{shlex.join(sweep.command(out, extra))}`\n\n"
    text += f"{record['succeeded']} of {record['succeeded'] + record['failed']} runs succeeded.\n"
    text += settings_markdown(out, per_setting=True)
    return write_atomically(figures / f"{sweep.name}.md", text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorakit.guide", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--list", action="store_true", help="print each sweep's command")
    parser.add_argument("--only", metavar="NAME", help="run this sweep only")
    parser.add_argument("--small", action="store_true", help="shrink every run (a smoke test)")
    parser.add_argument("--runs", type=Path, default=Path("runs/guide"), help="sweep folders")
    parser.add_argument("--figures", type=Path, default=Path("docs/guide"),
                        help="plots and tables for the guide")  # fmt: skip
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting for every run (repeatable)")  # fmt: skip
    args = parser.parse_args(argv)
    try:
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
    for sweep in chosen:
        print(run(sweep, args.runs, args.figures, args.extra), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
