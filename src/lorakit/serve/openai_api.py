"""The generation server: OpenAI's API over one causal LM and many adapters, in mixed batches.

    POST /v1/chat/completions     messages through the chat template; `model` names the adapter
    POST /v1/completions          a prompt continued as given
    GET  /v1/models               the base and the adapters
    POST /v1/load_lora_adapter    {"lora_name", "lora_path"}: vLLM's names (API key)
    POST /v1/unload_lora_adapter  {"lora_name"} (API key)
    GET  /metrics                 Prometheus text format
    GET  /healthz                 liveness

The official `openai` client works unchanged with ``base_url="http://HOST:PORT/v1"``. A request
whose `model` is an adapter is answered by base + adapter, `stream: true` by server-sent events in
OpenAI's chunk format. Requests join the running batch between decoding steps, whatever their
adapter (`serve/decoding.py`), and a client that goes away takes its row out of the batch.

A chat on an adapter whose run was trained with a system prompt gets that prompt first when the
messages have none, so a request gets what `lorakit generate` of the run gives.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from lorakit.data.causal import token_ids
from lorakit.data.chat import render, stop_ids
from lorakit.generate import prompt_ids
from lorakit.models.causal_lm import max_positions

from .admission import AdapterLimits, AdapterRoots
from .app import _install_error_handlers, _key_guard
from .causal_registry import CausalAdapter, CausalRegistry
from .decoding import BatchingSettings, ContinuousBatcher, Delta, Finished, Generation, Sampling
from .errors import InvalidInputError, ServeError, TextTooLongError
from .metrics import CONTENT_TYPE, GenerationMetrics
from .middleware import BodyLimit, InternalErrors
from .openai_schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    ErrorReply,
    LoadLoraRequest,
    ModelCard,
    ModelList,
    UnloadLoraRequest,
    Usage,
)
from .schemas import Health

CLIENT_GONE = 499  # nginx's "client closed request": the status of an answer never sent


@dataclass(frozen=True)
class GenerationSettings:
    """Limits of the generation server, and how it batches."""

    max_new_tokens: int = 512  # max_tokens of a request, at most (and its default)
    max_prompt_chars: int = 32_000  # characters of a prompt, or of all messages together
    max_messages: int = 256
    batching: BatchingSettings = field(default_factory=BatchingSettings)
    dtype: torch.dtype | None = None  # the base's weights (None: as its config says)
    max_adapters: int = 64  # adapters on the model at once
    max_loaded_bytes: int = 2**30  # their weights files together

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "max_prompt_chars", "max_messages"):
            if getattr(self, name) < 1:
                raise ServeError(f"{name} must be at least 1, got {getattr(self, name)}")

    def max_body_bytes(self) -> int:
        return self.max_prompt_chars * 6 + self.max_messages * 256 + 65_536


def create_generation_app(
    base: str | CausalRegistry,
    adapters: Mapping[str, str | Path] | None = None,
    *,
    api_key: str | None = None,
    settings: GenerationSettings | None = None,
    adapter_roots: Iterable[str | Path] = (),
    adapter_limits: AdapterLimits | None = None,
    allow_unauthenticated_admin: bool = False,
) -> FastAPI:
    """The generation app: `base` (a causal LM's name, folder or GGUF file, or a ready registry)
    with `adapters` ({name: run directory or adapter folder}) registered before it answers."""
    settings = settings or GenerationSettings()
    roots = AdapterRoots(adapter_roots)
    registry = base if isinstance(base, CausalRegistry) else CausalRegistry(
        base, dtype=settings.dtype, limits=adapter_limits, max_adapters=settings.max_adapters,
        max_loaded_bytes=settings.max_loaded_bytes,
    )  # fmt: skip
    for name, path in (adapters or {}).items():
        registry.register(name, path)
    metrics = GenerationMetrics()
    registry.on_evict = lambda name: metrics.evictions.labels(name).inc()
    tokenizer = registry.tokenizer
    batcher = ContinuousBatcher(
        registry.model,
        decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
        pad_id=registry.pad_id,
        prepare=registry.prepare,
        after_step=registry.drop_retired,
        lock=registry.lock,
        mixed_batch=registry.mixed_batch,
        settings=settings.batching,
        hooks=metrics.hooks(registry.base_name),
    )
    registry.in_use = batcher.adapters_in_use
    loader = ThreadPoolExecutor(1, thread_name_prefix="lorakit-loader")
    prompts = Prompts(registry, settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        batcher.start()
        try:
            yield
        finally:
            batcher.stop()
            loader.shutdown(wait=False, cancel_futures=True)

    errors = {status: {"model": ErrorReply} for status in (400, 401, 404, 409, 413, 422, 500, 503)}
    app = FastAPI(
        title="lorakit serve",
        summary="One causal LM, many LoRA adapters: OpenAI's API, adapters mixed in each batch.",
        lifespan=lifespan,
        responses=errors,
    )
    app.state.registry, app.state.batcher, app.state.metrics = registry, batcher, metrics
    _install_error_handlers(app, openai_error)
    require_key = _key_guard(api_key, allow_unauthenticated_admin)
    hint = f" (prompts of at most {settings.max_prompt_chars:,} characters)"
    app.add_middleware(
        BodyLimit, max_bytes=settings.max_body_bytes(), hint=hint, error_body=openai_error
    )
    app.add_middleware(InternalErrors, error_body=openai_error)

    @app.get("/healthz", response_model=Health)
    def healthz() -> Health:
        return Health(status="ok", base=registry.base_name, adapters=len(registry.adapters))

    @app.get("/v1/models", response_model=ModelList)
    def models() -> ModelList:
        created = int(time.time())
        cards = [ModelCard(id=registry.base_name, created=created, root=registry.base_name)]
        cards += [
            ModelCard(id=name, created=created, root=registry.base_name, parent=registry.base_name)
            for name in registry.names()
        ]
        return ModelList(data=cards)

    async def answer(body, request: Request, prompt: Prompt, reply: CompletionReply):
        metrics.requests.labels(body.model, reply.endpoint).inc()
        sampling = Sampling(
            prompt.max_tokens, body.temperature, body.top_p, body.seed, tuple(body.stop or ())
        )
        stops = [] if body.ignore_eos else prompt.stops
        loop = asyncio.get_running_loop()
        generation = batcher.submit(Generation(prompt.adapter, prompt.ids, sampling, stops, loop))
        if body.stream:
            return await _stream(generation, reply, body.include_usage())
        text, finished = await _collect(generation, request)
        if finished.reason == "cancelled":  # the client is gone: nobody reads an answer
            return Response(status_code=CLIENT_GONE)
        return reply.whole(text, finished)

    @app.post("/v1/completions", response_model=Completion)
    async def completions(body: CompletionRequest, request: Request):
        prompt = prompts.completion(body, registry.adapter(body.model))
        return await answer(body, request, prompt, CompletionReply(body.model, prompt))

    @app.post("/v1/chat/completions", response_model=ChatCompletion)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        prompt = prompts.chat(body, registry.adapter(body.model))
        return await answer(body, request, prompt, ChatReply(body.model, prompt))

    @app.post("/v1/load_lora_adapter", dependencies=[Depends(require_key)])
    async def load_lora_adapter(body: LoadLoraRequest) -> dict:
        """Registers (and loads) an adapter from under the server's adapter roots."""
        path = roots.resolve(body.lora_path)
        try:
            adapter = await asyncio.wrap_future(
                loader.submit(registry.register, body.lora_name, path)
            )
        except ServeError as e:
            raise type(e)(str(e).replace(str(path), body.lora_path)) from None
        return {"id": adapter.name, "object": "model", "rank": adapter.rank}

    @app.post("/v1/unload_lora_adapter", dependencies=[Depends(require_key)])
    def unload_lora_adapter(body: UnloadLoraRequest) -> dict:
        """Refuses new requests for the adapter; it leaves the model when its last one finishes."""
        adapter = registry.unregister(body.lora_name)
        return {"id": adapter.name, "object": "model", "deleted": True}

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return app


@dataclass(frozen=True)
class Prompt:
    """What a request asks the batcher for."""

    adapter: str | None
    ids: list[int]
    max_tokens: int
    stops: list[int]


def openai_error(code: str, detail: str) -> dict:
    """An error answer as OpenAI's API writes it (its clients read `error.message`)."""
    return {"error": {"message": detail, "type": code, "code": code}}


class Prompts:
    """Requests to token ids, within the server's limits and the model's positions."""

    def __init__(self, registry: CausalRegistry, settings: GenerationSettings) -> None:
        self.registry, self.settings = registry, settings
        self.tokenizer = registry.tokenizer
        self.positions = max_positions(registry.model)
        self.chat_stops = stop_ids(self.tokenizer, True) if registry.chat_template else None
        self.plain_stops = stop_ids(self.tokenizer, False)

    def completion(self, body: CompletionRequest, adapter: CausalAdapter | None):
        self._check_chars(len(body.prompt), "prompt")
        chat = adapter.chat if adapter else self.registry.chat_template
        ids = prompt_ids(self.tokenizer, body.prompt, chat=chat, raw=True)
        stops = self.chat_stops if chat else self.plain_stops
        return self._prompt(adapter, ids, body.max_tokens, stops)

    def chat(self, body: ChatCompletionRequest, adapter: CausalAdapter | None):
        if not self.registry.chat_template:
            raise InvalidInputError(
                f"{self.registry.base_name} has no chat template: use /v1/completions"
            )
        if len(body.messages) > self.settings.max_messages:
            raise InvalidInputError(
                f"{len(body.messages)} messages; at most {self.settings.max_messages} are allowed"
            )
        turns = [{"role": _role(m.role), "content": m.text()} for m in body.messages]
        self._check_chars(sum(len(t["content"]) for t in turns), "the messages")
        if adapter and adapter.system_prompt and turns[0]["role"] != "system":
            turns.insert(0, {"role": "system", "content": adapter.system_prompt})
        try:
            text = render(self.tokenizer, turns, open_turn=True)
        except Exception as e:  # noqa: BLE001 - the template's own check (jinja raise_exception)
            raise InvalidInputError(f"the chat template refuses these messages: {e}") from None
        ids = token_ids(self.tokenizer, [text])[0]
        return self._prompt(adapter, ids, body.new_tokens(), self.chat_stops)

    def _check_chars(self, chars: int, what: str) -> None:
        if chars > self.settings.max_prompt_chars:
            raise TextTooLongError(
                f"{what} has {chars:,} characters; at most {self.settings.max_prompt_chars:,} "
                "are allowed: shorten it"
            )

    def _prompt(self, adapter, ids: list[int], max_tokens: int | None, stops) -> Prompt:
        """The prompt, with the tokens it may get: max_tokens, else as many as the server and
        the model's positions allow."""
        most = self.settings.max_new_tokens
        if max_tokens is not None and max_tokens > most:
            raise InvalidInputError(
                f"max_tokens is {max_tokens:,}; this server generates at most {most:,} tokens a "
                "request (lorakit serve --max-new-tokens)"
            )
        new = max_tokens or most
        if self.positions is not None and len(ids) + (max_tokens or 1) > self.positions:
            raise InvalidInputError(
                f"the prompt's {len(ids):,} tokens and max_tokens {max_tokens or 1:,} exceed the "
                f"model's {self.positions:,} positions: shorten the prompt or lower max_tokens"
            )
        if self.positions is not None:
            new = min(new, self.positions - len(ids))
        return Prompt(adapter.name if adapter else None, ids, new, stops)


def _role(role: str) -> str:
    return "system" if role == "developer" else role


async def _collect(generation: Generation, request: Request) -> tuple[str, Finished]:
    """The whole text; the row leaves the batch if the client goes away meanwhile."""
    watch = asyncio.create_task(_cancel_on_disconnect(generation, request))
    text = []
    try:
        async for event in generation.events():
            if isinstance(event, Finished):
                return "".join(text), event
            text.append(event.text)
    finally:
        watch.cancel()
        generation.cancel()  # nothing when it finished: the row has left already
    raise AssertionError("events end with Finished")


async def _cancel_on_disconnect(generation: Generation, request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.2)
    generation.cancel()


class CompletionReply:
    """A completion's JSON: whole, or as stream chunks."""

    object = "text_completion"
    endpoint = "completions"

    def __init__(self, model: str, prompt: Prompt) -> None:
        self.model = model
        self.id, self.created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def head(self) -> dict:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model}

    def whole(self, text: str, finished: Finished) -> Completion:
        choice = CompletionChoice(text=text, finish_reason=finished.reason)
        return Completion(**self.head(), choices=[choice], usage=_usage(finished))

    def opening(self) -> dict | None:
        return None

    def chunk(self, text: str, finish_reason: str | None) -> dict:
        choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
        return {**self.head(), "choices": [choice]}


