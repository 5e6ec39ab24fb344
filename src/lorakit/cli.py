"""``lorakit``: a thin command-line shell over ``lorakit.api``."""

from __future__ import annotations

import json
import math
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from lorakit import api

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="LoRA fine-tuning: small, fast, correct and easy to see into.",
)

MODEL_FOLDER = "a run directory written by `lorakit train`, or a folder `lorakit merge` wrote"


@app.command()
def train(
    recipe: Annotated[
        str | None, typer.Argument(help="a recipe name (see `lorakit recipes`) or a .toml config")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="run directory (default runs/<recipe>-<time>)")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="KEY=VALUE override, e.g. train.lr=1e-3 (repeatable)"),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="print the resolved config and parameter report")
    ] = False,
    resume: Annotated[
        Path | None,
        typer.Option(help="continue a stopped run from its newest checkpoint (RUN_DIR)"),
    ] = None,
    processes: Annotated[
        int,
        typer.Option(help="data-parallel processes on this machine (train.batch_size is global)"),
    ] = 1,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="start over in an --out that holds a run no process runs (files go)"
        ),
    ] = False,
) -> None:
    """Train a recipe (default: the built-in default recipe) and write a run directory."""
    overrides = set_ or []
    if dry_run:
        typer.echo(api.dry_run(recipe, overrides))
        return
    try:
        summary = api.train(recipe, out=out, overrides=overrides, resume=resume,
                            processes=processes, force=force)  # fmt: skip
    except api.training_errors() as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    if "run_dir" not in summary or processes > 1:  # the main worker printed it already
        return
    figures = {k: v for k, v in summary.items() if k.startswith("test_") or k == "run_dir"}
    typer.echo(
        " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items())
    )


@app.command()
def recipes() -> None:
    """List the built-in recipes, one line each."""
    for name, description in api.list_recipes().items():
        label = f"{name} (default)" if name == api.DEFAULT_RECIPE else name
        typer.echo(f"{label:<24} {description}")


@app.command("eval")
def eval_(
    run_dir: Annotated[Path, typer.Argument(help=MODEL_FOLDER)],
    data: Annotated[
        str | None, typer.Option(help="a dataset name or path (default: the run's)")
    ] = None,
    split: Annotated[str, typer.Option(help="train, validation or test")] = "test",
) -> None:
    """Evaluate a run's adapter on a split (a causal-LM run: its perplexity and task figures)."""
    echo_json(api.evaluate(run_dir, data=data, split=split), indent=2)


