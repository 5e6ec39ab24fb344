"""The recipe protocol: what a recipe builds, what it measures, and how it loads a run back.

A recipe is a class with small named steps; ``lorakit.recipes.runner.run`` calls them in one
order for every recipe::

    load_data -> build_model -> loaders -> train (runner) -> test -> save adapter (runner)
        -> reload_checks -> summary_figures -> compare -> closing_line

A finished run comes back through the same class: ``Recipe.of_run(run_dir)`` reads the run's
``config.toml`` and ``summary.json``, and ``load_adapted(run_dir)`` is the one place that says how
this recipe's base model and adapter are loaded again (`lorakit predict`, `eval`, `merge`,
`generate`).

The steps keep what they build on the recipe object (``self.data``, ``self.tokenizer``,
``self.base_name`` ...), so each step takes only what the runner owns: the model, the loaders,
the run directory, the training result.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from lorakit import lora
from lorakit.config import Config, ConfigError, TrainConfig, load_config
from lorakit.data import dataset_fingerprint, load_dataset
from lorakit.recipes import runner
from lorakit.rundir import RunDir, read_run_summary
from lorakit.train import engines
from lorakit.train.loop import TrainResult, planned_steps
from lorakit.train.metrics import confusion_matrix, evaluate, per_class_scores


def load_task_data(config: Config):
    """The recipe's data (``data`` section), with ``max_train_samples`` applied reproducibly."""
    dsd = load_dataset(
        config.data.source,
        text_column=config.data.text_column,
        label_column=config.data.label_column,
    )
    if config.data.max_train_samples:
        train = dsd["train"].shuffle(seed=config.seed)
        dsd["train"] = train.select(range(min(len(train), config.data.max_train_samples)))
    return dsd


class Recipe:
    """One recipe's steps. Subclasses fill in the building and measuring steps."""

    resumable = True  # `lorakit train --resume` can continue it from a checkpoint
    hf_trainer = False  # `train.trainer = "hf"` trains it with transformers' Trainer

    def __init__(self, config: Config):
        self.config = config
        self.base_name: str | None = None  # the base model, as the adapter file records it
        self.base_path: str | None = None  # the folder its weights came from, if not base_name
        self.labels: list[str] | None = None  # a classifier's class names, in label order

    # ------------------------------------------------------------ entry points (lorakit.api)
    @classmethod
    def run(cls, config: Config, run_dir: RunDir, resume: Path | None = None) -> dict[str, Any]:
        """Train and test; ``resume``: a checkpoint folder of this run to continue from."""
        return runner.run(cls(config), run_dir, resume)

    @classmethod
    def load_predictor(cls, run_dir: Path):
        """The finished run's model, ready for ``predict_proba(texts)``."""
        return cls.of_run(run_dir).predictor(run_dir)

    @classmethod
    def of_run(cls, run_dir: str | Path, config: Config | None = None) -> Recipe:
        """The recipe of a finished run, knowing what its summary.json recorded."""
        run_dir = Path(run_dir)
        recipe = cls(config or load_config(run_dir / "config.toml"))
        recipe.recall(run_dir, read_run_summary(run_dir))
        return recipe

    # ------------------------------------------------------------ building
    def load_data(self) -> str:
        """Load the data; return its fingerprint (environment.json)."""
        raise NotImplementedError

    def build_model(self, run_dir: RunDir, resume: Path | None) -> torch.nn.Module:
        """The base model with LoRA added (base frozen); sets ``self.base_name``."""
        raise NotImplementedError

    def trainable_line(self, trainable: int, total: int) -> str:
        """The console line that reports the trainable parameters."""
        raise NotImplementedError

    def loaders(self) -> dict[str, torch.utils.data.DataLoader]:
        """Fresh train / validation / test loaders."""
        raise NotImplementedError

    def loop_options(self) -> dict[str, Any]:
        """Recipe-specific arguments of ``train_loop`` (``desc``, ``metric``, ``evaluate_fn``)."""
        return {"desc": self.config.run_name}

    # ------------------------------------------------------------ measuring
    def test(self, model: torch.nn.Module, loaders: dict) -> dict[str, Any]:
        """The test figures, ``loss`` first; the float ones are logged as the ``test`` event,
        the rest (predictions) is there for ``reload_checks`` and ``summary_figures``."""
        raise NotImplementedError

    def reload_checks(
        self, model: torch.nn.Module, loaders: dict, run_dir: RunDir, test: dict[str, Any]
    ) -> dict[str, Any]:
        """Load the saved adapter into a fresh base: the same outputs as the trained model?"""
        raise NotImplementedError

    def summary_base(self, run_dir: RunDir) -> tuple[str, int | None]:
        """(``base_model``, ``base_model_bytes``) as summary.json records them."""
        raise NotImplementedError

    def summary_figures(
        self,
        result: TrainResult,
        test: dict[str, Any],
        checks: dict[str, Any],
        counts: tuple[int, int],
    ) -> dict[str, Any]:
        """The summary.json keys of this recipe, after the ones every recipe shares."""
        raise NotImplementedError

    def compare(self, run_dir: RunDir, summary: dict[str, Any]) -> None:
        """With ``compare = true``: the recipe's comparison table (comparison.json / .md)."""

    def closing_line(self, summary: dict[str, Any], run_dir: RunDir) -> str | None:
        """The last console line of a run, if the recipe prints one."""
        return None

    def trainable_report(self) -> str | None:
        """The trainable-parameter report of ``lorakit train --dry-run`` (None: no adapter)."""
        return None

    def restart_note(self, run_dir: Path) -> str:
        """What else to know before a run stopped before its first checkpoint starts over in
        its folder (``--force``); it ends the ``--resume`` error."""
        return ""

    def plan(self) -> dict[str, Any]:
        """What a run trains on and for how long (``lorakit train --dry-run``): ``examples`` per
        split, ``steps_per_epoch`` and ``total_steps`` (optimizer steps). Loads the data."""
        self.load_data()
        return plan_of(self.split_sizes(), self.config.train)

    def split_sizes(self) -> dict[str, int]:
        """Examples per split of the loaded data (train, validation, test)."""
        raise NotImplementedError

    # ------------------------------------------------------------ a finished run
    def recall(self, run_dir: Path, summary: dict[str, Any]) -> None:
        """Take what loading the run back needs from its summary.json."""
        self.base_name = summary["base_model"]

    def reload_base(self) -> tuple[torch.nn.Module, Any]:
        """(a fresh base model as the adapter was trained on, its tokenizer)."""
        raise NotImplementedError

    def load_adapted(self, run_dir: str | Path, engine: str = "lorakit"):
        """(the base with the run's adapter loaded by ``engine``, in eval mode; its tokenizer)."""
        model, tokenizer = self.reload_base()
        return engines.load(model, Path(run_dir) / "adapter", engine).eval(), tokenizer

    def predictor(self, run_dir: Path):
        """A ``Predictor`` of the finished run (``lorakit predict`` / ``eval``)."""
        raise ConfigError(f"{run_dir}: the {self.config.recipe!r} recipe makes no predictor")

    def remeasure(self, run_dir: Path, data: str | None = None, split: str = "test"):
        """The run's own figures on ``split`` measured again with base + the saved adapter
        (``lorakit eval`` of a recipe that makes no predictor)."""
        raise ConfigError(f"{run_dir}: the {self.config.recipe!r} recipe cannot be re-measured")

    @classmethod
    def merged_predictor(cls, folder: Path, record: dict[str, Any]):
        """A ``Predictor`` of the model ``lorakit merge`` wrote to ``folder`` (``record``: its
        merge.json)."""
        raise ConfigError(f"{folder}: lorakit does not load this merged model")


