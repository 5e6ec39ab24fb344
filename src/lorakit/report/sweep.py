"""A sweep's outputs: `sweep.csv`, `sweep.md`, and plots of the metric against trainable
parameters, against r (one line per lora_alpha and other varied grid key), and against each
cost (`quality_vs_cost.png`: trainable parameters, seconds a step, peak memory, adapter bytes)
with the Pareto front marked.

A setting is a combination of the grid's values; `lorakit sweep --seeds N` trains each with N
seeds, so `setting_summary` gives each setting's mean, standard deviation, lowest and highest,
and the plots and the Pareto front use the means.

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
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

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
QUALITY_VS_COST_PNG = "quality_vs_cost.png"
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
    "steps",
    "seconds_per_step",
    "peak_rss_bytes",
    "peak_gpu_bytes",
    "best_step",
    "seed",
    "error",
    "run_dir",
)
STATUSES = ("ok", "failed")
# what a setting costs, with its axis label; peak memory is the GPU's where the runs used one
COSTS = {
    "trainable_params": "trainable parameters",
    "seconds_per_step": "seconds per optimizer step",
    "peak_gpu_bytes": "peak GPU memory (bytes)",
    "peak_rss_bytes": "peak resident memory (bytes)",
    "adapter_bytes": "adapter file (bytes)",
}


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
    if summary.get("train_seconds") is not None and summary.get("steps"):
        row["seconds_per_step"] = summary["train_seconds"] / summary["steps"]
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


def human_bytes(count: float) -> str:
    """`1234567` -> `1.23 MB` (SI units, as file browsers show)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(count) < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.3g} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


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
    text = heading + markdown_table(columns, rows) + settings_markdown(sweep_dir)
    md_path = write_atomically(sweep_dir / SWEEP_MD, text)
    return csv_path, md_path


def settings_markdown(
    sweep_dir: Path, *, per_setting: bool | None = None, max_cell: int = 80
) -> str:
    """sweep.md's sections after the runs: each setting's mean and spread over its seeds
    (``per_setting``: always, never, or None: when a setting ran more than once), and the
    Pareto-optimal settings for each cost (with the panel, once it is drawn); table cells cut
    at ``max_cell`` characters."""
    try:
        table = read_sweep_table(sweep_dir)
    except ReportError:  # rows without the result columns: the runs table says it all
        return ""
    metric = sweep_metric(table)
    settings = setting_summary(table, metric)
    if settings.empty:
        return ""
    text = ""
    costs = cost_columns(settings)
    if per_setting or (per_setting is None and settings["runs"].max() > 1):
        columns = ["setting", "runs", f"{metric} mean", "std", "lowest", "highest", *costs]
        rows = [
            {"setting": row["setting"], "runs": row["runs"], f"{metric} mean": row[metric],
             "std": row[f"{metric}_std"], "lowest": row[f"{metric}_min"],
             "highest": row[f"{metric}_max"], **{c: row[c] for c in costs}}
            for _, row in settings.iterrows()
        ]  # fmt: skip
        text += "\n## Per setting (mean over seeds; std is the sample standard deviation)\n\n"
        text += markdown_table(columns, rows, max_cell)
    fronts = pareto_settings(settings, metric)
    if fronts:
        better = "lower" if lower_is_better(metric) else "higher"
        text += (f"\n## Pareto front\n\nThe settings no other setting beats on both cost and "
                 f"{metric.replace('_', ' ')} ({better} is better); each cost on its own.\n\n")  # fmt: skip
        for cost, names in fronts.items():
            text += f"- {COSTS[cost]}: {', '.join(names)}\n"
        panel = Path(PLOTS_DIR) / QUALITY_VS_COST_PNG
        if (sweep_dir / panel).is_file():
            text += f"\n![{metric} against cost]({panel.as_posix()})\n"
    return text


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