@app.command()
def predict(
    run_dir: Annotated[Path, typer.Argument(help=MODEL_FOLDER)],
    texts: Annotated[list[str] | None, typer.Argument(help="texts to classify")] = None,
    file: Annotated[Path | None, typer.Option(help="a file with one text per line")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per text")] = False,
) -> None:
    """Predict the label of each text, with its probability."""
    texts = list(texts or [])
    if file is not None:
        texts += api.read_texts(file)
    if not texts:
        raise api.ConfigError("predict: give texts as arguments or --file FILE (one text per line)")
    for text, result in zip(texts, api.predict(run_dir, texts), strict=True):
        if as_json:
            echo_json({"text": text, **result})
        else:
            typer.echo(f"{result['label']}\t{result['probability']:.3f}\t{text}")


def echo_json(data, **options) -> None:
    """``data`` as strict JSON on stdout: a number that is not finite (NaN, infinity), which
    JSON cannot hold, is printed as null, and a note on stderr names it."""
    not_finite: list[str] = []

    def finite(value, where: str):
        if isinstance(value, float) and not math.isfinite(value):
            not_finite.append(f"{where} ({value})")
            return None
        if isinstance(value, dict):
            return {k: finite(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return value

    text = json.dumps(finite(data, ""), allow_nan=False, **options)
    if not_finite:
        verb = "is" if len(not_finite) == 1 else "are"
        typer.echo(f"note: {', '.join(not_finite)} {verb} not finite; printed as null", err=True)
    typer.echo(text)


@app.command()
def serve(
    base: Annotated[str, typer.Option(help="base model: 'minilm' or a model folder")] = "minilm",
    adapter: Annotated[
        list[str] | None,
        typer.Option(
            help="NAME=DIR: an adapter folder, a run directory or a folder `lorakit merge` "
            "wrote (repeatable)"
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="address to bind (loopback by default)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to bind")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="LORAKIT_API_KEY",
            help="key for loading/unloading adapters (without it they are closed)",
        ),
    ] = None,
    max_texts: Annotated[int, typer.Option(help="texts per request, at most")] = 64,
    max_text_chars: Annotated[int, typer.Option(help="characters per text, at most")] = 5000,
    adapter_root: Annotated[
        list[Path] | None,
        typer.Option(help="a folder that run-time loads (POST /v1/adapters) may come from"),
    ] = None,
    max_adapter_rank: Annotated[int, typer.Option(help="LoRA rank of an adapter, at most")] = 256,
    max_adapter_bytes: Annotated[
        int, typer.Option(help="bytes of an adapter's weights file, at most")
    ] = 256 * 2**20,
    max_labels: Annotated[int, typer.Option(help="labels of an adapter's head, at most")] = 1000,
    max_merged_bytes: Annotated[
        int, typer.Option(help="bytes of a merged model (its files, its parameters), at most")
    ] = 2 * 2**30,
    allow_unauthenticated_admin: Annotated[
        bool,
        typer.Option(help="without --api-key, let anyone load and unload adapters (warned)"),
    ] = False,
    log_level: Annotated[
        str, typer.Option(help="uvicorn's: warning hides the access log")
    ] = "info",
    max_new_tokens: Annotated[
        int, typer.Option(help="LLM: max_tokens of a request, at most (and its default)")
    ] = 512,
    max_batch: Annotated[int, typer.Option(help="LLM: requests decoding at once")] = 32,
    max_adapters: Annotated[
        int, typer.Option(help="LLM: adapters on the model at once (least recently used leave)")
    ] = 64,
    max_loaded_bytes: Annotated[
        int, typer.Option(help="LLM: bytes of the adapters on the model at once")
    ] = 2**30,
    batching: Annotated[
        str, typer.Option(help="LLM: 'mixed' (adapters in one forward) or 'grouped' (one each)")
    ] = "mixed",
    bf16: Annotated[bool, typer.Option(help="LLM: hold the base in bfloat16")] = False,
) -> None:
    """Serve many LoRA adapters on one base model over HTTP (FastAPI + uvicorn): classifiers
    with lorakit's predict API (and merged models beside them), causal LMs (smollm2, a GGUF file,
    a causal model folder) with OpenAI's API and adapters mixed in each batch."""
    # the server is a shell beside this one (python -m lorakit.serve), not a call of the API
    import torch

    from lorakit.serve import AdapterLimits, ServeError, ServeSettings, parse_adapter_options
    from lorakit.serve import serve as run_server
    from lorakit.serve.decoding import BatchingSettings
    from lorakit.serve.openai_api import GenerationSettings

    try:
        if batching not in ("mixed", "grouped"):
            raise ServeError(f"--batching {batching!r}: use 'mixed' or 'grouped'")
        settings = ServeSettings(max_texts=max_texts, max_text_chars=max_text_chars)
        limits = AdapterLimits(max_adapter_rank, max_adapter_bytes, max_labels, max_merged_bytes)
        generation = GenerationSettings(
            max_new_tokens=max_new_tokens, max_adapters=max_adapters,
            max_loaded_bytes=max_loaded_bytes, dtype=torch.bfloat16 if bf16 else None,
            batching=BatchingSettings(max_batch=max_batch, mixed=batching == "mixed"),
        )  # fmt: skip
        run_server(base, parse_adapter_options(adapter or []), host=host, port=port,
                   api_key=api_key, settings=settings, log_level=log_level,
                   adapter_roots=adapter_root or [], adapter_limits=limits,
                   allow_unauthenticated_admin=allow_unauthenticated_admin,
                   generation=generation)  # fmt: skip
    except ServeError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None


@app.command()
def sweep(
    config: Annotated[str, typer.Argument(help="a recipe name or a .toml config")],
    grid: Annotated[
        list[str],
        typer.Option(
            "--grid",
            help="KEY=V1,V2,... (repeatable); list values: target_modules=query|query,value",
        ),
    ],
    out: Annotated[
        Path | None, typer.Option(help="sweep folder (default runs/sweep-<recipe>-<time>)")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="KEY=VALUE for every run (repeatable)")
    ] = None,
    seeds: Annotated[
        int, typer.Option(help="train each combination with N seeds (seed, seed+1, ...)")
    ] = 1,
) -> None:
    """Train every combination of a grid; write sweep.csv, sweep.md, plots and report.html."""
    record = api.sweep(config, grid, out=out, overrides=set_ or [], seeds=seeds)
    typer.echo(record["sweep_dir"])
    if record["succeeded"] == 0:
        raise typer.Exit(1)


@app.command()
def inspect(
    target: Annotated[
        str,
        typer.Argument(
            help="a model folder, 'minilm', a hub id, an adapter folder or a run directory"
        ),
    ],
) -> None:
    """Module names LoRA can target and parameter counts; for an adapter its config and size."""
    typer.echo(api.inspect(target), nl=False)


@app.command()
def merge(
    run_dir: Annotated[Path, typer.Argument(help="a run directory written by `lorakit train`")],
    out_dir: Annotated[Path, typer.Argument(help="a new folder for the merged model")],
    force: Annotated[
        bool, typer.Option("--force", help="replace OUT_DIR if it is not empty")
    ] = False,
) -> None:
    """Write a standalone model with the adapter merged in (no adapter to load).

    Transformers classifiers (sentiment, topics, classify): transformers'
    AutoModelForSequenceClassification, or lorakit predict/eval OUT_DIR.

    Causal LMs: transformers' AutoModelForCausalLM.

    The classic recipe's GloVe classifier (not a transformers model): lorakit
    predict/eval OUT_DIR, or lorakit.models.classic.load_classic.

    Both kinds of classifier serve too: lorakit serve --adapter NAME=OUT_DIR (beside the
    adapters, as a model of its own).
    """
    typer.echo(str(api.merge(run_dir, out_dir, force=force)))


@app.command("merge-adapters")
def merge_adapters(
    adapters: Annotated[
        list[Path], typer.Argument(help="run directories (or adapter folders) of one base model")
    ],
    weights: Annotated[
        str, typer.Option(help="one weight per adapter, comma-separated, e.g. 0.5,0.5")
    ],
    out: Annotated[Path, typer.Option(help="a new folder for the combined adapter")],
    method: Annotated[
        str,
        typer.Option(help="cat, linear, svd, ties, dare_linear, dare_ties, magnitude_prune, ..."),
    ] = "svd",
    density: Annotated[
        float | None, typer.Option(help="share of entries kept, in (0, 1]: ties, dare, ...")
    ] = None,
    svd_rank: Annotated[int | None, typer.Option(help="rank of an svd result")] = None,
    majority_sign_method: Annotated[
        str, typer.Option(help="ties' sign election: total or frequency")
    ] = "total",
) -> None:
    """Combine adapters into one (PEFT's add_weighted_adapter), written as an adapter folder
    that lorakit and PEFT load on the same base."""
    try:
        numbers = [float(w) for w in weights.split(",")]
    except ValueError:
        raise api.ConfigError(
            f"--weights {weights!r}: give one number per adapter, comma-separated, e.g. 0.5,0.5"
        ) from None
    folder = api.merge_adapters(
        adapters, out, weights=numbers, method=method, density=density, svd_rank=svd_rank,
        majority_sign_method=majority_sign_method,
    )  # fmt: skip
    typer.echo(str(folder))


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="a causal-LM run directory")],
    out: Annotated[Path, typer.Argument(help="the GGUF file to write")],
    format: Annotated[
        str, typer.Option("--format", help="gguf (the LoRA adapter) or gguf-merged")
    ] = "gguf",
    outtype: Annotated[
        str | None,
        typer.Option(
            help="f32, f16, bf16, q8_0, q5_1, q5_0, q4_1 or q4_0 (default: f32 for "
            "gguf, f16 for gguf-merged)"
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="replace OUT if it exists")] = False,
) -> None:
    """Write a causal-LM run as one GGUF file for llama.cpp.

    --format gguf: the adapter as a LoRA GGUF, loaded beside the base model's GGUF
    (llama-cli -m BASE.gguf --lora OUT).

    --format gguf-merged: the merged model, which llama.cpp runs alone (llama-cli -m OUT).
    """
    typer.echo(str(api.export(run_dir, out, format=format, outtype=outtype, force=force)))


