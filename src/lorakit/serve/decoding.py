"""Continuous batching: generation requests for many adapters decode together, one token a step.

One worker thread owns the model and loops:

  1. admit   waiting requests join the batch (up to `max_batch` rows): their prompts run as one
             left-padded prefill, each row through its adapter, which gives each its first token;
             their key/value caches are appended to the running batch's (padded on the left to
             one length, the padding masked out)
  2. decode  every row feeds its last token; one forward with the cache gives each its next
  3. retire  rows that are done (a stop token or string, `max_tokens`, a cancelled request) leave
             the batch; cache columns no row needs any more are cut off

Rows never see each other: padding is masked, positions count each row's own tokens, and each
row goes through its own adapter (`lorakit.lora.MixedBatch`), so greedy decoding gives a request
the tokens it gets decoded alone, up to the rounding of batched products.

With ``mixed=False`` the batch is split by adapter and each group runs its own forward, one after
the other: what a server that sets one adapter per forward does (kept to measure against).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from lorakit.lora import MixedBatch

from .errors import ServeError, ServerBusyError


@dataclass(frozen=True)
class Sampling:
    """How one request picks its tokens (OpenAI's names); greedy when ``temperature == 0``."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Delta:
    """New text of a generation (may be empty when only tokens were held back)."""

    text: str


@dataclass(frozen=True)
class Finished:
    reason: str  # "stop" (a stop token or string), "length" (max_tokens), "cancelled"
    prompt_tokens: int
    completion_tokens: int


class Generation:
    """One request: its prompt, adapter and sampling, and the events the worker sends back.

    Events reach an asyncio consumer through its loop (``loop`` given), else a thread-safe queue.
    `cancel` (the client went away) makes the worker drop the row at its next step.
    """

    def __init__(
        self,
        adapter: str | None,
        prompt: list[int],
        sampling: Sampling,
        stop_ids: list[int],
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.adapter, self.prompt, self.sampling = adapter, list(prompt), sampling
        self.stop_ids = set(stop_ids)
        self.tokens: list[int] = []
        self.done = False
        self.sent = ""  # text already handed out
        self.created = time.perf_counter()
        self.first_token_at: float | None = None
        self.cancelled = threading.Event()
        self._loop = loop
        self._events: asyncio.Queue | queue.SimpleQueue = (
            asyncio.Queue() if loop else queue.SimpleQueue()
        )
        self.generator = None
        if sampling.temperature > 0 and sampling.seed is not None:
            self.generator = torch.Generator().manual_seed(sampling.seed)

    def cancel(self) -> None:
        self.cancelled.set()

    def send(self, event: Delta | Finished | Exception) -> None:
        if self._loop is None:
            self._events.put(event)
        else:
            try:
                self._loop.call_soon_threadsafe(self._events.put_nowait, event)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                self.cancel()

    async def events(self):
        """Deltas, then one Finished; an exception from the worker is raised here."""
        while True:
            event = await self._events.get()
            if isinstance(event, Exception):
                raise event
            yield event
            if isinstance(event, Finished):
                return

    def wait(self) -> tuple[str, Finished]:
        """(the whole text, how it finished), blocking: for callers without an event loop."""
        text = []
        while True:
            event = self._events.get()
            if isinstance(event, Exception):
                raise event
            if isinstance(event, Finished):
                return "".join(text), event
            text.append(event.text)


@dataclass
class _Rows:
    """A decoding batch: its requests, their key/value cache and which cache columns are real."""

    requests: list[Generation]
    cache: DynamicCache
    mask: torch.Tensor  # (rows, columns) 1 for a real token, 0 for left padding
    positions: torch.Tensor  # (rows,) the position of each row's next token
    last: torch.Tensor  # (rows,) the token each row feeds next


@dataclass
class BatchingSettings:
    max_batch: int = 32  # rows decoding at once
    max_queue: int = 256  # requests waiting to join; more are refused (503)
    prefill_tokens: int = 2048  # prompt tokens admitted per step (at least one request)
    mixed: bool = True  # every adapter in one forward; False: one forward per adapter

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "prefill_tokens"):
            if getattr(self, name) < 1:
                raise ServeError(f"{name} must be at least 1, got {getattr(self, name)}")


@dataclass
class StepHooks:
    """What the worker reports (the server's metrics); each is called from the worker thread."""

    on_step: Callable[[int], None] = lambda rows: None
    on_first_token: Callable[[Generation], None] = lambda request: None
    on_token: Callable[[Generation], None] = lambda request: None
    on_queue: Callable[[int], None] = lambda waiting: None


class ContinuousBatcher:
    """Decodes `Generation`s on `model` in one worker thread (see the module docstring).

    ``prepare(adapters_in_use, adapter)`` runs on the worker before a request joins: it makes sure
    the request's adapter is on the model (loading it, evicting others not in use);
    ``after_step(adapters_in_use)`` runs after each step (adapters being unloaded leave when no
    row uses them). Both run with `lock` held, which every change to the model takes too.
    ``decode`` turns a row's tokens into text.
    """

    def __init__(
        self,
        model,
        decode: Callable[[list[int]], str],
        pad_id: int,
        prepare: Callable[[set[str], str | None], None] = lambda in_use, adapter: None,
        after_step: Callable[[set[str]], None] = lambda in_use: None,
        lock: threading.RLock | None = None,
        mixed_batch: MixedBatch | None = None,
        settings: BatchingSettings | None = None,
        hooks: StepHooks | None = None,
    ) -> None:
        self.model, self.decode, self.pad_id = model, decode, pad_id
        self.prepare, self.after_step = prepare, after_step
        self.lock = lock or threading.RLock()  # the model: held for each step, and by changes
        self.mixed_batch = mixed_batch or MixedBatch()
        self.settings = settings or BatchingSettings()
        self.hooks = hooks or StepHooks()
        self._waiting: queue.SimpleQueue[Generation] = queue.SimpleQueue()
        self._held: list[Generation] = []  # taken from the queue, not yet admitted
        self._wake = threading.Event()
        self._groups: dict[str | None, _Rows] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ the outside
    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._work, name="lorakit-decoder", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._wake.set()
            self._thread.join()
            self._thread = None

    def submit(self, request: Generation) -> Generation:
        if self.waiting() >= self.settings.max_queue:
            raise ServerBusyError(
                f"{self.settings.max_queue} requests are already waiting; retry in a moment"
            )
        self._waiting.put(request)
        self.hooks.on_queue(self.waiting())
        self._wake.set()
        return request

    def waiting(self) -> int:
        return self._waiting.qsize() + len(self._held)

    def running(self) -> int:
        return sum(len(rows.requests) for rows in self._groups.values())

    def adapters_in_use(self) -> set[str]:
        return {r.adapter for rows in self._groups.values() for r in rows.requests if r.adapter}

    # ------------------------------------------------------------------ the worker
    def _work(self) -> None:
        while not self._stop.is_set():
            if not self._groups and not self._held and self._waiting.empty():
                with self.lock:
                    self.after_step(set())
                self._wake.wait(0.1)
                self._wake.clear()
                continue
            try:
                with self.lock, torch.inference_mode():
                    self._admit()
                    self._decode()
                    self.after_step(self.adapters_in_use())
            except Exception as error:  # noqa: BLE001 - every row in flight hears of it
                self._fail_all(error)

    def _admit(self) -> None:
        while True:
            try:
                self._held.append(self._waiting.get_nowait())
            except queue.Empty:
                break
        joining, tokens = [], 0
        room = self.settings.max_batch - self.running()
        while self._held and len(joining) < room:
            request = self._held[0]
            if joining and tokens + len(request.prompt) > self.settings.prefill_tokens:
                break
            self._held.pop(0)
            if request.cancelled.is_set():
                _finish(request, "cancelled", "")
                continue
            try:
                self.prepare(self.adapters_in_use() | {r.adapter for r in joining if r.adapter},
                             request.adapter)  # fmt: skip
            except Exception as error:  # noqa: BLE001 - this request's adapter failed to load
                request.send(error)
                continue
            joining.append(request)
            tokens += len(request.prompt)
        self.hooks.on_queue(self.waiting())
        for key, requests in self._grouped(joining).items():
            new = self._prefill(requests)
            self._groups[key] = _joined(self._groups.get(key), new)

    def _grouped(self, requests: list[Generation]) -> dict[str | None, list[Generation]]:
        groups: dict[str | None, list[Generation]] = {}
        for request in requests:
            groups.setdefault(self._key(request), []).append(request)
        return groups

    def _key(self, request: Generation) -> str | None:
        return request.adapter if not self.settings.mixed else "all"

    def _prefill(self, requests: list[Generation]) -> _Rows:
        longest = max(len(r.prompt) for r in requests)
        ids = torch.full((len(requests), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(requests), longest), dtype=torch.long)
        for row, request in enumerate(requests):
            ids[row, longest - len(request.prompt) :] = torch.tensor(request.prompt)
            mask[row, longest - len(request.prompt) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = self._forward(requests, ids, mask, positions, cache)
        rows = _Rows(
            requests, cache, mask, mask.sum(-1), torch.zeros(len(requests), dtype=torch.long)
        )
        self._pick(rows, logits)
        return rows

    def _decode(self) -> None:
        for key in list(self._groups):
            rows = self._groups[key]
            if rows.requests:
                rows.mask = F.pad(rows.mask, (0, 1), value=1)
                logits = self._forward(
                    rows.requests,
                    rows.last[:, None],
                    rows.mask,
                    rows.positions[:, None],
                    rows.cache,
                )
                rows.positions += 1
                self._pick(rows, logits)
            remaining = _without_finished(rows)
            if remaining is None:
                del self._groups[key]
            else:
                self._groups[key] = remaining
        self.hooks.on_step(self.running())

    def _forward(self, requests, ids, mask, positions, cache) -> torch.Tensor:
        device = self.model.device
        with self.mixed_batch.rows(self.model, [r.adapter for r in requests]):
            out = self.model(
                input_ids=ids.to(device), attention_mask=mask.to(device),
                position_ids=positions.to(device), cache=cache, use_cache=True, logits_to_keep=1,
            )  # fmt: skip
        return out.logits[:, -1].float().cpu()

    def _pick(self, rows: _Rows, logits: torch.Tensor) -> None:
        """Each row's next token: sampled or greedy, sent on as text, the row finished when due."""
        for row, request in enumerate(rows.requests):
            token = _next_token(logits[row], request)
            rows.last[row] = token
            if request.first_token_at is None:
                request.first_token_at = time.perf_counter()
                self.hooks.on_first_token(request)
            if request.done or request.cancelled.is_set():  # done at its prefill: no more
                continue
            _accept(request, token, self.decode)
            self.hooks.on_token(request)

    def _fail_all(self, error: Exception) -> None:
        for rows in self._groups.values():
            for request in rows.requests:
                request.send(error)
        self._groups.clear()


def _next_token(logits: torch.Tensor, request: Generation) -> int:
    sampling = request.sampling
    if sampling.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p < 1:  # the smallest set of tokens whose probability reaches top_p
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= sampling.top_p
        probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0))
    return int(torch.multinomial(probs, 1, generator=request.generator))


