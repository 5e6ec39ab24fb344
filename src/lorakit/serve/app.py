"""The HTTP API: a FastAPI app over one `AdapterRegistry` and its `MicroBatcher`.

    POST   /v1/predict          {"adapter", "texts"} -> labels and probabilities
    GET    /v1/adapters         the loaded adapters and merged models: names and facts, no paths
    POST   /v1/adapters         {"name", "path"}: load one from under an adapter root (API key)
    DELETE /v1/adapters/{name}  unload one (API key)
    GET    /healthz             liveness
    GET    /openapi.json        the schema (FastAPI's)

Loading and unloading need the API key; a server without one refuses them (403) unless it was
started with `allow_unauthenticated_admin`. Loads run in a thread of their own, so predictions
go on meanwhile.

Every error is JSON `{"error": CODE, "detail": MESSAGE}` with a 4xx status that fits it; an
unexpected one is a 500 whose detail is only a request id (the server's log has the rest).
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from .admission import AdapterLimits, AdapterRoots
from .batcher import MicroBatcher
from .errors import (
    AdminClosedError,
    ServeError,
    TextTooLongError,
    TooManyTextsError,
    UnauthorizedError,
    lorakit_error,
)
from .middleware import BodyLimit, InternalErrors
from .registry import AdapterInfo, AdapterRegistry
from .schemas import (
    AdapterDescription,
    AdapterList,
    ErrorBody,
    Health,
    LoadAdapterRequest,
    Prediction,
    PredictRequest,
    PredictResponse,
)


@dataclass(frozen=True)
class ServeSettings:
    """Limits and batching of the server."""

    max_texts: int = 64  # texts per request
    max_text_chars: int = 5_000  # characters per text
    batch_window_ms: float = 5.0  # how long the batcher waits for more requests
    batch_size: int = 32  # texts per forward pass
    max_length: int | None = None  # tokens per text for adapters outside a run directory

    def __post_init__(self) -> None:
        for name in ("max_texts", "max_text_chars", "batch_size", "max_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ServeError(f"{name} must be at least 1, got {value}")
        if self.batch_window_ms < 0:
            raise ServeError(f"batch_window_ms must be 0 or more, got {self.batch_window_ms}")

    def max_body_bytes(self) -> int:
        # room for every text at its longest, JSON-escaped (\uXXXX: 6 bytes a character)
        return self.max_texts * (self.max_text_chars * 6 + 16) + 65_536


def _describe_validation(exc: RequestValidationError, content_type: str) -> tuple[int, str, str]:
    errors = exc.errors()
    for err in errors:
        if err.get("type") == "json_invalid":
            reason = err.get("ctx", {}).get("error", err.get("msg", ""))
            return 400, "malformed_json", f"the request body is not valid JSON: {reason}"
    parts = []
    for err in _informative(errors):
        where = _location(err.get("loc", ()))
        reason = err.get("ctx", {}).get("error") if err.get("type") == "value_error" else None
        if not where and reason:  # a check of the body as a whole, which names its fields
            parts.append(str(reason))
            continue
        if not where:  # the body as a whole: missing, not JSON, or not an object
            if err.get("type") == "missing":
                return (
                    400,
                    "malformed_json",
                    ('the request has no body; send JSON like {"adapter": NAME, "texts": [...]}'),
                )
            if "json" not in content_type:
                return (
                    400,
                    "malformed_json",
                    (
                        "send the request body as JSON with 'Content-Type: application/json' "
                        f"(got {content_type or 'no content type'})"
                    ),
                )
            return 422, "invalid_input", f"the body must be a JSON object: {err.get('msg')}"
        parts.append(f"{where}: {reason or err.get('msg')}")
    return 422, "invalid_input", "; ".join(parts)


def _informative(errors: list[dict]) -> list[dict]:
    """The errors without the type mismatches of a union's other members, when some error is
    left: a prompt that is a string with a bad character is not also "not a list"."""
    kept = [e for e in errors if not (_in_union(e) and e.get("type", "").endswith("_type"))]
    return kept or errors


def _in_union(err: dict) -> bool:
    return any(_is_member_tag(part) for part in err.get("loc", ()))


def _is_member_tag(part) -> bool:
    """pydantic's name for a member of a union in an error's location, e.g.
    "function-after[_unicode(), str]" or "list[TextPart]": never a field's name."""
    return isinstance(part, str) and "[" in part


