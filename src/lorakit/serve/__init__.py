"""`lorakit serve`: one base model in memory serving many LoRA adapters over HTTP.

registry.py  the base model with named adapters, each with its own classification head
merged.py    folders `lorakit merge` wrote, served by name beside the adapters as models of their own
admission.py where run-time loads may come from (adapter roots) and the limits of an adapter
batcher.py   micro-batching: requests arriving together run together, grouped by adapter
schemas.py   the JSON bodies (pydantic)
app.py       the FastAPI app: routes, API key, limits, JSON errors
middleware.py  the ASGI layer: the body limit as bytes stream in, the generic 500
server.py    `serve(...)`: uvicorn on 127.0.0.1 unless told otherwise
"""

from .admission import AdapterLimits, AdapterRoots
from .app import ServeSettings, create_app
from .errors import ServeError
from .registry import AdapterInfo, AdapterRegistry
from .server import DEFAULT_HOST, parse_adapter_options, serve

__all__ = [
    "DEFAULT_HOST",
    "AdapterInfo",
    "AdapterLimits",
    "AdapterRegistry",
    "AdapterRoots",
    "ServeError",
    "ServeSettings",
    "create_app",
    "parse_adapter_options",
    "serve",
]
