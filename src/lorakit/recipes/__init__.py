"""Recipes: a TOML config (``recipes/<name>.toml``) plus the module that runs it.

A recipe's module is ``lorakit.recipes.<pipeline>`` (``pipeline`` in the TOML, default the
recipe's own name, ``-`` read as ``_``), so several TOMLs can share one pipeline. Its ``RECIPE``
is a ``lorakit.recipes.base.Recipe`` class: the steps, which ``lorakit.recipes.runner`` runs in
one order, and the entry points

    RECIPE.run(config, run_dir, resume=None) -> dict     # trains; returns the summary
    RECIPE.load_predictor(run_dir) -> Predictor          # for `lorakit predict` / `eval`
    RECIPE(config).trainable_report() -> str | None      # `lorakit train --dry-run`

``recipe_class(config)`` is the class; ``recipe_of_run(run_dir)`` the recipe of a finished run,
whose ``load_adapted(run_dir)`` loads its base model with the adapter. ``merged_predictor(folder)``
is the predictor of a folder ``lorakit merge`` wrote (no adapter: the weights hold it).

A ``Predictor`` has ``labels`` (class names) and ``predict_proba(texts) -> array (n, classes)``.
"""

from __future__ import annotations

import difflib
import importlib
import json
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Protocol

import numpy as np

from lorakit.config import Config, ConfigError, load_config, read_toml

if TYPE_CHECKING:
    from lorakit.recipes.base import Recipe

RECIPES_DIR = Path(__file__).parent
MERGE_RECORD = "merge.json"  # beside a merged model: what `lorakit merge` made it from
TASK_PIPELINES = {"classification": "sequence_classification", "causal-lm": "causal_lm"}


class Predictor(Protocol):
    labels: list[str]

    def predict_proba(self, texts: list[str]) -> np.ndarray: ...


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))


def recipe_path(name: str) -> Path:
    """The TOML of a built-in recipe; a ConfigError naming the close ones otherwise."""
    path = RECIPES_DIR / f"{name}.toml"
    if path.is_file():
        return path
    names = recipe_names()
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.4)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ConfigError(
        f"recipe: unknown recipe or config file {name!r}; {hint}built-in recipes: "
        f"{', '.join(names)} (or give a path to a .toml config)"
    )


def describe(name: str) -> str:
    """The recipe's one-line description (its TOML's ``description``)."""
    return str(read_toml(recipe_path(name)).get("description", ""))


def pipeline_module(config: Config) -> ModuleType:
    """The module that runs ``config``."""
    name = (config.pipeline or config.recipe).replace("-", "_")
    try:
        return importlib.import_module(f"lorakit.recipes.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"lorakit.recipes.{name}":
            raise
        raise ConfigError(
            f"pipeline: no pipeline module lorakit.recipes.{name}; set recipe (or pipeline) to "
            f"one of: {', '.join(recipe_names())}"
        ) from None


def recipe_class(config: Config) -> type[Recipe]:
    """The ``Recipe`` class that runs ``config``."""
    return pipeline_module(config).RECIPE


def recipe_of_run(run_dir: str | Path) -> Recipe:
    """The recipe of the finished run in ``run_dir``, ready to load its model back. A run made
    outside `lorakit train`, whose recipe has no pipeline module, is read by its task's."""
    config = load_config(Path(run_dir) / "config.toml")
    try:
        recipe = recipe_class(config)
    except ConfigError:
        name = TASK_PIPELINES[config.task]
        recipe = importlib.import_module(f"lorakit.recipes.{name}").RECIPE
    return recipe.of_run(run_dir, config)


def is_merged_model(folder: str | Path) -> bool:
    """Whether ``folder`` is a merged model that ``lorakit merge`` wrote."""
    return (Path(folder) / MERGE_RECORD).is_file()


def read_merge_record(folder: str | Path) -> dict:
    """The ``merge.json`` a merged model's folder holds (what `lorakit merge` made it from)."""
    return json.loads((Path(folder) / MERGE_RECORD).read_text(encoding="utf-8"))


def merged_predictor(folder: str | Path) -> Predictor:
    """The predictor of a merged classifier folder: the classic recipe's GloVe classifier or a
    transformers classifier, loaded as it is (no adapter)."""
    from lorakit.models.classic import is_classic

    folder = Path(folder)
    record = read_merge_record(folder)
    if record.get("task") == "causal-lm":
        raise ConfigError(
            f"{folder} is a merged causal LM; `lorakit predict` and `eval` classify: use "
            f'`lorakit generate {folder} "a prompt"`, `lorakit eval` on its run directory, or '
            "transformers' AutoModelForCausalLM"
        )
    name = "classic" if is_classic(folder) else TASK_PIPELINES["classification"]
    return importlib.import_module(f"lorakit.recipes.{name}").RECIPE.merged_predictor(
        folder, record
    )
