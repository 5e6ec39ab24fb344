"""Starting a training run: the config resolved, a stopped run's resume point found, processes
launched if asked, and the recipe run inside its ``RunDir``.

``lorakit.api`` re-exports ``train``, ``dry_run`` and ``resolve_config``; ``lorakit.sweep`` runs
its grid through them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lorakit.config import Config, ConfigError, TrainConfig, load_config, resolve_key
from lorakit.recipes import recipe_class, recipe_path
from lorakit.rundir import RunDir, check_not_running, default_out, read_run_summary

DEFAULT_RECIPE = "sentiment"
FILE_RECIPE = "classify"  # `lorakit train my.csv`: the recipe for a file of one's own


def resolve_config(
    recipe_or_config: str | Path | None = None, overrides: Iterable[str] = ()
) -> Config:
    """A recipe name (``classic``) or a config file (``my.toml``, ``RUN_DIR/config.toml``) with
    ``--set`` overrides applied, validated. A data file (``my.csv``) is trained with the
    ``classify`` recipe, its text and label columns guessed unless ``--set`` names them."""
    source = str(recipe_or_config or DEFAULT_RECIPE)
    overrides = list(overrides)
    if Path(source).suffix.lower() not in ("", ".toml") and _is_data_file(source):
        overrides = [f"data.path={source}", *_file_columns(source, overrides), *overrides]
        source = FILE_RECIPE
    looks_like_file = source.endswith(".toml") or "/" in source or Path(source).is_file()
    path = Path(source) if looks_like_file else recipe_path(source)
    config = load_config(path, overrides)
    recipe_class(config)  # an unknown pipeline fails here, before any work
    return config


def _is_data_file(name: str) -> bool:
    from lorakit.data.files import FILE_SUFFIXES  # pandas: only for a file's name

    return Path(name).suffix.lower() in FILE_SUFFIXES


def _file_columns(path: str, overrides: list[str]) -> list[str]:
    """``--set`` items for the text and label columns of the data file at ``path`` that
    ``overrides`` leaves unnamed, guessed from the file; what was guessed is printed."""
    from lorakit.data.columns import guess_columns

    named = {}
    for item in overrides:
        key, _, value = item.partition("=")
        with contextlib.suppress(ConfigError):  # an unknown key is named by the validation
            named[resolve_key(key, "--set")] = value.strip()
    guess = guess_columns(path, named.get("data.text_column"), named.get("data.label_column"))
    if guess.line:
        print(guess.line, flush=True)
    return [f"data.text_column={guess.text_column}", f"data.label_column={guess.label_column}"]


def dry_run(recipe_or_config: str | Path | None = None, overrides: Iterable[str] = ()) -> str:
    """The resolved config as TOML, the data's sizes and the steps training will take, and the
    recipe's trainable-parameter report."""
    from lorakit.config import to_toml

    config = resolve_config(recipe_or_config, overrides)
    text = to_toml(config)
    recipe = recipe_class(config)(config)
    plan = recipe.plan()
    text += "\n# data and steps\n" + describe_plan(plan, config.train)
    if "pretrain" in plan:
        text += "\n" + describe_plan(plan["pretrain"], config.train, "pretrain: ")
    report = recipe.trainable_report()
    if report:
        text += "\n# trainable parameters\n" + report
    return text


def describe_plan(plan: dict[str, Any], train: TrainConfig, prefix: str = "") -> str:
    """Two lines: examples per split; steps per epoch, epochs and steps in all."""
    examples = ", ".join(f"{name} {count:,}" for name, count in plan["examples"].items())
    batch = f"batch_size {plan['batch_size']}"
    if plan["grad_accum_steps"] > 1:
        batch += f", grad_accum_steps {plan['grad_accum_steps']}"
    total = plan["total_steps"]
    if plan["steps_per_epoch"] is None:
        steps = f"{total:,} optimizer steps ({batch})"
    else:
        full = plan["steps_per_epoch"] * plan["epochs"]
        steps = (f"{plan['steps_per_epoch']:,} per epoch x {plan['epochs']} epochs = {full:,} "
                 f"optimizer steps ({batch})")  # fmt: skip
        if total < full:
            steps += f"; train.max_steps stops at {train.max_steps:,}"
        if train.early_stopping_patience:
            steps += f"; early stopping (patience {train.early_stopping_patience}) may end sooner"
    return f"{prefix}examples: {examples}\n{prefix}steps: {steps}"