@app.command()
def generate(
    run_dir: Annotated[Path, typer.Argument(help="a causal-LM run directory or its merged folder")],
    prompt: Annotated[str, typer.Argument(help="the question (chat runs) or the text to continue")],
    max_new_tokens: Annotated[int, typer.Option(help="tokens to generate at most")] = 50,
    temperature: Annotated[float, typer.Option(help="0 = greedy decoding")] = 1.0,
    top_p: Annotated[float, typer.Option(help="nucleus sampling: the probability kept")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="makes sampling repeatable")] = None,
    raw: Annotated[
        bool, typer.Option("--raw", help="continue PROMPT as given, without the chat template")
    ] = False,
) -> None:
    """Answer PROMPT with the run's model (base + adapter, or merged), streamed as it is decoded.

    A run trained on its chat template gets PROMPT as the user's turn and stops at the end of
    the assistant's; other runs (and --raw) continue PROMPT, printed first.
    """
    api.generate(
        run_dir, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
        seed=seed, raw=raw, stream=True, on_text=lambda text: typer.echo(text, nl=False),
        echo_prompt=True,
    )  # fmt: skip


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="a run directory or a sweep folder")],
) -> None:
    """Write RUN_DIR/report.html (self-contained, plots embedded)."""
    typer.echo(str(api.report(run_dir)))


