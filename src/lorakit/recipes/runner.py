"""The one skeleton every recipe runs: a recipe (``lorakit.recipes.base.Recipe``) says what to
build and measure, the runner says in which order and writes the run directory.

    start environment -> build -> print trainable -> train (lorakit loop or HF Trainer)
        -> restore best -> test + log -> save adapter -> reload checks -> summary
        -> comparison -> finish environment -> reports

A recipe that trains no adapter (pretraining a base model) runs its own middle between
``start`` and ``finish``.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorakit.config import Config, ConfigError
from lorakit.rundir import RunDir
from lorakit.train import engines
from lorakit.train.loop import TrainResult, train_loop
from lorakit.train.peak_memory import peak_memory, reset_peak_memory

if TYPE_CHECKING:
    import torch

    from lorakit.recipes.base import Recipe


def run(recipe: Recipe, run_dir: RunDir, resume: Path | None = None) -> dict[str, Any]:
    """Train and test ``recipe``; return the summary (also in ``RUN_DIR/summary.json``)."""
    config = recipe.config
    started = time.monotonic()
    reset_peak_memory()
    start(recipe, run_dir, resume)
    model = recipe.build_model(run_dir, resume)
    trainable, total = engines.parameter_counts(model)
    print(recipe.trainable_line(trainable, total), flush=True)
    loaders = recipe.loaders()
    result = train(recipe, model, loaders, run_dir, resume)
    model.eval()
    test = recipe.test(model, loaders)
    figures = {name: value for name, value in test.items() if isinstance(value, float)}
    run_dir.log("test", step=result.best_step, epoch=None, split="test", **figures)
    adapter_bytes = engines.save(
        model, run_dir.adapter_dir, recipe.base_name, base_path=recipe.base_path,
        labels=recipe.labels,
    )  # fmt: skip
    checks = recipe.reload_checks(model, loaders, run_dir, test)
    base_model, base_model_bytes = recipe.summary_base(run_dir)
    summary = {
        **run_summary(
            config, result, base_model=base_model, trainable=trainable, total=total,
            adapter_bytes=adapter_bytes, base_model_bytes=base_model_bytes,
        ),
        **peak_memory(),
        **recipe.summary_figures(result, test, checks, (trainable, total)),
    }  # fmt: skip
    if config.compare:
        recipe.compare(run_dir, summary)
    summary["total_seconds"] = round(time.monotonic() - started, 2)
    return finish(recipe, run_dir, summary)


def start(recipe: Recipe, run_dir: RunDir, resume: Path | None) -> None:
    """Refuse a resume the recipe cannot do; load the data; start environment.json."""
    if resume is not None and not recipe.resumable:  # for callers that skip lorakit.launch
        raise ConfigError(f"the {recipe.config.recipe!r} recipe's pipeline cannot resume a run yet")
    run_dir.start_environment(recipe.config.seed, recipe.load_data())


def train(
    recipe: Recipe,
    model: torch.nn.Module,
    loaders: dict,
    run_dir: RunDir,
    resume: Path | None,
) -> TrainResult:
    """Train with lorakit's loop (or transformers' Trainer); leave the best weights in ``model``."""
    config = recipe.config
    if recipe.hf_trainer and config.train.trainer == "hf":
        if resume is not None:
            raise ConfigError("--resume works with train.trainer = 'lorakit', not 'hf'")
        from lorakit.train.hf_trainer import train_with_hf_trainer

        return train_with_hf_trainer(
            model, loaders["train"].dataset, loaders["validation"].dataset,
            loaders["train"].collate_fn, config.train, run_dir=run_dir,
            seed=config.seed, output_dir=str(run_dir / "hf_trainer"),
        )  # fmt: skip
    return train_loop(
        model, loaders["train"], loaders["validation"], config.train, run_dir=run_dir,
        seed=config.seed, checkpoint_dir=run_dir / "checkpoints", resume=resume,
        **recipe.loop_options(),
    )  # fmt: skip


def finish(recipe: Recipe, run_dir: RunDir, summary: dict[str, Any]) -> dict[str, Any]:
    """Write summary.json, close environment.json, drop the checkpoints (a finished run cannot
    resume) unless ``train.keep_checkpoints_after_run``, draw the reports, print the closing
    line."""
    run_dir.write_summary(summary)
    run_dir.finish_environment()
    if not recipe.config.train.keep_checkpoints_after_run:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    write_reports(run_dir.path)
    line = recipe.closing_line(summary, run_dir)
    if line:
        print(line, flush=True)
    return summary


def run_summary(
    config: Config,
    result,
    *,
    base_model: str,
    trainable: int,
    total: int,
    adapter_bytes: int,
    base_model_bytes: int | None,
) -> dict:
    """The summary.json keys every recipe shares (docs/run-directory.md); each adds its own figures."""
    return {
        "recipe": config.recipe,
        "task": config.task,
        "dataset": config.data.source,
        "base_model": base_model,
        "engine": config.lora.engine,
        "trainable_params": trainable,
        "total_params": total,
        "adapter_bytes": adapter_bytes,
        "base_model_bytes": base_model_bytes,
        "train_seconds": result.train_seconds,
        "steps": result.steps,
        "best_step": result.best_step,
        "best_validation": result.best_metrics,
        "stopped_early": result.stopped_early,
        "seed": config.seed,
    }  # fmt: skip


def write_reports(run_dir: Path) -> list[Path]:
    """Plots and report.html from the run directory's files (``lorakit.report``)."""
    try:
        from lorakit.report import html, plots
    except ImportError:  # the report package is optional for a run
        return []
    written = [plots.plot_loss_accuracy(run_dir)]
    if (Path(run_dir) / "summary.json").is_file():
        written.append(plots.plot_confusion_matrix(run_dir))
    written.append(html.write_report(run_dir))
    return [Path(p) for p in written if p]
