"""Wall time of every offline built-in recipe, run as a user runs it (`lorakit train RECIPE`).

Each recipe runs in a fresh process, one after another (never two at once: on a small CPU two
torch jobs slow each other far more than twice), into a scratch folder; the table gives the wall
time (process start to exit: loading, training, testing, reload checks, report), the training
time the run recorded, and its headline figure. The README's recipe times come from here.

    python benchmarks/recipe_times.py                       # every offline recipe
    python benchmarks/recipe_times.py classic sentiment     # some of them

`classify` runs `lorakit train reviews.csv` on rotten-tomatoes written out as a CSV (columns
`review`, `verdict`), as a user classifies a file of their own. The causal recipes (`causal-lm`,
`instruct`, `summarize`) run on SmolLM2: whichever comes first on a cold cache converts its GGUF
file (about 20 s). `pretrain-tiny-gpt2` fills the tiny GPT-2's cache, which only runs that ask for
`model.name = "tiny-gpt2"` use.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, machine, markdown_table  # noqa: E402

OFFLINE_RECIPES = (
    "pretrain-tiny-gpt2",
    "classic",
    "sentiment",
    "topics",
    "seed-rotten-tomatoes",
    "causal-lm",
    "instruct",
    "summarize",
    "classify",
)  # fmt: skip; seed-distilbert-imdb needs a network
COLUMNS = {"recipe": "", "wall_s": ".0f", "train_s": ".0f", "figure": "", "value": ".4f"}
HEADLINE = ("test_accuracy", "test_verdict_accuracy", "test_rougeL", "test_perplexity")


def reviews_csv(path: Path) -> Path:
    """rotten-tomatoes as a user's own file: every row, columns named as a user might."""
    from lorakit.data import load_dataset

    rows = []
    for split in load_dataset("rotten-tomatoes").values():
        names = split.features["label"].names
        pairs = zip(split["text"], split["label"], strict=True)
        rows += [(text, names[label]) for text, label in pairs]
    with path.open("w", newline="", encoding="utf-8") as file:
        csv.writer(file).writerows([("review", "verdict"), *rows])
    return path


def time_recipe(recipe: str, out: Path) -> dict:
    target = str(reviews_csv(out.parent / "reviews.csv")) if recipe == "classify" else recipe
    started = time.perf_counter()
    command = [sys.executable, "-m", "lorakit", "train", target, "--out", str(out)]
    subprocess.run(command, check=True)
    wall = time.perf_counter() - started
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    figure = next(name for name in HEADLINE if summary.get(name) is not None)
    return {
        "recipe": recipe,
        "wall_s": wall,
        "train_s": summary.get("train_seconds"),
        "figure": figure,
        "value": summary[figure],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="*", default=list(OFFLINE_RECIPES))
    parser.add_argument("--out", type=Path, default=RESULTS / "recipe_times.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for recipe in args.recipes:
            rows.append(time_recipe(recipe, Path(scratch) / recipe))
            print(markdown_table(rows[-1:], COLUMNS), flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)  # after each: a failure keeps them
            args.out.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2) + "\n")
    print(markdown_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
