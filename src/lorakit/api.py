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

import inspect
import json
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lorakit import trackers
from lorakit.config import Config, ConfigError, load_config
from lorakit.recipes import describe, pipeline_module, recipe_names, recipe_path
from lorakit.rundir import RunDir, default_out, read_run_summary

DEFAULT_RECIPE = "sentiment"


def resolve_config(
    recipe_or_config: str | Path | None = None, overrides: Iterable[str] = ()
) -> Config:
    """A recipe name (``classic``) or a config file (``my.toml``, ``RUN_DIR/config.toml``) with
    ``--set`` overrides applied, validated."""
    source = str(recipe_or_config or DEFAULT_RECIPE)
    suffix = Path(source).suffix.lower()
    if suffix not in ("", ".toml"):
        from lorakit.data.files import FILE_SUFFIXES

        if suffix in FILE_SUFFIXES:
            raise ConfigError(
                f"{source!r} is a data file, not a recipe or a .toml config; train a recipe on "
                f"it: lorakit train {DEFAULT_RECIPE} --set data.path={source} "
                "data.text_column=... data.label_column=..."
            )
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
    *,
    resume: str | Path | None = None,
    processes: int = 1,
) -> dict[str, Any]:
    """Run a recipe; return its summary (also in ``RUN_DIR/summary.json``).

    ``resume``: a run directory whose training stopped (crash, kill); it continues from the
    newest checkpoint in ``RUN_DIR/checkpoints`` with the run's own config. ``processes``: train
    data-parallel in that many processes on this machine (``batch_size`` is the global batch).
    """
    from lorakit.train import distributed  # torch and accelerate: only when training
    from lorakit.train.checkpoint import checkpoint_step

    if processes < 1:
        raise ConfigError(f"processes: {processes} must be 1 or more")
    if processes > 1 and distributed.world_size() == 1:
        return _train_in_processes(recipe_or_config, out, overrides, resume, processes)
    checkpoint = None
    if resume is not None:
        if recipe_or_config is not None or out is not None or list(overrides):
            raise ConfigError(
                "--resume continues a run with its own config.toml and folder; leave out the "
                "recipe, --out and --set"
            )
        run_path, config, checkpoint = resume_point(resume)
    else:
        config = _absolute_data_path(resolve_config(recipe_or_config, overrides))
        run_path = Path(out or config.out or default_out(config.recipe))
    module = pipeline_module(config)
    if checkpoint is not None and "resume" not in inspect.signature(module.run).parameters:
        raise ConfigError(f"the {config.recipe!r} recipe's pipeline cannot resume a run yet")
    extra = {"resume": checkpoint} if checkpoint is not None else {}
    tracker_names = trackers.resolve(config.train.log_to)  # a missing package: before any work
    if not distributed.is_main_process():
        with distributed.worker_scratch() as scratch:
            return module.run(config, RunDir(scratch), **extra)
    before = set(os.listdir(run_path)) if run_path.is_dir() else None
    run_dir = RunDir(run_path, exist_ok=checkpoint is not None)
    environment = run_path / "environment.json"
    previous = json.loads(environment.read_text()) if checkpoint and environment.exists() else {}
    if checkpoint is None:
        run_dir.write_config(config)
    try:
        resumed_at = None if checkpoint is None else checkpoint_step(checkpoint)
        run_dir.trackers = trackers.Trackers(tracker_names, run_path, config, resumed_at)
        try:
            summary = module.run(config, run_dir, **extra)
        finally:  # closed before a failed setup's folder is removed: the writer still writes
            run_dir.trackers.finish()
            run_dir.trackers = None
    except BaseException:
        if checkpoint is None:
            _discard_unstarted(run_path, before)
        raise
    facts = {"processes": distributed.world_size()}
    if checkpoint is not None:
        facts.update(started=previous.get("started"), resumed_from=checkpoint.name)
    run_dir.update_environment(**facts)
    summary.setdefault("run_dir", str(run_path))
    return summary


def _absolute_data_path(config: Config) -> Config:
    """A relative ``data.path`` made absolute, so that the run's config.toml (which `lorakit
    eval` and a repeat read) finds the data from any working directory."""
    path = config.data.path and Path(config.data.path).expanduser()
    if not path or not path.exists():
        return config  # a missing path fails in the data loader, with the user's spelling
    data = config.data.model_copy(update={"path": str(path.resolve())})
    return config.model_copy(update={"data": data})


def _discard_unstarted(run_path: Path, before: set[str] | None) -> None:
    """A run that failed in setup (its data, model or LoRA settings) wrote only config.toml and
    environment.json: remove them, so that the same --out works once the input is fixed. A run
    that got further keeps its folder (metrics, checkpoints for --resume, a pretrained base)."""
    written = set(os.listdir(run_path)) - (before or set())
    if not written <= {"config.toml", "environment.json", "tensorboard", "wandb"}:
        return
    for name in written:
        if (run_path / name).is_dir():  # a tracker's folder, opened at the start
            shutil.rmtree(run_path / name)
        else:
            (run_path / name).unlink()
    if before is None:
        run_path.rmdir()


