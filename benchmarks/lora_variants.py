"""LoRA, rsLoRA, DoRA and PiSSA on the same task: MiniLM sentiment (the `sentiment` recipe).

Each variant is `lorakit train sentiment` with one change, in a fresh process, one after another
(never two at once), on the same data, seed and selection rule (the best validation step):

    lora     the recipe as it is (r=8, alpha=16 on query, key, value)
    rslora   r=64 with rsLoRA's scaling alpha/sqrt(r) (lora.use_rslora)
    dora     r=8 with DoRA's magnitude and direction (lora.use_dora)
    pissa    r=8 started from W0's principal components (lora.init_lora_weights = "pissa")

Reported: test accuracy, trainable parameters, adapter bytes, training seconds per step (the run's
training time over its steps, evaluations included) and the steps taken.

    python benchmarks/lora_variants.py             # table + benchmarks/results/lora_variants.json
    python benchmarks/lora_variants.py --set data.max_train_samples=2000   # a shorter check
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, machine, markdown_table  # noqa: E402

VARIANTS = {
    "lora": [],
    "rslora": ["lora.r=64", "lora.use_rslora=true"],
    "dora": ["lora.use_dora=true"],
    "pissa": ["lora.init_lora_weights=pissa"],
}


def train(variant: str, folder: Path, extra: list[str]) -> dict:
    command = [sys.executable, "-m", "lorakit", "train", "sentiment", "--out", str(folder)]
    for setting in [*VARIANTS[variant], *extra]:
        command += ["--set", setting]
    start = time.monotonic()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.monotonic() - start
    summary = json.loads((folder / "summary.json").read_text())
    return {
        "variant": variant,
        "settings": " ".join(VARIANTS[variant]) or "(recipe)",
        "test_accuracy": summary["test_accuracy"],
        "trainable_params": summary["trainable_params"],
        "adapter_bytes": summary["adapter_bytes"],
        "seconds_per_step": summary["train_seconds"] / summary["steps"],
        "steps": summary["steps"],
        "wall_seconds": wall,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--set", dest="extra", action="append", default=[],
                        help="KEY=VALUE for every variant")  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS / "lora_variants.json")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants:
            rows.append(train(variant, Path(tmp, variant), args.extra))
            print(f"{variant}: test accuracy {rows[-1]['test_accuracy']:.4f}", flush=True)
    report = {
        "benchmark": "lora_variants",
        "command": " ".join(["python benchmarks/lora_variants.py", *sys.argv[1:]]),
        "machine": machine(),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    columns = {"variant": "s", "settings": "s", "test_accuracy": ".4f", "trainable_params": ",d",
               "adapter_bytes": ",d", "seconds_per_step": ".3f", "steps": "d"}  # fmt: skip
    print(markdown_table(rows, columns))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