class ChatReply(CompletionReply):
    object = "chat.completion.chunk"
    endpoint = "chat"

    def __init__(self, model: str, prompt: Prompt) -> None:
        super().__init__(model, prompt)
        self.id = f"chatcmpl-{uuid.uuid4().hex}"

    def whole(self, text: str, finished: Finished) -> ChatCompletion:
        choice = ChatChoice(message=AssistantMessage(content=text), finish_reason=finished.reason)
        head = {**self.head(), "object": "chat.completion"}
        return ChatCompletion(**head, choices=[choice], usage=_usage(finished))

    def opening(self) -> dict:
        delta = {"role": "assistant", "content": ""}
        return {**self.head(), "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}

    def chunk(self, text: str, finish_reason: str | None) -> dict:
        delta = {"content": text} if text else {}
        return {
            **self.head(),
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }


def _usage(finished: Finished) -> Usage:
    return Usage(
        prompt_tokens=finished.prompt_tokens,
        completion_tokens=finished.completion_tokens,
        total_tokens=finished.prompt_tokens + finished.completion_tokens,
    )


async def _stream(
    generation: Generation, reply: CompletionReply, include_usage: bool
) -> StreamingResponse:
    """Server-sent events: the chunks, then `data: [DONE]`. The first event is awaited before the
    response starts, so an adapter that fails to load is an ordinary error answer. A client that
    disconnects closes the stream, which takes its row out of the batch."""
    pending = generation.events()
    try:
        first = await anext(pending)
    except BaseException:
        generation.cancel()
        raise

    async def then_the_rest():
        yield first
        async for event in pending:
            yield event

    async def events() -> AsyncIterator[str]:
        try:
            opening = reply.opening()
            if opening:
                yield _sse(opening)
            async for event in then_the_rest():
                if isinstance(event, Delta):
                    if event.text:
                        yield _sse(reply.chunk(event.text, None))
                    continue
                yield _sse(reply.chunk("", event.reason))
                if include_usage:
                    yield _sse({**reply.head(), "choices": [], "usage": _usage(event).model_dump()})
            yield "data: [DONE]\n\n"
        except ServeError as error:  # after the 200 went out: the error as an event of its own
            yield _sse(openai_error(error.code, str(error)))
        finally:
            generation.cancel()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})  # fmt: skip


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