def resume_point(run_dir: str | Path) -> tuple[Path, Config, Path]:
    """A stopped run's folder, its config and its newest complete checkpoint."""
    from lorakit.train.checkpoint import latest_checkpoint

    run_path = Path(run_dir)
    if not (run_path / "config.toml").is_file():
        raise ConfigError(
            f"--resume: {str(run_path)!r} is not a run directory (no config.toml); give the "
            "folder `lorakit train` was writing"
        )
    if (run_path / "summary.json").exists():
        raise ConfigError(f"--resume: the run in {run_path} has finished; nothing to resume")
    config = load_config(run_path / "config.toml")
    checkpoint = latest_checkpoint(run_path / "checkpoints")
    if checkpoint is None:
        every = config.train.checkpoint_every
        raise ConfigError(
            f"--resume: {run_path} holds no complete checkpoint (train.checkpoint_every = "
            f"{every}{', off' if every == 0 else ''}); the run stopped before its first one, "
            "so start it again"
        )
    return run_path, config, checkpoint


def _train_in_processes(recipe_or_config, out, overrides, resume, processes: int) -> dict[str, Any]:
    """Start ``processes`` training processes (torch.distributed's launcher) and wait."""
    from lorakit.train import distributed

    if resume is not None:
        run_path, config, _ = resume_point(resume)
        args = ["--resume", str(run_path)]
    else:
        config = resolve_config(recipe_or_config, overrides)  # fails here, before launching
        run_path = Path(out or config.out or default_out(config.recipe))
        args = [str(recipe_or_config)] if recipe_or_config is not None else []
        args += ["--out", str(run_path)]
        for item in overrides:
            args += ["--set", item]
    for name in ("batch_size", "eval_batch_size"):
        size = getattr(config.train, name)
        if size % processes:
            raise ConfigError(
                f"train.{name}: {size} cannot be split among {processes} processes; it is the "
                f"global batch, so make it a multiple of {processes}"
            )
    distributed.launch(processes, args)
    summary = RunDir(run_path, exist_ok=True).read_summary()
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
    read_run_summary(run_dir)  # a damaged summary.json: one clean error before any work
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
    from lorakit.data import DataError, load_dataset
    from lorakit.data.errors import first_few
    from lorakit.data.files import COLUMN_FIX

    run_dir, config = _run_config(run_dir)
    text, label = config.data.text_column, config.data.label_column
    try:
        dsd = load_dataset(
            data or config.data.source, text_column=text, label_column=label, training=False
        )
    except DataError as error:  # eval takes no --set: the other file must use the run's columns
        if data is None or COLUMN_FIX not in str(error):
            raise
        fix = f"the run reads the columns {text!r} and {label!r}: rename the file's columns"
        raise DataError(str(error).replace(COLUMN_FIX, fix)) from None
    if split not in dsd:
        raise ConfigError(f"split: {split!r} does not exist; choose one of {', '.join(dsd)}")
    if len(dsd[split]) == 0:
        sizes = ", ".join(f"{name}={len(part)}" for name, part in dsd.items())
        raise ConfigError(
            f"split: the {split} split of {data or config.data.source} is empty ({sizes}); "
            "choose another --split, or give more rows or a 'split' column"
        )
    predictor = pipeline_module(config).load_predictor(run_dir)
    dataset = dsd[split]
    names = dataset.features["label"].names
    unknown = sorted(set(names) - set(predictor.labels))
    if unknown:
        raise ConfigError(
            f"data: labels {first_few(unknown)} are not among the model's labels {predictor.labels}"
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


def generate(
    run_dir: str | Path,
    prompt: str,
    *,
    max_new_tokens: int = 50,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stream: bool = False,
    on_text=None,
) -> str:
    """Continue ``prompt`` with a causal-LM run's base model + adapter; return the new text.

    ``temperature=0`` decodes greedily; ``stream=True`` hands each piece of text to ``on_text``
    (stdout by default) as it is decoded."""
    from lorakit.generate import generate as continue_text
    from lorakit.recipes.causal_lm import load_generator

    run_dir, config = _run_config(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    if summary.get("task") != "causal-lm":
        raise ConfigError(
            f"{run_dir} is a {summary.get('task', 'classification')} run; `generate` needs a "
            "causal-LM run (recipes causal-lm, instruct-verdicts); use `lorakit predict` here"
        )
    problems = []
    if max_new_tokens < 1:
        problems.append(f"max_new_tokens: must be at least 1 (got {max_new_tokens})")
    if temperature < 0:
        problems.append(f"temperature: must be >= 0, 0 meaning greedy (got {temperature})")
    if not 0 < top_p <= 1:
        problems.append(f"top_p: must be in (0, 1] (got {top_p})")
    if problems:
        raise ConfigError(problems)
    model, tokenizer = load_generator(run_dir)
    return continue_text(
        model, tokenizer, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
        top_p=top_p, seed=seed, stream=stream, on_text=on_text,
    )  # fmt: skip