def setting_summary(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One row per setting (the grid keys that vary, the seed aside), in the grid's order:
    ``setting`` (``r=4, lora_alpha=16``), ``runs`` (the successful ones), the mean of ``metric``
    with its sample standard deviation (``<metric>_std``; empty for one run), lowest and
    highest (``_min``, ``_max``), and the mean of each cost the runs recorded."""
    ok = table[(table["status"] == "ok") & table[metric].notna()]
    every = [k for k in grid_keys(list(table.columns)) if k != "seed"]
    keys = _varied(ok, every)
    groups = ok.groupby(keys, dropna=False, sort=False) if keys else [((), ok)]
    costs = [c for c in COSTS if c in ok.columns]
    rows = []
    for _, group in groups:
        if group.empty:
            continue
        values = group[metric].astype(float)
        first = group.iloc[0]
        rows.append({
            **{k: first[k] for k in every},
            "setting": _describe(first, keys) or "every run",
            "runs": len(values),
            metric: values.mean(),
            f"{metric}_std": values.std(),  # ddof=1; NaN for a single run
            f"{metric}_min": values.min(),
            f"{metric}_max": values.max(),
            **{c: pd.to_numeric(group[c], errors="coerce").mean() for c in costs},
        })  # fmt: skip
    return pd.DataFrame(rows)


def seed_spread(table: pd.DataFrame, metric: str) -> list[dict[str, Any]] | None:
    """For runs over several seeds: each setting's mean ± standard deviation of ``metric``
    over its seeds, with the lowest and highest; None when the seed does not vary."""
    ok = table[(table["status"] == "ok") & table[metric].notna()]
    if "seed" not in table.columns or ok["seed"].nunique() < 2:
        return None
    return [
        {
            "setting": row["setting"],
            "seeds": row["runs"],
            f"{metric} mean ± std": f"{row[metric]:.4f} ± {_zero_if_nan(row[metric + '_std']):.4f}",
            "lowest": float(row[f"{metric}_min"]),
            "highest": float(row[f"{metric}_max"]),
        }
        for _, row in setting_summary(table, metric).iterrows()
    ]


def _zero_if_nan(value: float) -> float:
    return 0.0 if value != value else value


def pareto_front(
    table: pd.DataFrame, cost: str, quality: str, *, lower_is_better: bool = False
) -> pd.Series:
    """Which rows are Pareto-optimal in (``cost``, ``quality``): no other row costs as little or
    less and scores as well or better, one of the two strictly. Rows missing either are not."""
    costs = pd.to_numeric(table[cost], errors="coerce")
    scores = pd.to_numeric(table[quality], errors="coerce") * (-1 if lower_is_better else 1)
    known = costs.notna() & scores.notna()

    def dominated(c: float, s: float) -> bool:
        no_worse = known & (costs <= c) & (scores >= s)
        return bool((no_worse & ((costs < c) | (scores > s))).any())

    return pd.Series(
        [bool(known[i]) and not dominated(costs[i], scores[i]) for i in table.index],
        index=table.index,
    )


def cost_columns(settings: pd.DataFrame) -> list[str]:
    """The costs the runs recorded, peak memory once (the GPU's where there is one)."""
    present = [c for c in COSTS if c in settings.columns and settings[c].notna().any()]
    if "peak_gpu_bytes" in present:
        present = [c for c in present if c != "peak_rss_bytes"]
    return present


def pareto_settings(settings: pd.DataFrame, metric: str) -> dict[str, list[str]]:
    """For each cost, the settings on the Pareto front, cheapest first, as
    ``setting (mean metric)``."""
    fronts = {}
    for cost in cost_columns(settings):
        on = pareto_front(settings, cost, metric, lower_is_better=lower_is_better(metric))
        front = settings[on].sort_values(cost)
        fronts[cost] = [f"{r['setting']} ({format_value(r[metric])})" for _, r in front.iterrows()]
    return fronts


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


def _spread(axes, x: pd.Series, settings: pd.DataFrame, metric: str, colour: str) -> None:
    """Each setting's seeds: one standard deviation as error bars, lowest to highest as a line."""
    if settings["runs"].max() < 2:
        return
    std = settings[f"{metric}_std"].fillna(0.0)
    axes.errorbar(x, settings[metric], yerr=std, fmt="none", ecolor=colour, capsize=3, zorder=2)
    axes.vlines(x, settings[f"{metric}_min"], settings[f"{metric}_max"], colors=colour,
                alpha=0.35, linewidth=5, zorder=1)  # fmt: skip


def _spread_note(settings: pd.DataFrame) -> str:
    runs = settings["runs"].max()
    return f" (mean of {runs} seeds; bars: ±1 std, band: lowest-highest)" if runs > 1 else ""


def _log_axis_if_wide(axes, values: pd.Series, formatter: FuncFormatter) -> None:
    axes.xaxis.set_major_formatter(formatter)
    axes.xaxis.set_major_locator(MaxNLocator(5))  # labels such as "2.4 GB" need the room
    low, high = values.min(), values.max()
    if low > 0 and high >= 10 * low:
        axes.set_xscale("log")
        axes.xaxis.set_major_formatter(formatter)
        axes.xaxis.set_minor_formatter(NullFormatter())


def _plot_against_params(settings: pd.DataFrame, metric: str, path: Path) -> Path:
    figure = Figure(figsize=(7.5, 4.5))
    axes = figure.subplots()
    x = settings["trainable_params"]
    _spread(axes, x, settings, metric, "#1f6feb")
    axes.scatter(x, settings[metric], color="#1f6feb", zorder=3)
    for _, row in settings.iterrows():
        axes.annotate(
            row["setting"],
            (row["trainable_params"], row[metric]),
            textcoords="offset points",
            xytext=(5, 5),
            fontsize=8,
            color="#444",
        )
    axes.set_xscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:,.0f}")
    axes.xaxis.set_major_formatter(plain)
    low, high = x.min(), x.max()
    # within one decade matplotlib labels minor ticks too; beyond that they would crowd
    axes.xaxis.set_minor_formatter(plain if high < 10 * low else NullFormatter())
    axes.margins(x=0.15, y=0.1)
    axes.set_xlabel("trainable parameters (log scale)")
    axes.set_ylabel(_metric_label(metric))
    axes.set_title(
        f"{metric.replace('_', ' ')} against trainable parameters{_spread_note(settings)}"
    )
    axes.grid(alpha=0.3, which="both")
    axes.spines[["top", "right"]].set_visible(False)
    figure.tight_layout()
    return save_figure(figure, path)


def _plot_against_value(
    settings: pd.DataFrame, metric: str, r_key: str, line_keys: list[str], path: Path
) -> Path:
    """``metric`` against a numeric grid key (``r``, or another such as ``lora_alpha``), one line
    per value of ``line_keys``, on a log-2 axis when the values allow."""
    figure = Figure(figsize=(7.5, 4.5))
    axes = figure.subplots()
    groups = settings.groupby(line_keys, dropna=False, sort=True) if line_keys else [((), settings)]
    for _, group in groups:
        group = group.sort_values(r_key)
        label = _describe(group.iloc[0], line_keys) if line_keys else None
        (line,) = axes.plot(group[r_key], group[metric], marker="o", linewidth=1.8, label=label)
        if group["runs"].max() > 1:
            axes.fill_between(group[r_key], group[f"{metric}_min"], group[f"{metric}_max"],
                              color=line.get_color(), alpha=0.15, linewidth=0)  # fmt: skip
            axes.errorbar(group[r_key], group[metric], yerr=group[f"{metric}_std"].fillna(0.0),
                          fmt="none", ecolor=line.get_color(), capsize=3)  # fmt: skip
    ranks = sorted(settings[r_key].unique())
    if all(r > 0 for r in ranks):
        axes.set_xscale("log", base=2)
    axes.set_xticks(ranks, [format_value(r) for r in ranks])
    axes.minorticks_off()
    if settings["trainable_params"].nunique() > 1:
        _cost_of_r(axes, settings, r_key)
    if line_keys:
        axes.legend(frameon=False, fontsize=9)
    name = r_key.split(".")[-1]
    axes.set_xlabel("LoRA rank r" if name == "r" else name)
    axes.set_ylabel(_metric_label(metric))
    axes.set_title(f"{metric.replace('_', ' ')} against {name}{_spread_note(settings)}")
    axes.grid(alpha=0.3)
    axes.spines[["top", "right"]].set_visible(False)
    figure.tight_layout()
    return save_figure(figure, path)


def _cost_of_r(axes, settings: pd.DataFrame, r_key: str) -> None:
    """On a second axis: the trainable parameters at each r (grey, dashed), each point labelled
    with the adapter file's size."""
    if "trainable_params" not in settings.columns or settings["trainable_params"].isna().all():
        return
    cost = settings.groupby(r_key, sort=True)[["trainable_params"]].mean()
    if "adapter_bytes" in settings.columns:
        cost["adapter_bytes"] = settings.groupby(r_key, sort=True)["adapter_bytes"].mean()
    right = axes.twinx()
    right.plot(cost.index, cost["trainable_params"], color="#888", linestyle="--", marker="s",
               markersize=4, linewidth=1, label="trainable parameters")  # fmt: skip
    for r, row in cost.iterrows():
        if pd.notna(row.get("adapter_bytes")):
            right.annotate(human_bytes(row["adapter_bytes"]), (r, row["trainable_params"]),
                           textcoords="offset points", xytext=(4, -10), fontsize=7,
                           color="#666")  # fmt: skip
    right.set_yscale("log")
    right.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
    right.set_ylabel("trainable parameters (dashed; labels: adapter file)", color="#666")
    right.tick_params(axis="y", colors="#666", labelsize=8)
    right.spines["top"].set_visible(False)


def _cost_formatter(cost: str) -> FuncFormatter:
    if cost.endswith("_bytes"):
        return FuncFormatter(lambda value, _: human_bytes(value))
    if cost == "seconds_per_step":
        return FuncFormatter(lambda value, _: f"{value:.3g} s")
    return FuncFormatter(lambda value, _: f"{value:,.0f}")


def plot_quality_vs_cost(settings: pd.DataFrame, metric: str, path: Path) -> Path | None:
    """`quality_vs_cost.png`: the metric against each recorded cost, one panel each, the
    Pareto-optimal settings (best metric for their cost) ringed and joined."""
    costs = cost_columns(settings)
    if not costs:
        return None
    rows = math.ceil(len(costs) / 2)
    figure = Figure(figsize=(11, 4.2 * rows))
    panels = figure.subplots(rows, 2, squeeze=False).flatten()
    lower = lower_is_better(metric)
    for axes, cost in zip(panels, costs, strict=False):
        points = settings[settings[cost].notna()].sort_values(cost)
        front = pareto_front(points, cost, metric, lower_is_better=lower)
        _spread(axes, points[cost], points, metric, "#8c959f")
        axes.scatter(points[cost], points[metric], color="#8c959f", zorder=3, label="setting")
        best = points[front]
        axes.plot(best[cost], best[metric], color="#e8590c", linewidth=1.2, zorder=3)
        axes.scatter(best[cost], best[metric], s=70, facecolors="none", edgecolors="#e8590c",
                     linewidths=2, zorder=4, label="Pareto front")  # fmt: skip
        for _, row in best.iterrows():
            axes.annotate(row["setting"], (row[cost], row[metric]), textcoords="offset points",
                          xytext=(5, 5), fontsize=7, color="#444")  # fmt: skip
        _log_axis_if_wide(axes, points[cost], _cost_formatter(cost))
        axes.margins(x=0.15, y=0.12)
        axes.set_xlabel(COSTS[cost])
        axes.set_ylabel(_metric_label(metric))
        axes.grid(alpha=0.3, which="both")
        axes.spines[["top", "right"]].set_visible(False)
    panels[0].legend(frameon=False, fontsize=8)
    for axes in panels[len(costs) :]:
        axes.set_visible(False)
    title = f"{metric.replace('_', ' ')} against what it costs{_spread_note(settings)}"
    figure.suptitle(title)
    figure.tight_layout()
    return save_figure(figure, path)


def plot_sweep(sweep_dir: str | os.PathLike[str]) -> list[Path]:
    """Write the sweep plots from `sweep.csv`; failed runs are left out, and a setting run with
    several seeds is drawn as their mean and spread. Returns the files written (none when no
    run succeeded)."""
    sweep_dir = Path(sweep_dir)
    table = read_sweep_table(sweep_dir)
    metric = sweep_metric(table)
    settings = setting_summary(table, metric)
    if settings.empty:
        return []
    keys = [k for k in grid_keys(list(table.columns)) if k in settings.columns]
    varied = _varied(settings, keys)
    plots = sweep_dir / PLOTS_DIR
    written = []
    with_params = settings[settings["trainable_params"].notna()]
    if not with_params.empty:
        written.append(_plot_against_params(with_params, metric, plots / METRIC_VS_PARAMS_PNG))
    r_key = _find_column(keys, "r")
    if r_key is not None and pd.api.types.is_numeric_dtype(settings[r_key]):
        alpha_key = _find_column(keys, "lora_alpha")
        line_keys = [k for k in varied if k != r_key]
        if alpha_key is not None and alpha_key not in line_keys:
            line_keys.insert(0, alpha_key)
        written.append(
            _plot_against_value(settings, metric, r_key, line_keys, plots / METRIC_VS_R_PNG)
        )
    elif len(varied) == 1 and pd.api.types.is_numeric_dtype(settings[varied[0]]):
        name = varied[0].split(".")[-1]  # lora_alpha, lr, ...
        path = plots / f"metric_vs_{name}.png"
        written.append(_plot_against_value(settings, metric, varied[0], [], path))
    panel = plot_quality_vs_cost(settings, metric, plots / QUALITY_VS_COST_PNG)
    return [*written, panel] if panel else written
