"""`report.html`: one self-contained page for a run directory or a sweep folder.

Everything the page shows is inside the file: plots as base64 PNG data URIs, a little inline
CSS, no scripts, no external stylesheets, fonts or images, so it opens anywhere, offline.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .plots import plot_confusion_matrix, plot_loss_accuracy
from .runfiles import (
    COMPARISON_FILE,
    CONFIG_FILE,
    ENVIRONMENT_FILE,
    METRICS_FILE,
    REPORT_FILE,
    SUMMARY_FILE,
    SWEEP_CSV,
    ReportError,
    existing_dir,
    read_optional_json,
    read_summary,
    write_atomically,
)
from .sweep import (
    COSTS,
    format_value,
    grid_keys,
    human_bytes,
    lower_is_better,
    pareto_settings,
    plot_sweep,
    read_sweep_table,
    seed_spread,
    selection_column,
    setting_summary,
    sweep_metric,
    test_noise,
)

STYLE = """
:root { --ink: #1c2430; --muted: #5b6675; --line: #e3e7ed; --accent: #1f6feb; --bg: #f6f8fa; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink);
  font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 28px 24px 48px; }
header h1 { margin: 0 0 4px; font-size: 26px; }
header p { margin: 0; color: var(--muted); }
section { background: #fff; border: 1px solid var(--line); border-radius: 10px;
  padding: 18px 22px; margin-top: 18px; }
section h2 { margin: 0 0 12px; font-size: 18px; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(160px, 1fr)); gap: 12px; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px; }
.card .label { color: var(--muted); font-size: 12px; text-transform: uppercase;
  letter-spacing: .04em; }
.card .value { font-size: 24px; font-weight: 600; }
.card.main .value { color: var(--accent); }
img.plot { display: block; max-width: 100%; height: auto; margin: 0 auto; }
img.plot.half { max-width: 760px; margin-bottom: 12px; }
img.plot.square { max-width: 620px; }
.beside { display: flex; flex-wrap: wrap; gap: 18px; align-items: flex-start; }
.beside > img.plot { margin: 0; flex: 1 1 420px; min-width: 0; }
.beside > .scroll { flex: 1 1 320px; }
table { border-collapse: collapse; width: 100%; font-size: 14px; }
th, td { text-align: left; padding: 6px 10px; border-bottom: 1px solid var(--line);
  vertical-align: top; }
