"""A sweep's outputs: `sweep.csv`, `sweep.md`, and plots of the metric against trainable
parameters and against r (one line per lora_alpha and other varied grid key).

The best run is chosen as each run chose its checkpoint, on validation (summary.json's
``best_validation``), never on test; `test_noise` says how large a test difference is noise
(the binomial standard error of an accuracy), and `seed_spread` what the seeds alone change.

The sweep runner trains each combination and hands its rows here; these functions only read
run directories and the sweep folder's files.
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

from .plots import save_figure
from .runfiles import (
    PLOTS_DIR,
    SUMMARY_FILE,
    SWEEP_CSV,
    SWEEP_MD,
    ReportError,
    existing_dir,
    read_summary,
    write_atomically,
)

METRIC_VS_PARAMS_PNG = "metric_vs_trainable_params.png"
METRIC_VS_R_PNG = "metric_vs_r.png"
METRIC_COLUMNS = ("test_accuracy", "test_perplexity")
# best_validation's figures, as sweep columns
VALIDATION_COLUMNS = ("val_accuracy", "val_verdict_accuracy", "val_perplexity", "val_loss")
# Columns a sweep row carries besides its grid keys, in the order the table shows them.
RESULT_COLUMNS = (
    "status",
    *METRIC_COLUMNS,
    "test_loss",
    *VALIDATION_COLUMNS,
    "test_examples",
    "trainable_params",
    "total_params",
    "trainable_percent",
    "adapter_bytes",
    "train_seconds",
    "best_step",
    "seed",
    "error",
    "run_dir",
)
STATUSES = ("ok", "failed")


def collect_run_summary(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """One finished run's figures as a sweep row (without the grid keys, which the runner adds)."""
    run_dir = existing_dir(run_dir)
    summary = read_summary(run_dir)
    if summary is None:
        raise ReportError(f"{run_dir / SUMMARY_FILE} is missing: the run did not finish")
    if not any(summary.get(m) is not None for m in METRIC_COLUMNS):
        raise ReportError(f"{run_dir / SUMMARY_FILE} has neither test_accuracy nor test_perplexity")
    row: dict[str, Any] = {"status": "ok", "error": "", "run_dir": str(run_dir)}
    for key in RESULT_COLUMNS:
        if key in summary and key not in row:
            row[key] = summary[key]
    trainable, total = summary.get("trainable_params"), summary.get("total_params")
    if trainable is not None and total:
        row["trainable_percent"] = 100.0 * trainable / total
    for key, value in (summary.get("best_validation") or {}).items():
        if f"val_{key}" in VALIDATION_COLUMNS:
            row[f"val_{key}"] = value
    if summary.get("confusion_matrix"):
        row["test_examples"] = sum(sum(counts) for counts in summary["confusion_matrix"])
    return row


def grid_keys(columns: list[str]) -> list[str]:
    """The columns of a sweep table that are not results: the swept hyperparameters."""
    return [c for c in columns if c not in RESULT_COLUMNS]


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return value