def _location(loc) -> str:
    """("body", "texts", 3) -> "texts[3]": where in the body an error is, as the client wrote it
    (without the union members pydantic names)."""
    where = ""
    for part in loc:
        if isinstance(part, int):
            where += f"[{part}]"
        elif part != "body" and not _is_member_tag(part):
            where += f".{part}" if where else str(part)
    return where


def _install_error_handlers(app: FastAPI, body=lorakit_error) -> None:
    """JSON error answers, each `body(code, detail)`, for the server's own errors, invalid
    requests and unknown routes."""

    def _error(status: int, code: str, detail: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse(body(code, detail), status_code=status, headers=headers)

    @app.exception_handler(ServeError)
    async def serve_error(_: Request, exc: ServeError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, UnauthorizedError) else None
        return _error(exc.status, exc.code, str(exc), headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(*_describe_validation(exc, request.headers.get("content-type", "")))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        detail = exc.detail
        if isinstance(exc.__cause__, UnicodeDecodeError):  # FastAPI's "error parsing the body"
            code, cause = "malformed_json", exc.__cause__
            detail = (
                f"the request body is not UTF-8 ({cause.reason} at byte {cause.start}); "
                "send JSON encoded as UTF-8"
            )
        elif exc.status_code == 404:
            detail = f"no route {request.url.path}; see /openapi.json for the API"
        return _error(exc.status_code, code, str(detail), getattr(exc, "headers", None))


def _key_guard(api_key: str | None, allow_unauthenticated: bool):
    """A dependency that lets a request through when it carries the key; without a key set, it
    lets every request through if `allow_unauthenticated`, none otherwise."""
    bearer = HTTPBearer(auto_error=False)
    header = APIKeyHeader(name="X-API-Key", auto_error=False)

    def require_key(
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer),  # noqa: B008
        key: str | None = Depends(header),  # noqa: B008
    ) -> None:
        if api_key is None:
            if allow_unauthenticated:
                return
            raise AdminClosedError(
                "loading and unloading adapters is closed on this server: start it with "
                "--api-key KEY (or --allow-unauthenticated-admin)"
            )
        given = credentials.credentials if credentials else key
        if not given or not hmac.compare_digest(given.encode(), api_key.encode()):
            raise UnauthorizedError(
                "this endpoint needs the server's API key: send 'Authorization: Bearer KEY' "
                "or 'X-API-Key: KEY'" + (" (the key given is wrong)" if given else "")
            )

    return require_key


def _describe(info: AdapterInfo) -> AdapterDescription:
    return AdapterDescription(
        name=info.name,
        kind=info.kind,
        labels=info.labels,
        num_labels=len(info.labels),
        rank=info.rank,
        max_length=info.max_length,
        warnings=info.warnings,
    )


def create_app(
    base: str | AdapterRegistry,
    adapters: Mapping[str, str | Path] | None = None,
    *,
    api_key: str | None = None,
    settings: ServeSettings | None = None,
    adapter_roots: Iterable[str | Path] = (),
    adapter_limits: AdapterLimits | None = None,
    allow_unauthenticated_admin: bool = False,
) -> FastAPI:
    """The serving app: `base` (a model name or folder, or a ready registry) with `adapters`
    ({name: adapter folder, run directory or merged folder}, trusted as given) loaded before it
    answers anything. At run time, adapters load from under `adapter_roots` only, within
    `adapter_limits`, and with `api_key` (or `allow_unauthenticated_admin` without one)."""
    settings = settings or ServeSettings()
    roots = AdapterRoots(adapter_roots)
    registry = (
        base
        if isinstance(base, AdapterRegistry)
        else AdapterRegistry(
            base,
            batch_size=settings.batch_size,
            max_length=settings.max_length,
            limits=adapter_limits,
        )
    )
    for name, path in (adapters or {}).items():
        registry.load(name, path)
    loader = ThreadPoolExecutor(1, thread_name_prefix="lorakit-loader")
    batcher = MicroBatcher(
        registry, window=settings.batch_window_ms / 1000, max_texts=4 * settings.batch_size
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        batcher.start()
        try:
            yield
        finally:
            batcher.stop()
            loader.shutdown(wait=False, cancel_futures=True)

    errors = {status: {"model": ErrorBody} for status in (400, 401, 404, 409, 413, 422, 500)}
    app = FastAPI(
        title="lorakit serve",
        summary="One base model, many LoRA adapters: text classification over HTTP.",
        lifespan=lifespan,
        responses=errors,
    )
    app.state.registry = registry
    app.state.settings = settings
    _install_error_handlers(app)
    require_key = _key_guard(api_key, allow_unauthenticated_admin)

    hint = f" (at most {settings.max_texts} texts of {settings.max_text_chars:,} characters)"
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes(), hint=hint)
    app.add_middleware(InternalErrors)  # added last, so it wraps the body limit too

    @app.get("/healthz", response_model=Health)
    def healthz() -> Health:
        return Health(status="ok", base=registry.base, adapters=len(registry.adapters))

    @app.post("/v1/predict", response_model=PredictResponse)
    async def predict(body: PredictRequest) -> PredictResponse:
        """Classifies `texts` with the named adapter (requests together are batched together)."""
        _check_limits(body.texts, settings)
        registry.info(body.adapter)  # an unknown adapter fails here, before the queue
        info, probs = await asyncio.wrap_future(batcher.submit(body.adapter, body.texts))
        results = []
        for row in probs:
            best = int(row.argmax())
            results.append(
                Prediction(
                    label=info.labels[best],
                    probability=float(row[best]),
                    probabilities={
                        label: float(p) for label, p in zip(info.labels, row, strict=True)
                    },
                )
            )
        return PredictResponse(adapter=info.name, results=results)

    @app.get("/v1/adapters", response_model=AdapterList)
    def list_adapters() -> AdapterList:
        adapters = [_describe(i) for i in registry.infos()]
        return AdapterList(base=registry.base_name, adapters=adapters)

    @app.post(
        "/v1/adapters",
        response_model=AdapterDescription,
        status_code=201,
        dependencies=[Depends(require_key)],
    )
    async def load_adapter(body: LoadAdapterRequest) -> AdapterDescription:
        """Loads an adapter from under the server's adapter roots onto the base."""
        load = loader.submit(_load_from_roots, registry, roots, body)
        return _describe(await asyncio.wrap_future(load))

    @app.delete(
        "/v1/adapters/{name}",
        response_model=AdapterDescription,
        dependencies=[Depends(require_key)],
    )
    def unload_adapter(name: str) -> AdapterDescription:
        """Unloads an adapter; answers with what was unloaded."""
        return _describe(registry.unload(name))

    return app


def _load_from_roots(
    registry: AdapterRegistry, roots: AdapterRoots, body: LoadAdapterRequest
) -> AdapterInfo:
    """A run-time load; its errors name the adapter by the path the client gave, not the
    server's."""
    path = roots.resolve(body.path)
    try:
        return registry.load(body.name, path, body.labels)
    except ServeError as e:
        raise type(e)(str(e).replace(str(path), body.path)) from None


def _check_limits(texts: list[str], settings: ServeSettings) -> None:
    if len(texts) > settings.max_texts:
        raise TooManyTextsError(
            f"{len(texts)} texts in one request; at most {settings.max_texts} are allowed: "
            "split them over several requests"
        )
    for i, text in enumerate(texts):
        if len(text) > settings.max_text_chars:
            raise TextTooLongError(
                f"texts[{i}] has {len(text):,} characters; at most {settings.max_text_chars:,} "
                "are allowed: shorten or split it"
            )
