"""`lorakit sweep`: train every combination of a grid of settings, one run directory each.

```python
from lorakit.sweep import sweep, parse_grid
folder = sweep("classic", {"r": [1, 2, 4, 8]})                      # runs/sweep-classic-<time>/
sweep("sentiment", parse_grid(["r=4,8", "target_modules=query|query,value"]),
      overrides=["train.max_steps=50"])
sweep("sentiment", {"r": [4, 8]}, seeds=3)   # each setting with seeds 42, 43, 44
```

Grid keys are dotted config keys (``lora.r``) or their last part (``r``, ``lr``). A short name
found in several sections means the one outside ``pretrain`` (pretraining is shared by the whole
sweep, so sweeping it takes the full key, ``pretrain.lr``); a name still ambiguous (``name``:
``data.name`` or ``model.name``) is an error listing the choices.

On the command line (``parse_grid``) values are separated by commas, ``r=1,2,4``; when a value is
itself a list (``target_modules``), separate the values by ``|`` and the list items by commas:
``target_modules=query|query,value`` sweeps ``["query"]`` and ``["query", "value"]``. A single
module name is a one-element list (a name matches as a suffix, as in ``--set``); write a regex in
a TOML config instead.

The folder holds ``sweep.json`` (the grid and settings), one run directory per combination
(``r=1,lora_alpha=16/``), ``sweep.csv``, ``sweep.md``, ``plots/`` and ``report.html``. Every
combination's config is validated before any run starts. A combination that fails while running
is recorded (status ``failed``, the error message, the traceback in its ``error.txt``) and the
others go on. Recipes that pretrain their own base model (``classic``) pretrain once: the first
run's ``base/`` is copied to the sweep's own ``shared-base/``, which later runs load
(``model.pretrained``), unless the grid changes ``pretrain.*`` or ``model.*``; so deleting one run
breaks no other, and the sweep folder can move. Runs set ``compare = false``.

``seeds=N`` (``--seeds N``) trains every combination N times, with ``seed`` = the config's seed
+ 0, 1, ..., N-1 (folders ``r=4,seed=43``): ``sweep.csv`` keeps every run with its seed, and the
table, plots and Pareto front (``lorakit.report.sweep``) show each setting's mean and spread.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import time
import traceback
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, get_args, get_origin

from lorakit.config import CONFIG_KEYS, Config, ConfigError, parse_value, resolve_key
from lorakit.launch import DEFAULT_RECIPE, resolve_config, train
from lorakit.models.classic import is_classic
from lorakit.report.html import write_report
from lorakit.report.sweep import collect_run_summary, plot_sweep, write_sweep_table
from lorakit.rundir import make_out_folder, write_json_atomic

SWEEP_SETTINGS = ("compare=false",)  # before the user's overrides, which may change them
SHARED_BASE_BLOCKERS = ("pretrain.", "model.")  # grid keys that change the pretrained base
SHARED_BASE = "shared-base"  # inside the sweep folder: the base every later run loads
VALUE_SEPARATOR = "|"


# ---------------------------------------------------------------- grid keys and values
def _takes_list(key: str) -> bool:
    annotation = CONFIG_KEYS[key]
    return any(get_origin(a) is list for a in (get_args(annotation) or (annotation,)))


def _grid_value(key: str, value: Any) -> Any:
    """A bare module name given for a list-valued key becomes a one-element list."""
    if (
        _takes_list(key)
        and isinstance(value, str)
        and value != "all-linear"
        and re.fullmatch(r"[\w.\-]+", value)
    ):
        return [value]
    if isinstance(value, tuple):
        return list(value)
    return value


def normalize_grid(grid: Mapping[str, Iterable[Any]]) -> dict[str, list[Any]]:
    """Grid keys resolved to dotted keys, values to lists; every key problem in one error."""
    if not grid:
        raise ConfigError("grid: empty; give at least one KEY=V1,V2 (e.g. r=1,2,4,8)")
    resolved: dict[str, list[Any]] = {}
    problems = []
    for key, values in grid.items():
        try:
            dotted = resolve_key(key)
        except ConfigError as err:
            problems += err.problems
            continue
        if dotted in resolved:
            problems.append(f"grid key {key!r} repeats {dotted}; give each setting once")
            continue
        values = [values] if isinstance(values, str) or not isinstance(values, Iterable) else values
        values = [_grid_value(dotted, v) for v in values]
        if not values:
            problems.append(f"grid key {key!r}: no values; give e.g. {key}=1,2")
        resolved[dotted] = values
    if problems:
        raise ConfigError(problems)
    return resolved


def parse_grid(items: Iterable[str]) -> dict[str, list[Any]]:
    """``["r=1,2,4", "target_modules=query|query,value"]`` -> ``{"lora.r": [1, 2, 4],
    "lora.target_modules": [["query"], ["query", "value"]]}`` (see the module docstring)."""
    grid: dict[str, list[Any]] = {}
    problems = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip() or not raw.strip():
            problems.append(f"--grid {item!r}: expected KEY=V1,V2,... e.g. r=1,2,4,8")
            continue
        if VALUE_SEPARATOR in raw:
            parts = [p.strip() for p in raw.split(VALUE_SEPARATOR)]
            values = [parse_value(p) for p in parts if p]
        else:
            values = [parse_value(p.strip()) for p in raw.split(",") if p.strip()]
        if key.strip() in grid:
            problems.append(f"--grid {key.strip()!r} is given twice; put all its values in one")
        grid[key.strip()] = values
    try:
        resolved = normalize_grid(grid) if grid or not problems else {}
    except ConfigError as err:
        problems += err.problems
    if problems:
        raise ConfigError(problems)
    return resolved


def combinations(grid: Mapping[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, the last key varying fastest."""
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*grid.values())]