def train(
    recipe_or_config: str | Path | None = None,
    out: str | Path | None = None,
    overrides: Iterable[str] = (),
    *,
    resume: str | Path | None = None,
    processes: int = 1,
    force: bool = False,
) -> dict[str, Any]:
    """Run a recipe; return its summary (also in ``RUN_DIR/summary.json``).

    ``resume``: a run directory whose training stopped (crash, kill); it continues from the
    newest checkpoint in ``RUN_DIR/checkpoints`` with the run's own config. ``force``: start
    over in an ``out`` that holds a run (one no live process holds), removing its files.
    ``processes``: train data-parallel in that many processes on this machine (``batch_size``
    is the global batch).
    """
    from lorakit.train import distributed  # torch and accelerate: only when training
    from lorakit.train.checkpoint import checkpoint_step

    overrides = list(overrides)
    if processes < 1:
        raise ConfigError(f"processes: {processes} must be 1 or more")
    if force and resume is not None:
        raise ConfigError("--force starts a run over, --resume continues one: give one of them")
    if processes > 1 and distributed.world_size() == 1:
        return _train_in_processes(recipe_or_config, out, overrides, resume, processes, force)
    if resume is not None:
        _refuse_settings_with_resume(recipe_or_config, out, overrides)
        run_path, config, checkpoint = resume_point(resume)
    else:
        config = _absolute_data_path(resolve_config(recipe_or_config, overrides))
        run_path, checkpoint = _new_run_path(out, config), None
    recipe = recipe_class(config)
    if checkpoint is not None and not recipe.resumable:
        raise ConfigError(f"the {config.recipe!r} recipe's pipeline cannot resume a run yet")
    if not distributed.is_main_process():
        with distributed.worker_scratch() as scratch:
            return recipe.run(config, RunDir(scratch), checkpoint)
    resumed_at = None if checkpoint is None else checkpoint_step(checkpoint)
    with RunDir.start(
        run_path, config, resume=checkpoint, resumed_at=resumed_at,
        processes=distributed.world_size(), force=force,
    ) as run_dir:  # fmt: skip
        summary = recipe.run(config, run_dir, checkpoint)
    summary.setdefault("run_dir", str(run_path))
    return summary


def resume_point(run_dir: str | Path) -> tuple[Path, Config, Path]:
    """A stopped run's folder, its config and its newest complete checkpoint."""
    from lorakit.train.checkpoint import latest_checkpoint

    run_path = Path(run_dir)
    if not (run_path / "config.toml").is_file():
        raise ConfigError(
            f"--resume: {str(run_path)!r} is not a run directory (no config.toml); give the "
            "folder `lorakit train` was writing"
        )
    check_not_running(run_path, "--resume")  # a live run has no checkpoint yet, or a newer one
    if (run_path / "summary.json").exists():
        raise ConfigError(f"--resume: the run in {run_path} has finished; nothing to resume")
    config = load_config(run_path / "config.toml")
    checkpoint = latest_checkpoint(run_path / "checkpoints")
    if checkpoint is None:
        every = config.train.checkpoint_every
        raise ConfigError(
            f"--resume: {run_path} holds no complete checkpoint (train.checkpoint_every = "
            f"{every}{', off' if every == 0 else ''}): the run stopped before its first one. "
            f"Start it over in its folder with `lorakit train {run_path / 'config.toml'} --out "
            f"{run_path} --force`{recipe_class(config)(config).restart_note(run_path)}"
        )
    return run_path, config, checkpoint


def _refuse_settings_with_resume(recipe_or_config, out, overrides: list[str]) -> None:
    if recipe_or_config is not None or out is not None or overrides:
        raise ConfigError(
            "--resume continues a run with its own config.toml and folder; leave out the "
            "recipe, --out and --set"
        )


def _new_run_path(out: str | Path | None, config: Config) -> Path:
    return Path(out or config.out or default_out(config.run_name))


def _absolute_data_path(config: Config) -> Config:
    """A relative ``data.path`` made absolute, so that the run's config.toml (which `lorakit
    eval` and a repeat read) finds the data from any working directory."""
    path = config.data.path and Path(config.data.path).expanduser()
    if not path or not path.exists():
        return config  # a missing path fails in the data loader, with the user's spelling
    data = config.data.model_copy(update={"path": str(path.resolve())})
    return config.model_copy(update={"data": data})


def _train_in_processes(
    recipe_or_config, out, overrides: list[str], resume, processes: int, force: bool
) -> dict[str, Any]:
    """Start ``processes`` training processes (torch.distributed's launcher) and wait; each runs
    ``train`` again, the main one inside the run's ``RunDir``."""
    from lorakit.train import distributed

    if resume is not None:
        run_path, config, _ = resume_point(resume)
        args = ["--resume", str(run_path)]
    else:
        config = resolve_config(recipe_or_config, overrides)  # fails here, before launching
        run_path = _new_run_path(out, config)
        args = [str(recipe_or_config)] if recipe_or_config is not None else []
        args += ["--out", str(run_path)]
        for item in overrides:
            args += ["--set", item]
        args += ["--force"] if force else []
    for name in ("batch_size", "eval_batch_size"):
        size = getattr(config.train, name)
        if size % processes:
            raise ConfigError(
                f"train.{name}: {size} cannot be split among {processes} processes; it is the "
                f"global batch, so make it a multiple of {processes}"
            )
    distributed.launch(processes, args)
    summary = read_run_summary(run_path)
    summary.setdefault("run_dir", str(run_path))
    return summary