class ClassificationRecipe(Recipe):
    """A recipe for text classification: data with ``text`` and ``label`` columns (the
    ``data`` section), measured by loss and accuracy on the test split."""

    def load_data(self) -> str:
        self.data = load_task_data(self.config)
        self.labels = self.data["train"].features["label"].names
        return dataset_fingerprint(self.data)

    def test(self, model: torch.nn.Module, loaders: dict) -> dict[str, Any]:
        return evaluate(model, loaders["test"])

    def split_sizes(self) -> dict[str, int]:
        return {name: len(split) for name, split in self.data.items()}

    def class_figures(self, test: dict[str, Any]) -> dict[str, Any]:
        """summary.json's ``labels``, test ``confusion_matrix`` and ``per_class`` scores."""
        matrix = confusion_matrix(test["labels"], test["predictions"], len(self.labels))
        return {
            "labels": self.labels,
            "confusion_matrix": matrix,
            "per_class": per_class_scores(matrix, self.labels),
        }

    def recall(self, run_dir: Path, summary: dict[str, Any]) -> None:
        super().recall(run_dir, summary)
        self.labels = summary["labels"]


def plan_of(examples: dict[str, int], train: TrainConfig) -> dict[str, Any]:
    """A ``plan``: the splits' sizes and the loop's steps when it trains on ``examples["train"]``
    in batches of ``train.batch_size``."""
    per_epoch, total = planned_steps(math.ceil(examples["train"] / train.batch_size), train)
    return {
        "examples": examples, "batch_size": train.batch_size,
        "grad_accum_steps": train.grad_accum_steps, "epochs": train.epochs,
        "steps_per_epoch": per_epoch, "total_steps": total,
    }  # fmt: skip


def lora_report(name: str, model: torch.nn.Module) -> str:
    """One line: which layers got LoRA and how many parameters train."""
    trainable, total = engines.parameter_counts(model)
    targets = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                      if isinstance(m, lora.LoraLayer)})  # fmt: skip
    return (f"{name}: LoRA on {', '.join(targets) or '(peft engine)'}; "
            f"trainable {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")  # fmt: skip
