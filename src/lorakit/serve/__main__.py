"""`python -m lorakit.serve`: the `lorakit serve` command, runnable on its own."""

from __future__ import annotations

from typing import Annotated

import typer

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def serve(
    base: Annotated[str, typer.Option(help="base model: 'minilm' or a model folder")],
    adapter: Annotated[
        list[str] | None,
        typer.Option(help="NAME=DIR: an adapter folder or a run directory (repeatable)"),
    ] = None,
    host: Annotated[str, typer.Option(help="address to bind (loopback by default)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to bind")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(envvar="LORAKIT_API_KEY", help="key for loading/unloading adapters"),
    ] = None,
    max_texts: Annotated[int, typer.Option(help="texts per request, at most")] = 64,
    max_text_chars: Annotated[int, typer.Option(help="characters per text, at most")] = 5000,
    log_level: Annotated[
        str, typer.Option(help="uvicorn's: warning hides the access log")
    ] = "info",
) -> None:
    """Serve many LoRA adapters on one base model over HTTP (FastAPI + uvicorn)."""
    from lorakit.network import OfflineError
    from lorakit.serve import ServeError, ServeSettings, parse_adapter_options
    from lorakit.serve import serve as run_server

    settings = ServeSettings(max_texts=max_texts, max_text_chars=max_text_chars)
    try:
        adapters = parse_adapter_options(adapter or [])
        run_server(
            base, adapters, host=host, port=port, api_key=api_key, settings=settings,
            log_level=log_level,
        )  # fmt: skip
    except (ServeError, OfflineError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None


if __name__ == "__main__":
    app()