def expand_set_options(argv: list[str]) -> list[str]:
    """``--set a=1 b=2`` (docs/run-directory.md's form) -> ``--set a=1 --set b=2`` for the parser."""
    expanded: list[str] = []
    in_set = False
    for arg in argv:
        if arg == "--set":
            in_set = True
            expanded.append(arg)
        elif in_set and "=" in arg and not arg.startswith("-"):
            if expanded[-1] != "--set":
                expanded.append("--set")
            expanded.append(arg)
        else:
            in_set = False
            expanded.append(arg)
    return expanded


@contextmanager
def lorakit_warnings_on_one_line() -> Iterator[None]:
    """lorakit's own warnings (``DataWarning``, ``FingerprintWarning`` ...) shown as its errors
    are, one line naming the fix, without Python's file, line and source; others as Python
    shows them."""
    package = str(Path(__file__).resolve().parent)
    python_format = warnings.formatwarning

    def one_line(message, category, filename, lineno, line=None) -> str:
        ours = category.__module__.startswith("lorakit") or str(filename).startswith(package)
        if ours:
            return f"warning: {message}\n"
        return python_format(message, category, filename, lineno, line)

    warnings.formatwarning = one_line
    try:
        yield
    finally:
        warnings.formatwarning = python_format


def main(argv: list[str] | None = None) -> int:
    """The ``lorakit`` entry point."""
    argv = expand_set_options(sys.argv[1:] if argv is None else list(argv))
    try:
        with lorakit_warnings_on_one_line():
            code = app(args=argv, standalone_mode=False)  # a command's Exit(n) comes back as n
    except api.user_errors() as err:
        typer.echo(f"error: {err}", err=True)
        return 2
    except typer.Exit as done:
        return done.exit_code
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("aborted", err=True)
        return 130
    except Exception as err:  # click's usage errors
        import click

        # newer typer raises those of its own copy of click, based on typer.TyperException
        usage = (click.ClickException, getattr(typer, "TyperException", click.ClickException))
        if isinstance(err, usage):
            err.show()
            return 2
        raise
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