def _accept(request: Generation, token: int, decode: Callable[[list[int]], str]) -> None:
    """Adds ``token`` to the request and sends the text that is now certain; finishes it when it
    hit a stop token, a stop string or its length."""
    sampling = request.sampling
    if token in request.stop_ids:
        return _finish(request, "stop", decode(request.tokens))
    request.tokens.append(token)
    text = decode(request.tokens)
    for stop in sampling.stop:
        at = text.find(stop)
        if at >= 0:
            return _finish(request, "stop", text[:at])
    if len(request.tokens) >= sampling.max_tokens:
        return _finish(request, "length", text)
    held = _held_back(text, sampling.stop)
    if held > len(request.sent):
        request.send(Delta(text[len(request.sent) : held]))
        request.sent = text[:held]


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How much of ``text`` can go out now: not a character that is still being decoded (U+FFFD at
    the end: a token split inside a UTF-8 sequence), not a tail that may begin a stop string."""
    end = len(text.rstrip("\ufffd"))
    for stop in stops:
        for n in range(min(len(stop) - 1, end), 0, -1):
            if text[end - n : end] == stop[:n]:
                end -= n
                break
    return end


def _finish(request: Generation, reason: str, text: str) -> None:
    if len(text) > len(request.sent):
        request.send(Delta(text[len(request.sent) :]))
        request.sent = text
    request.send(Finished(reason, len(request.prompt), len(request.tokens)))
    request.done = True


def _without_finished(rows: _Rows) -> _Rows | None:
    """The batch without its finished and cancelled rows (None when none is left), its cache cut
    to the columns the remaining rows use."""
    for request in rows.requests:
        if request.cancelled.is_set() and not request.done:
            _finish(request, "cancelled", request.sent)  # its consumer stops waiting
    keep = [i for i, request in enumerate(rows.requests) if not request.done]
    if not keep:
        return None
    if len(keep) < len(rows.requests):
        index = torch.tensor(keep)
        rows.requests = [rows.requests[i] for i in keep]
        rows.cache.batch_select_indices(index.to(_cache_device(rows.cache)))
        rows.mask, rows.positions, rows.last = (
            rows.mask[index],
            rows.positions[index],
            rows.last[index],
        )
    unused = int((rows.mask.sum(0) == 0).cumprod(0).sum())  # leading columns all padding
    if unused:
        rows.mask = rows.mask[:, unused:]
        for layer in rows.cache.layers:
            layer.keys, layer.values = layer.keys[..., unused:, :], layer.values[..., unused:, :]
    return rows


def _joined(running: _Rows | None, new: _Rows) -> _Rows:
    """One batch of both: the shorter cache padded on the left to the longer's length."""
    if running is None:
        return new
    length = max(running.mask.shape[1], new.mask.shape[1])
    for rows in (running, new):
        pad = length - rows.mask.shape[1]
        if pad:
            rows.mask = F.pad(rows.mask, (pad, 0))
            for layer in rows.cache.layers:
                layer.keys = F.pad(layer.keys, (0, 0, pad, 0))
                layer.values = F.pad(layer.values, (0, 0, pad, 0))
    for mine, theirs in zip(running.cache.layers, new.cache.layers, strict=True):
        mine.keys = torch.cat([mine.keys, theirs.keys])
        mine.values = torch.cat([mine.values, theirs.values])
    return _Rows(
        running.requests + new.requests,
        running.cache,
        torch.cat([running.mask, new.mask]),
        torch.cat([running.positions, new.positions]),
        torch.cat([running.last, new.last]),
    )


def _cache_device(cache: DynamicCache) -> torch.device:
    return cache.layers[0].keys.device
