"""Running the app with uvicorn: `serve(...)` is what `lorakit serve` calls."""

from __future__ import annotations

import ipaddress
import json
import socket
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import uvicorn

from lorakit.models.gguf import SMOLLM2
from lorakit.models.tiny_gpt2 import TINY_GPT2

from .admission import AdapterLimits
from .app import ServeSettings, create_app
from .openai_api import GenerationSettings, create_generation_app

DEFAULT_HOST = "127.0.0.1"  # loopback unless told otherwise


def parse_adapter_options(options: list[str]) -> dict[str, str]:
    """`["NAME=DIR", ...]` -> `{NAME: DIR}`, with an error that shows the expected form."""
    from .errors import ServeError

    adapters: dict[str, str] = {}
    for option in options:
        name, sep, path = option.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ServeError(
                f"--adapter {option!r}: write NAME=DIR, e.g. --adapter sentiment=runs/s1"
            )
        if name.strip() in adapters:
            raise ServeError(f"--adapter: the name {name.strip()!r} is given twice")
        adapters[name.strip()] = path.strip()
    return adapters


def generates_text(base: str) -> bool:
    """Whether `base` is a causal LM (served with OpenAI's API) rather than a classifier: a
    built-in causal model, a GGUF file, or a folder whose config names a causal architecture."""
    if base in (SMOLLM2, TINY_GPT2) or base.endswith(".gguf"):
        return True
    config = Path(base).expanduser() / "config.json"
    try:
        architectures = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return False
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def serve(
    base: str,
    adapters: Mapping[str, str | Path],
    host: str = DEFAULT_HOST,
    port: int = 8000,
    api_key: str | None = None,
    settings: ServeSettings | None = None,
    log_level: str = "info",
    adapter_roots: Iterable[str | Path] = (),
    adapter_limits: AdapterLimits | None = None,
    allow_unauthenticated_admin: bool = False,
    generation: GenerationSettings | None = None,
) -> None:
    """Loads `base` and `adapters` ({name: adapter folder, run directory or merged folder})
    and serves them until interrupted: a classifier with lorakit's predict API, a causal LM
    (`generates_text`) with OpenAI's, within `generation`. Adapters that do not load stop it
    before it binds. At run time, adapters load from under `adapter_roots`, with `api_key`."""
    options = dict(api_key=api_key, adapter_roots=adapter_roots, adapter_limits=adapter_limits,
                   allow_unauthenticated_admin=allow_unauthenticated_admin)  # fmt: skip
    if generates_text(str(base)):
        app = create_generation_app(base, adapters, settings=generation, **options)
    else:
        app = create_app(base, adapters, settings=settings, **options)
    if allow_unauthenticated_admin and not api_key:
        where = "" if is_loopback(host) else f" on {host}"
        print(
            f"warning: --allow-unauthenticated-admin{where}: anyone who reaches this port can "
            "load adapters from the adapter roots and unload any adapter",
            file=sys.stderr,
        )
    uvicorn.run(app, host=host, port=port, log_level=log_level)
