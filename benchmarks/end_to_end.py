"""Wall time of the default `lorakit train` (what `make run` runs) to its final test accuracy.

Runs the CLI in a fresh process, as a user would, and reads the run directory it wrote: the
time at which validation accuracy first reached the mark (0.84 by default), the training time,
the test accuracy and the total wall time (process start to exit: loading, tokenizing,
training, testing, both reload checks and the report included).

    python benchmarks/end_to_end.py                              # the default recipe
    python benchmarks/end_to_end.py --set train.bf16=false       # any --set of lorakit train
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, machine, markdown_table  # noqa: E402

COLUMNS = {
    "recipe": "",
    "settings": "",
    "first_val_at_mark_s": "",
    "train_s": ".0f",
    "wall_s": ".0f",
    "best_val_accuracy": ".4f",
    "test_accuracy": ".4f",
}


def run_default(recipe: str, overrides: list[str], out: Path) -> tuple[float, dict, list[dict]]:
    command = [sys.executable, "-m", "lorakit", "train", recipe, "--out", str(out)]
    if overrides:
        command += ["--set", *overrides]
    started = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - started
    summary = json.loads((out / "summary.json").read_text())
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return wall, summary, events


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", default="sentiment")
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--mark", type=float, default=0.84, help="validation accuracy to reach")
    parser.add_argument("--out", type=Path, default=RESULTS / "end_to_end.json")
    args = parser.parse_args()
    env = machine()
    with tempfile.TemporaryDirectory() as scratch:
        wall, summary, events = run_default(args.recipe, args.overrides, Path(scratch) / "run")
    evals = [e for e in events if e["event"] == "eval" and e.get("split") == "validation"]
    reached = next((e for e in evals if e["accuracy"] >= args.mark), None)
    row = {
        "recipe": args.recipe,
        "settings": " ".join(args.overrides) or "(defaults)",
        "first_val_at_mark_s": (
            f"{reached['time']:.0f} (step {reached['step']})" if reached else "not reached"
        ),
        "train_s": summary["train_seconds"],
        "wall_s": wall,
        "best_val_accuracy": summary["best_validation"]["accuracy"],
        "test_accuracy": summary["test_accuracy"],
        "mark": args.mark,
        "validation_curve": [(e["step"], e["time"], e["accuracy"]) for e in evals],
    }
    print(markdown_table([row], COLUMNS))
    print(f"load average before {env['load_average']}, after {list(os.getloadavg())}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": env, "rows": [row]}, indent=2))


if __name__ == "__main__":
    main()
