"""The Python API behind every CLI command; a notebook makes the same calls.

```python
import lorakit.api as lk
summary = lk.train("classic", overrides=["train.epochs=3"])   # a recipe name or a .toml path
lk.evaluate("runs/classic-...", split="test")                 # {"accuracy", "loss", ...}
lk.predict("runs/classic-...", ["A lacklustre movie."])       # [{"label", "probabilities"}]
lk.list_recipes()                                             # {name: description}
```
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lorakit.config import Config, ConfigError, load_config
from lorakit.recipes import describe, pipeline_module, recipe_names, recipe_path
from lorakit.rundir import RunDir, default_out

DEFAULT_RECIPE = "classic"


def resolve_config(
    recipe_or_config: str | Path | None = None, overrides: Iterable[str] = ()
) -> Config:
    """A recipe name (``classic``) or a config file (``my.toml``, ``RUN_DIR/config.toml``) with
    ``--set`` overrides applied, validated."""
    source = str(recipe_or_config or DEFAULT_RECIPE)
    looks_like_file = source.endswith(".toml") or "/" in source or Path(source).is_file()
    path = Path(source) if looks_like_file else recipe_path(source)
    config = load_config(path, overrides)
    pipeline_module(config)  # an unknown pipeline fails here, before any work
    return config


def dry_run(recipe_or_config: str | Path | None = None, overrides: Iterable[str] = ()) -> str:
    """The resolved config as TOML, and the recipe's trainable-parameter report."""
    from lorakit.config import to_toml

    config = resolve_config(recipe_or_config, overrides)
    text = to_toml(config)
    module = pipeline_module(config)
    if hasattr(module, "dry_run"):
        text += "\n# trainable parameters\n" + module.dry_run(config)
    return text


def train(
    recipe_or_config: str | Path | None = None,
    out: str | Path | None = None,
    overrides: Iterable[str] = (),
) -> dict[str, Any]:
    """Run a recipe; return its summary (also in ``RUN_DIR/summary.json``)."""
    config = resolve_config(recipe_or_config, overrides)
    run_path = Path(out or config.out or default_out(config.recipe))
    run_dir = RunDir(run_path)
    run_dir.write_config(config)
    summary = pipeline_module(config).run(config, run_dir)
    summary.setdefault("run_dir", str(run_path))
    return summary


def _run_config(run_dir: str | Path) -> tuple[Path, Config]:
    run_dir = Path(run_dir)
    for name in ("config.toml", "summary.json", "adapter"):
        if not (run_dir / name).exists():
            raise ConfigError(
                f"{run_dir} is not a finished run directory (no {name}); give the folder "
                "`lorakit train` wrote, e.g. runs/classic-20250101-120000"
            )
    return run_dir, load_config(run_dir / "config.toml")


def load_predictor(run_dir: str | Path):
    """The run's model with its adapter, ready for ``predict_proba(texts)``."""
    run_dir, config = _run_config(run_dir)
    return pipeline_module(config).load_predictor(run_dir)


def predict(run_dir: str | Path, texts: Sequence[str]) -> list[dict[str, Any]]:
    """For each text: the predicted ``label``, its ``probability`` and all ``probabilities``."""
    predictor = load_predictor(run_dir)
    probabilities = predictor.predict_proba(list(texts))
    results = []
    for row in probabilities:
        best = int(np.argmax(row))
        results.append({
            "label": predictor.labels[best],
            "probability": float(row[best]),
            "probabilities": {name: float(p) for name, p in zip(predictor.labels, row, strict=True)},
        })  # fmt: skip
    return results


def evaluate(run_dir: str | Path, data: str | None = None, split: str = "test") -> dict[str, Any]:
    """Accuracy and loss of a finished run on a split of its data (or of ``data``)."""
    from lorakit.data import load_dataset

    run_dir, config = _run_config(run_dir)
    dsd = load_dataset(
        data or config.data.source,
        text_column=config.data.text_column,
        label_column=config.data.label_column,
    )
    if split not in dsd:
        raise ConfigError(f"split: {split!r} does not exist; choose one of {', '.join(dsd)}")
    predictor = pipeline_module(config).load_predictor(run_dir)
    dataset = dsd[split]
    names = dataset.features["label"].names
    unknown = sorted(set(names) - set(predictor.labels))
    if unknown:
        raise ConfigError(
            f"data: labels {unknown} are not among the model's labels {predictor.labels}"
        )
    truth = np.array([predictor.labels.index(names[i]) for i in dataset["label"]])
    probabilities = predictor.predict_proba(dataset["text"])
    predictions = probabilities.argmax(axis=1)
    picked = probabilities[np.arange(len(truth)), truth]
    return {
        "split": split,
        "dataset": data or config.data.source,
        "examples": len(truth),
        "accuracy": float((predictions == truth).mean()),
        "loss": float(-np.log(np.clip(picked, 1e-12, 1.0)).mean()),
        "recorded_test_accuracy": json.loads((run_dir / "summary.json").read_text()).get(
            "test_accuracy"
        ),
    }


def list_recipes() -> dict[str, str]:
    """Built-in recipe names and their one-line descriptions."""
    return {name: describe(name) for name in recipe_names()}