def format_value(value: Any) -> str:
    """A table cell for people: floats to four significant digits, big numbers with commas."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, float):
        if value.is_integer() and abs(value) >= 10_000:
            return f"{int(value):,}"
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(_cell(value))


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    seen: list[str] = []
    for row in rows:
        seen.extend(k for k in row if k not in seen)
    results = [c for c in RESULT_COLUMNS if c in seen]
    return grid_keys(seen) + results


def _check_rows(rows: list[dict[str, Any]]) -> None:
    if not rows:
        raise ReportError("a sweep table needs at least one row (one per grid combination)")
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or row.get("status") not in STATUSES:
            raise ReportError(
                f'sweep row {number} needs a "status" of "ok" or "failed", got {row!r:.120}'
            )


def markdown_table(columns: list[str], rows: list[dict[str, Any]], max_cell: int = 80) -> str:
    """A GitHub-flavoured Markdown table; pipes escaped, long cells cut."""

    def cell(value: Any) -> str:
        text = format_value(value).replace("|", "\\|").replace("\n", " ")
        return text if len(text) <= max_cell else text[: max_cell - 1] + "…"

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_sweep_table(
    sweep_dir: str | os.PathLike[str], rows: list[dict[str, Any]]
) -> tuple[Path, Path]:
    """Write `sweep.csv` (every column, raw values) and `sweep.md` (readable) for the rows."""
    _check_rows(rows)
    sweep_dir = Path(sweep_dir)
    columns = _columns(rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({c: _cell(row.get(c)) for c in columns} for row in rows)
    csv_path = write_atomically(sweep_dir / SWEEP_CSV, buffer.getvalue())

    ok = sum(row["status"] == "ok" for row in rows)
    heading = f"# Sweep: {ok} of {len(rows)} runs succeeded\n\n"
    md_path = write_atomically(sweep_dir / SWEEP_MD, heading + markdown_table(columns, rows))
    return csv_path, md_path


def read_sweep_table(sweep_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """`sweep.csv` as a DataFrame, checked for the columns reports need."""
    path = existing_dir(sweep_dir, "sweep directory") / SWEEP_CSV
    if not path.is_file():
        raise ReportError(f"{path} is missing: run `lorakit sweep` to make the sweep table first")
    try:
        table = pd.read_csv(path, keep_default_na=False, na_values=[""])
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as error:
        raise ReportError(f"{path} is not a readable CSV table ({error})") from None
    if "status" in table.columns and not (table["status"] == "ok").any():
        # no run succeeded, so no run wrote results: their columns are empty, not missing
        for column in ("trainable_params", METRIC_COLUMNS[0]):
            if column not in table.columns:
                table[column] = None
    missing = [c for c in ("status", "trainable_params") if c not in table.columns]
    if not any(m in table.columns for m in METRIC_COLUMNS):
        missing.append("test_accuracy or test_perplexity")
    if missing:
        raise ReportError(f"{path} lacks the column(s): {', '.join(missing)}")
    return table


def sweep_metric(table: pd.DataFrame) -> str:
    """The metric column the sweep reports: accuracy when any run has it, else perplexity."""
    ok = table[table["status"] == "ok"]
    for column in METRIC_COLUMNS:
        if column in ok.columns and ok[column].notna().any():
            return column
    return next(c for c in METRIC_COLUMNS if c in table.columns)


def lower_is_better(column: str) -> bool:
    return "perplexity" in column or column.endswith("loss")


def selection_column(table: pd.DataFrame, metric: str) -> str:
    """The column the best run is chosen by: the validation figure of ``metric``
    (``val_accuracy`` for ``test_accuracy``) when the runs recorded it, else ``metric``."""
    column = "val_" + metric.removeprefix("test_")
    ok = table[table["status"] == "ok"]
    return column if column in ok.columns and ok[column].notna().any() else metric


def standard_error(accuracy: float, examples: int) -> float:
    """The binomial standard error of an accuracy measured on ``examples``: sqrt(p(1-p)/n)."""
    return math.sqrt(accuracy * (1 - accuracy) / examples)


def test_noise(table: pd.DataFrame, metric: str, chosen: dict[str, Any]) -> str | None:
    """A sentence on which test differences are noise, for an accuracy with ``test_examples``."""
    examples = chosen.get("test_examples")
    if "accuracy" not in metric or not examples or examples != examples:
        return None
    values = table.loc[table["status"] == "ok", metric].dropna()
    error = standard_error(chosen[metric], int(examples))
    near = int(((values - chosen[metric]).abs() < 2 * error).sum()) - 1
    spread = 100 * (values.max() - values.min())
    name = metric.replace("_", " ")
    return (
        f"The runs' {name} ranges from {values.min():.4f} to {values.max():.4f} (a spread of "
        f"{spread:.2f} points). One binomial standard error of the chosen run's {name}, "
        f"sqrt(p(1-p)/n) on {int(examples):,} test examples, is {100 * error:.2f} points: "
        f"differences under about two ({200 * error:.2f} points) are within noise, and "
        f"{near} of the {len(values) - 1} other runs are that close to it."
    )


def seed_spread(table: pd.DataFrame, metric: str) -> list[dict[str, Any]] | None:
    """For a grid over ``seed``: each setting's mean ± standard deviation of ``metric`` over its
    seeds, with the lowest and highest; None when the seed does not vary."""
    ok = table[(table["status"] == "ok") & table[metric].notna()]
    keys = grid_keys(list(table.columns))
    # each run's seed (summary.json's, which a grid over `seed` sets)
    seed = "seed" if "seed" in table.columns else _find_column(keys, "seed")
    if seed is None or ok[seed].nunique() < 2:
        return None
    others = [k for k in _varied(ok, keys) if k != seed]
    groups = ok.groupby(others, dropna=False, sort=True) if others else [((), ok)]
    rows = []
    for _, group in groups:
        values = group[metric]
        deviation = values.std() if len(values) > 1 else 0.0
        rows.append({
            "setting": _describe(group.iloc[0], others) or "every run",
            "seeds": len(values),
            f"{metric} mean ± std": f"{values.mean():.4f} ± {deviation:.4f}",
            "lowest": float(values.min()),
            "highest": float(values.max()),
        })  # fmt: skip
    return rows


def _find_column(columns: list[str], name: str) -> str | None:
    """`name` itself, or a dotted grid key ending in it (`lora.r`)."""
    matches = [c for c in columns if c == name or c.endswith("." + name)]
    return matches[0] if matches else None


def _varied(table: pd.DataFrame, keys: list[str]) -> list[str]:
    return [k for k in keys if table[k].nunique(dropna=False) > 1]


def _describe(row: pd.Series, keys: list[str]) -> str:
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={format_value(row[k])}" for k in keys)


def _metric_label(metric: str) -> str:
    return metric.replace("_", " ") + (" (lower is better)" if "perplexity" in metric else "")


def _plot_against_params(ok: pd.DataFrame, metric: str, keys: list[str], path: Path) -> Path:
    figure = Figure(figsize=(7.5, 4.5))
    axes = figure.subplots()
    axes.scatter(ok["trainable_params"], ok[metric], color="#1f6feb", zorder=3)
    for _, row in ok.iterrows():
        axes.annotate(
            _describe(row, keys),
            (row["trainable_params"], row[metric]),
            textcoords="offset points",
            xytext=(5, 5),
            fontsize=8,
            color="#444",
        )
    axes.set_xscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:,.0f}")
    axes.xaxis.set_major_formatter(plain)
    low, high = ok["trainable_params"].min(), ok["trainable_params"].max()
    # within one decade matplotlib labels minor ticks too; beyond that they would crowd
    axes.xaxis.set_minor_formatter(plain if high < 10 * low else NullFormatter())
    axes.margins(x=0.15, y=0.1)
    axes.set_xlabel("trainable parameters (log scale)")
    axes.set_ylabel(_metric_label(metric))
    axes.set_title(f"{metric.replace('_', ' ')} against trainable parameters")
    axes.grid(alpha=0.3, which="both")
    axes.spines[["top", "right"]].set_visible(False)
    figure.tight_layout()
    return save_figure(figure, path)


def _plot_against_r(
    ok: pd.DataFrame, metric: str, r_key: str, line_keys: list[str], path: Path
) -> Path:
    figure = Figure(figsize=(7.5, 4.5))
    axes = figure.subplots()
    groups = ok.groupby(line_keys, dropna=False, sort=True) if line_keys else [((), ok)]
    for _, group in groups:
        group = group.sort_values(r_key)
        label = _describe(group.iloc[0], line_keys) if line_keys else None
        axes.plot(group[r_key], group[metric], marker="o", linewidth=1.8, label=label)
    ranks = sorted(ok[r_key].unique())
    if all(r > 0 for r in ranks):
        axes.set_xscale("log", base=2)
    axes.set_xticks(ranks, [format_value(r) for r in ranks])
    axes.minorticks_off()
    if line_keys:
        axes.legend(frameon=False, fontsize=9)
    axes.set_xlabel("LoRA rank r")
    axes.set_ylabel(_metric_label(metric))
    axes.set_title(f"{metric.replace('_', ' ')} against r")
    axes.grid(alpha=0.3)
    axes.spines[["top", "right"]].set_visible(False)
    figure.tight_layout()
    return save_figure(figure, path)


def plot_sweep(sweep_dir: str | os.PathLike[str]) -> list[Path]:
    """Write the sweep plots from `sweep.csv`; failed runs are left out. Returns the files
    written (none when no run succeeded)."""
    sweep_dir = Path(sweep_dir)
    table = read_sweep_table(sweep_dir)
    metric = sweep_metric(table)
    ok = table[(table["status"] == "ok") & table[metric].notna()]
    if ok.empty:
        return []
    keys = grid_keys(list(table.columns))
    plots = sweep_dir / PLOTS_DIR
    written = []
    with_params = ok[ok["trainable_params"].notna()]
    if not with_params.empty:
        path = plots / METRIC_VS_PARAMS_PNG
        written.append(_plot_against_params(with_params, metric, _varied(ok, keys), path))
    r_key = _find_column(keys, "r")
    if r_key is not None and pd.api.types.is_numeric_dtype(ok[r_key]):
        alpha_key = _find_column(keys, "lora_alpha")
        line_keys = [k for k in _varied(ok, keys) if k != r_key]
        if alpha_key is not None and alpha_key not in line_keys:
            line_keys.insert(0, alpha_key)
        written.append(_plot_against_r(ok, metric, r_key, line_keys, plots / METRIC_VS_R_PNG))
    return written
