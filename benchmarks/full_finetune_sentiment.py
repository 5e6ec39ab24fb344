"""Full fine-tuning of the `sentiment` recipe's base (every weight trained): the ceiling LoRA is
measured against on rotten-tomatoes.

The same data, tokenization, loop (``lorakit.train.loop``), best-by-validation selection and
test evaluation as ``lorakit train sentiment``, with no LoRA: every parameter of MiniLM and its
head trains. Any ``--set`` of the recipe applies (full fine-tuning wants a small lr).

    python benchmarks/full_finetune_sentiment.py --set train.lr=5e-5 --set train.epochs=2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from lorakit.config import load_config
from lorakit.data import dataset_fingerprint
from lorakit.recipes import recipe_path
from lorakit.recipes.base import load_task_data
from lorakit.recipes.sequence_classification import data_loaders, load_base
from lorakit.rundir import RunDir
from lorakit.train.loop import train_loop
from lorakit.train.metrics import evaluate

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, machine, markdown_table  # noqa: E402

COLUMNS = {
    "settings": "",
    "trainable": ",",
    "best_step": "",
    "best_val_accuracy": ".4f",
    "test_accuracy": ".4f",
    "train_s": ".0f",
}


def full_finetune(overrides: list[str], run_dir: Path) -> dict:
    config = load_config(recipe_path("sentiment"), overrides)
    data = load_task_data(config)
    labels = data["train"].features["label"].names
    run = RunDir(run_dir)
    run.write_config(config)
    run.start_environment(config.seed, dataset_fingerprint(data))
    model, tokenizer, _ = load_base(config, labels)
    loaders = data_loaders(config, data, tokenizer)
    result = train_loop(
        model, loaders["train"], loaders["validation"], config.train, run_dir=run,
        seed=config.seed, desc="full fine-tuning",
    )  # fmt: skip
    model.eval()
    test = evaluate(model, loaders["test"])
    return {
        "settings": " ".join(overrides) or "(recipe defaults)",
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "best_step": result.best_step,
        "best_val_accuracy": result.best_metrics["accuracy"],
        "test_accuracy": test["accuracy"],
        "train_s": result.train_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=RESULTS / "full_finetune_sentiment.json")
    args = parser.parse_args()
    env = machine()
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        row = full_finetune(args.set, Path(tmp) / "run")
    row["wall_s"] = round(time.monotonic() - started, 1)
    print(markdown_table([row], COLUMNS))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": env, "rows": [row]}, indent=2))


if __name__ == "__main__":
    main()