def _show(value: Any) -> str:
    if isinstance(value, list):
        return "+".join(_show(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def combination_name(combination: Mapping[str, Any]) -> str:
    """``{"lora.r": 2, "train.lr": 0.001}`` -> ``r=2,lr=0.001`` (safe as a folder name)."""
    text = ",".join(f"{k.rsplit('.', 1)[-1]}={_show(v)}" for k, v in combination.items())
    return re.sub(r"[^\w=,.+\-]", "_", text)[:150]


def with_seeds(
    combos: list[dict[str, Any]], seeds: int, source: str, overrides: list[str]
) -> list[dict[str, Any]]:
    """Each combination ``seeds`` times, with ``seed`` = the config's seed + 0 .. seeds-1
    (one seed: the combinations as they are)."""
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
        raise ConfigError(f"seeds: {seeds!r}; give a whole number of seeds, 1 or more")
    if seeds == 1:
        return combos
    if any("seed" in combo for combo in combos):
        raise ConfigError("the grid sets seed; give either --seeds N or a grid over seed, not both")
    base = resolve_config(source, overrides).seed
    return [{**combo, "seed": base + i} for combo in combos for i in range(seeds)]


def _as_overrides(combination: Mapping[str, Any]) -> list[str]:
    # JSON literals of numbers, strings, booleans and lists of them are TOML literals too
    return [f"{key}={json.dumps(value)}" for key, value in combination.items()]


# ---------------------------------------------------------------- running
def _sweep_dir(out: str | Path | None, recipe: str) -> Path:
    if out is None:
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        return Path("runs") / f"sweep-{recipe}-{stamp}"
    folder = Path(out)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ConfigError(
            f"out: {str(folder)!r} exists and is not empty; choose a new sweep folder"
        )
    return folder


def validate_all(source: str | Path, overrides: list[str], combos: list[dict[str, Any]]) -> Config:
    """Every combination's config, checked before any run: one error listing all problems."""
    problems, first = [], None
    for combo in combos:
        try:
            config = resolve_config(source, [*overrides, *_as_overrides(combo)])
            first = first or config
        except ConfigError as err:
            problems += [f"[{combination_name(combo)}] {p}" for p in err.problems]
    if problems:
        raise ConfigError(["the sweep was not started; these combinations are invalid:", *problems])
    return first


def _run_one(source, out: Path, overrides: list[str]) -> dict[str, Any]:
    """Train one combination; a row for the table, ``failed`` with the message on error."""
    try:
        train(source, out=out, overrides=overrides)
        return collect_run_summary(out)
    except Exception as err:  # one failing combination must not end the sweep
        message = f"{type(err).__name__}: {err}".strip()
        out.mkdir(parents=True, exist_ok=True)  # a run that failed in setup left no folder
        (out / "error.txt").write_text(traceback.format_exc(), encoding="utf-8")
        return {"status": "failed", "error": message, "run_dir": str(out)}


def sweep(
    config_or_recipe: str | Path | None,
    grid: Mapping[str, Iterable[Any]],
    out: str | Path | None = None,
    overrides: Iterable[str] = (),
    seeds: int = 1,
) -> Path:
    """Train every combination of ``grid`` on ``config_or_recipe`` (a recipe name or a .toml),
    each with ``seeds`` seeds, sequentially; write the sweep table, plots and report; return the
    sweep folder."""
    source = str(config_or_recipe or DEFAULT_RECIPE)
    grid = normalize_grid(grid)
    overrides = [*SWEEP_SETTINGS, *overrides]
    combos = with_seeds(combinations(grid), seeds, source, overrides)
    first = validate_all(source, overrides, combos)
    folder = _sweep_dir(out, first.recipe)
    make_out_folder(folder, "sweep folder")
    may_share_base = (
        first.pretrain is not None
        and not first.model.pretrained
        and not any(key.startswith(SHARED_BASE_BLOCKERS) for key in grid)
    )
    names = _unique_names(combos)
    write_json_atomic(folder / "sweep.json", {
        "source": source, "recipe": first.recipe, "grid": grid, "overrides": overrides,
        "seeds": seeds, "combinations": len(combos), "started": datetime.now(UTC).isoformat(timespec="seconds"),
    })  # fmt: skip

    rows: list[dict[str, Any]] = []
    shared_base: Path | None = None
    started = time.monotonic()
    for number, (combo, name) in enumerate(zip(combos, names, strict=True), start=1):
        label = f"[{number}/{len(combos)}] {name}"
        print(f"sweep {label}: training", flush=True)
        began = time.monotonic()
        run_out = folder / name
        reuse = [f"model.pretrained={json.dumps(str(shared_base))}"] if shared_base else []
        row = _run_one(source, run_out, [*overrides, *reuse, *_as_overrides(combo)])
        rows.append({**combo, **row})
        write_sweep_table(folder, rows)  # a readable table even if the sweep is stopped
        seconds = time.monotonic() - began
        if row["status"] == "ok":
            print(f"sweep {label}: ok, {_metric_text(row)} ({seconds:.0f} s)", flush=True)
        else:
            print(f"sweep {label}: FAILED ({seconds:.0f} s): {row['error'][:300]}", flush=True)
        if may_share_base and not shared_base and _finished_base(run_out / "base"):
            # a failed transfer step may still leave a complete pretrained base behind
            shared_base = _share_base(run_out / "base", folder / SHARED_BASE)
            print(f"sweep: later runs reuse the pretrained base {shared_base}", flush=True)

    plot_sweep(folder)
    write_sweep_table(folder, rows)  # again, now that the cost panel it links to is drawn
    report = write_report(folder)
    ok = sum(row["status"] == "ok" for row in rows)
    total = time.monotonic() - started
    settings = json.loads((folder / "sweep.json").read_text(encoding="utf-8"))
    settings.update(
        succeeded=ok,
        failed=len(rows) - ok,
        seconds=round(total, 1),
        shared_base=str(shared_base) if shared_base else None,
    )
    write_json_atomic(folder / "sweep.json", settings)
    print(f"sweep: {ok} of {len(rows)} runs succeeded in {total:.0f} s; table "
          f"{folder / 'sweep.md'}, report {report}", flush=True)  # fmt: skip
    return folder


def _finished_base(folder: Path) -> bool:
    return is_classic(folder) and (folder / "vocab.txt").is_file()


def _share_base(base: Path, shared: Path) -> Path:
    """A copy of a run's pretrained ``base`` at ``shared`` (complete or absent, never half)."""
    tmp = shared.with_name(f".{shared.name}.copying")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(base, tmp)
    os.replace(tmp, shared)
    return shared.resolve()


def _unique_names(combos: list[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for combo in combos:
        name = combination_name(combo) or "run"
        candidate, n = name, 2
        while candidate in names:
            candidate, n = f"{name}-{n}", n + 1
        names.append(candidate)
    return names


def _metric_text(row: Mapping[str, Any]) -> str:
    for key in ("test_accuracy", "test_perplexity"):
        if row.get(key) is not None:
            return f"{key} {row[key]:.4f}"
    return "no test metric"