th { background: var(--bg); font-weight: 600; }
td a { white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.failed td { background: #fff1f0; }
tr.best td { background: #eefbf0; }
.scroll { overflow-x: auto; }
pre { background: var(--bg); border: 1px solid var(--line); border-radius: 6px; padding: 12px;
  overflow-x: auto; font: 13px/1.45 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.bar { display: grid; grid-template-columns: 190px 1fr 260px; gap: 12px; align-items: center;
  margin: 8px 0; }
.track { background: #e9edf2; border-radius: 4px; height: 18px; overflow: hidden; }
.fill { background: var(--accent); height: 100%; min-width: 3px; }
.note { color: var(--muted); font-style: italic; }
.error { color: #b42318; }
footer { color: var(--muted); font-size: 12px; margin-top: 24px; text-align: center; }
"""


def png_data_uri(path: Path) -> str:
    """A PNG file as a `data:` URI, so the page needs no other file."""
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _page(title: str, header: str, sections: list[str]) -> str:
    from lorakit import __version__  # at call time: lorakit/__init__ may import this package

    made = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<main>\n"
        f"<header>{header}</header>\n"
        + "\n".join(sections)
        + f"\n<footer>Made by lorakit {escape(__version__)} on {made}.</footer>\n"
        "</main>\n</body>\n</html>\n"
    )


def _section(title: str, body: str, section_id: str) -> str:
    return f'<section id="{section_id}">\n<h2>{escape(title)}</h2>\n{body}\n</section>'


def _note(text: str, css: str = "note") -> str:
    return f'<p class="{css}">{escape(text)}</p>'


def _image(path: Path, alt: str, size: str = "") -> str:
    return f'<img class="plot {size}" src="{png_data_uri(path)}" alt="{escape(alt)}">'


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class Markup(str):
    """A table cell that is already HTML."""


def html_table(
    columns: list[str], rows: list[dict[str, Any]], row_classes: Sequence[str] = ()
) -> str:
    """An HTML table of formatted values (numbers right-aligned); cells may be pre-made HTML
    when given as `Markup`."""
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    body = []
    for index, row in enumerate(rows):
        css = row_classes[index] if index < len(row_classes) else ""
        cells = []
        for column in columns:
            value = row.get(column)
            if isinstance(value, Markup):
                cells.append(f"<td>{value}</td>")
            else:
                num = ' class="num"' if _is_number(value) else ""
                cells.append(f"<td{num}>{escape(format_value(value))}</td>")
        body.append(f'<tr class="{css}">' + "".join(cells) + "</tr>")
    return (
        f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def human_seconds(seconds: float) -> str:
    """`125` -> `2 min 5 s`."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


# --- a run -----------------------------------------------------------------------------------


def _run_header(run_dir: Path, summary: dict[str, Any] | None, env: dict[str, Any] | None) -> str:
    summary = summary or {}
    recipe = summary.get("recipe") or "run"
    dataset = summary.get("dataset")
    if dataset:  # a file of the user's: its name, not the whole path
        dataset = str(dataset).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    title = f"{recipe} on {dataset}" if dataset else str(recipe)
    facts = [
        f"base model {summary['base_model']}" if summary.get("base_model") else None,
        f"engine {summary['engine']}" if summary.get("engine") else None,
        summary.get("task"),
        f"finished {env['finished']}" if env and env.get("finished") else None,
    ]
    line = " · ".join(escape(str(f)) for f in facts if f)
    return (
        f"<h1>{escape(title)}</h1>\n<p>{line}</p>\n"
        f"<p>Run directory: <code>{escape(str(run_dir))}</code></p>"
    )


def _summary_cards(summary: dict[str, Any]) -> str:
    cards: list[tuple[str, str, bool]] = []
    if summary.get("test_accuracy") is not None:
        cards.append(("test accuracy", f"{100 * summary['test_accuracy']:.2f}%", True))
    if summary.get("test_perplexity") is not None:
        cards.append(("test perplexity", f"{summary['test_perplexity']:.3f}", True))
    if summary.get("test_loss") is not None:
        cards.append(("test loss", f"{summary['test_loss']:.4f}", False))
    if summary.get("train_seconds") is not None:
        cards.append(("train time", human_seconds(summary["train_seconds"]), False))
    for key, label in (("best_step", "best step"), ("seed", "seed")):
        if summary.get(key) is not None:
            cards.append((label, format_value(summary[key]), False))
    html = "".join(
        f'<div class="card{" main" if main else ""}"><div class="label">{escape(label)}</div>'
        f'<div class="value">{escape(value)}</div></div>'
        for label, value, main in cards
    )
    return f'<div class="cards">{html}</div>'


def _bar(label: str, part: float, whole: float, text: str) -> str:
    percent = 100.0 * part / whole if whole else 0.0
    return (
        f'<div class="bar"><div>{escape(label)}</div>'
        f'<div class="track" title="{percent:.3g}%">'
        f'<div class="fill" style="width: {min(percent, 100):.4f}%"></div></div>'
        f"<div>{escape(text)}</div></div>"
    )


def _efficiency(summary: dict[str, Any]) -> str:
    parts = []
    trainable, total = summary.get("trainable_params"), summary.get("total_params")
    if trainable is not None and total:
        share = 100.0 * trainable / total
        parts.append(
            _bar(
                "trainable parameters",
                trainable,
                total,
                f"{trainable:,} of {total:,} ({share:.3g}%)",
            )
        )
    adapter, full = summary.get("adapter_bytes"), summary.get("base_model_bytes")
    if adapter is not None and full:
        parts.append(
            _bar(
                "adapter file size",
                adapter,
                full,
                f"{human_bytes(adapter)} vs full model {human_bytes(full)} "
                f"({100.0 * adapter / full:.3g}%)",
            )
        )
    elif adapter is not None:
        parts.append(f"<p>Adapter files: {escape(human_bytes(adapter))}.</p>")
    if not parts:
        return _note("summary.json has no parameter counts.")
    legend = _note("Each bar's full length is the whole model; the blue part is what LoRA trains.")
    return "\n".join(parts) + legend


def _plot_section(
    title: str, section_id: str, plot: Any, run_dir: Path, body: Callable[[Path], str]
) -> str:
    """A section showing ``body(plot(run_dir))``; a ReportError as its note; none without a plot."""
    try:
        path = plot(run_dir)
    except ReportError as error:
        return _section(title, _note(str(error)), section_id)
    return "" if path is None else _section(title, body(path), section_id)


def _curves(run_dir: Path, summary: dict[str, Any]) -> str:
    """The training curves, and what their marks mean."""
    caption = "Every logged step (the training loss is the mean since the previous one)"
    caption += " and every evaluation; dotted lines: ends of epochs."
    if summary.get("best_step") is not None:
        caption += f" Dashed line: the weights the run kept (chosen: step {summary['best_step']}"
        figures = summary.get("best_validation") or {}
        shown = ", ".join(f"{k.replace('_', ' ')} {format_value(v)}" for k, v in figures.items())
        caption += f", validation {shown})." if shown else ")."
    title = "Training curves"
    return _plot_section(title, "curves", plot_loss_accuracy, run_dir,
                         lambda path: _image(path, title) + _note(caption))  # fmt: skip


def _per_class(scores: list[dict[str, Any]]) -> str:
    """Each class's precision, recall and F1 (summary.json's ``per_class``), and their mean."""
    rows = [{"class": str(row["label"]), **row} for row in scores]
    macro = {k: sum(r[k] for r in scores) / len(scores) for k in ("precision", "recall", "f1")}
    rows.append({"class": "macro average", **macro, "support": sum(r["support"] for r in scores)})
    return html_table(["class", "precision", "recall", "F1", "support"],
                      [{**row, "F1": row["f1"]} for row in rows])  # fmt: skip


def _confusion(run_dir: Path, summary: dict[str, Any]) -> str:
    """The test confusion matrix, with each class's precision, recall and F1 beside it."""
    title, scores = "Confusion matrix (test)", summary.get("per_class")

    def body(path: Path) -> str:
        if not scores:
            return _image(path, title, "square")
        return f'<div class="beside">{_image(path, title)}{_per_class(scores)}</div>'

    return _plot_section(title, "confusion", plot_confusion_matrix, run_dir, body)


def _comparison(run_dir: Path) -> str:
    rows = read_optional_json(run_dir / COMPARISON_FILE)
    if rows is None:
        return ""
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise ReportError(f"{run_dir / COMPARISON_FILE} must be a non-empty list of row objects")
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return _section("Comparison", html_table(columns, rows), "comparison")


def _environment(env: Any) -> str:
    if not isinstance(env, dict):
        return _note(f"No {ENVIRONMENT_FILE}.")
    rows = [{"key": k, "value": v if isinstance(v, str) else json.dumps(v)} for k, v in env.items()]
    return html_table(["key", "value"], rows)


def run_report_html(run_dir: Path) -> str:
    """The HTML page for one run directory (writes its plots on the way)."""
    present = [n for n in (SUMMARY_FILE, METRICS_FILE, CONFIG_FILE) if (run_dir / n).is_file()]
    if not present:
        raise ReportError(
            f"{run_dir} is not a run directory (no {SUMMARY_FILE}, {METRICS_FILE} or "
            f"{CONFIG_FILE}); give the folder `lorakit train` wrote, or a sweep folder"
        )
    summary = read_summary(run_dir)
    env = read_optional_json(run_dir / ENVIRONMENT_FILE)
    sections = []
    if summary is None:
        sections.append(
            _section(
                "Summary",
                _note(f"No {SUMMARY_FILE} yet: the run is still training or did not finish."),
                "summary",
            )
        )
    else:
        sections.append(_section("Summary", _summary_cards(summary), "summary"))
    sections.append(_curves(run_dir, summary or {}))
    sections.append(_confusion(run_dir, summary or {}))
    if summary is not None:
        sections.append(_section("Parameter efficiency", _efficiency(summary), "efficiency"))
    sections.append(_comparison(run_dir))
    config = run_dir / CONFIG_FILE
    config_html = (
        f"<pre>{escape(config.read_text(encoding='utf-8'))}</pre>"
        if config.is_file()
        else _note(f"No {CONFIG_FILE}.")
    )
    sections.append(_section(f"Resolved config ({CONFIG_FILE})", config_html, "config"))
    sections.append(_section("Environment", _environment(env), "environment"))
    title = (summary or {}).get("recipe") or run_dir.name
    return _page(
        f"lorakit report: {title}",
        _run_header(run_dir, summary, env),
        [s for s in sections if s],
    )


# --- a sweep ---------------------------------------------------------------------------------


def _run_link(sweep_dir: Path, run_dir_value: Any) -> Markup | str:
    """A link to a run's report, writing the report first when the run has none yet."""
    if not isinstance(run_dir_value, str) or not run_dir_value:
        return ""
    candidates = [sweep_dir / run_dir_value, Path(run_dir_value)]
    run_dir = next((c for c in candidates if c.is_dir()), None)
    if run_dir is None:
        return run_dir_value
    report = run_dir / REPORT_FILE
    if not report.is_file():
        try:
            write_report(run_dir)
        except ReportError:
            return run_dir_value
    href = quote(Path(os.path.relpath(report.resolve(), sweep_dir.resolve())).as_posix())
    return Markup(f'<a href="{escape(href)}">{escape(run_dir.name)}</a>')


def _best_run(table, best: dict[str, Any], keys: list[str], metric: str, chosen_by: str) -> str:
    """Which run is best and by what (validation, as a run chooses its checkpoint), its test
    figure, and how much of the differences is noise."""
    if "seed" in table.columns and table["seed"].nunique() > 1:
        keys = [*keys, "seed"]
    described = ", ".join(f"{k}={format_value(best[k])}" for k in keys)
    by = chosen_by.replace("val_", "validation ", 1).replace("_", " ")
    test = metric.replace("_", " ")
    html = (f"<p><b>{escape(described)}</b>, chosen by {escape(by)} "
            f"{escape(format_value(best[chosen_by]))}: {escape(test)} "
            f"{escape(format_value(best[metric]))}.</p>")  # fmt: skip
    if chosen_by == metric:
        html += _note(f"These runs recorded no validation figures, so the choice is by {test}.")
    noise = test_noise(table, metric, best)
    return html + (_note(noise) if noise else "")


def sweep_report_html(sweep_dir: Path) -> str:
    """The HTML page for a sweep folder: table, plots, and links to each run's report."""
    table = read_sweep_table(sweep_dir)
    plots = plot_sweep(sweep_dir)
    metric = sweep_metric(table)
    rows = [
        {k: (None if v != v else v) for k, v in row.items()}  # NaN -> empty cell
        for row in table.to_dict(orient="records")
    ]
    ok = [r for r in rows if r["status"] == "ok" and r.get(metric) is not None]
    chosen_by = selection_column(table, metric)
    candidates = [r for r in ok if r.get(chosen_by) is not None]
    best = None
    if candidates:
        pick = min if lower_is_better(chosen_by) else max
        best = pick(candidates, key=lambda r: r[chosen_by])
    classes = ["failed" if r["status"] != "ok" else "best" if r is best else "" for r in rows]
    for row in rows:
        row["report"] = _run_link(sweep_dir, row.get("run_dir"))
    keys = grid_keys(list(table.columns))
    # the page shows what compares runs; sweep.csv keeps every column
    shown = ["status", "report", metric, "test_loss", chosen_by, "trainable_params"]
    shown += ["trainable_percent"]
    shown += ["train_seconds", "error"]
    columns = keys + [c for c in shown if c == "report" or c in table.columns]

    header = (
        f"<h1>Sweep: {len(ok)} of {len(rows)} runs succeeded</h1>\n"
        f"<p>Swept: {escape(', '.join(keys) or 'nothing')} · metric: "
        f"{escape(metric.replace('_', ' '))}</p>\n"
        f"<p>Sweep folder: <code>{escape(str(sweep_dir))}</code></p>"
    )
    sections = []
    if best is not None:
        sections.append(
            _section("Best run", _best_run(table, best, keys, metric, chosen_by), "best")
        )
    sections.append(_section("Runs", html_table(columns, rows, classes), "runs"))
    spread = seed_spread(table, metric)
    if spread:
        note = _note("What the seed alone changes: the same setting, trained with each seed.")
        sections.append(
            _section("Seed spread", html_table(list(spread[0]), spread) + note, "seeds")
        )
    fronts = pareto_settings(setting_summary(table, metric), metric)
    if fronts:
        items = "".join(f"<li>{escape(COSTS[cost])}: {escape(', '.join(names))}</li>"
                        for cost, names in fronts.items())  # fmt: skip
        note = _note("The settings no other setting beats on both the cost and "
                     f"{metric.replace('_', ' ')} (mean over seeds); the plot quality vs cost "
                     "draws them.")  # fmt: skip
        sections.append(_section("Pareto front", f"<ul>{items}</ul>{note}", "pareto"))
    body = "\n".join(_image(p, p.stem.replace("_", " "), "half") for p in plots) or _note(
        "No run succeeded, so there is nothing to plot."
    )
    sections.append(_section("Plots", body, "plots"))
    return _page("lorakit sweep report", header, sections)


def write_report(run_dir: str | os.PathLike[str]) -> Path:
    """Write `report.html` into a run directory or a sweep folder (one with `sweep.csv`)."""
    directory = existing_dir(run_dir, "run or sweep directory")
    if (directory / SWEEP_CSV).is_file():
        page = sweep_report_html(directory)
    else:
        page = run_report_html(directory)
    return write_atomically(directory / REPORT_FILE, page)
