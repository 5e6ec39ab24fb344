"""Micro-batching: requests that arrive together run together.

One worker thread owns inference. It takes the first waiting request, waits up to `window`
seconds for more (until `max_texts` texts are queued), groups them by adapter, and runs each
group as one call of `AdapterRegistry.predict` (one `set_adapter`, the texts batched). Each
request's future gets its own rows back. When a group fails, its requests run again one by one,
so an error reaches only the request that caused it (and every request, when the adapter is the
cause: it was unloaded meanwhile).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import defaultdict
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from .errors import ServeError
from .registry import AdapterInfo, AdapterRegistry


@dataclass
class _Job:
    adapter: str
    texts: list[str]
    future: Future = field(default_factory=Future)


class MicroBatcher:
    """Queues predict requests and runs them, grouped by adapter, in one worker thread."""

    def __init__(self, registry: AdapterRegistry, window: float = 0.005, max_texts: int = 256):
        self.registry = registry
        self.window = window
        self.max_texts = max_texts
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="lorakit-batcher", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def submit(self, adapter: str, texts: list[str]) -> Future:
        """A future of (AdapterInfo, probabilities with one row per text)."""
        if self._thread is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        job = _Job(adapter, list(texts))
        self._queue.put(job)
        return job.future

    def _work(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs, stopping = self._collect(first)
            self._run(jobs)
            if stopping:
                return

    def _collect(self, first: _Job) -> tuple[list[_Job], bool]:
        jobs, count = [first], len(first.texts)
        deadline = time.monotonic() + self.window
        while count < self.max_texts:
            remaining = deadline - time.monotonic()
            try:
                job = (
                    self._queue.get(timeout=remaining)
                    if remaining > 0
                    else self._queue.get_nowait()
                )
            except queue.Empty:
                break
            if job is None:
                return jobs, True
            jobs.append(job)
            count += len(job.texts)
        return jobs, False

    def _run(self, jobs: list[_Job]) -> None:
        groups: dict[str, list[_Job]] = defaultdict(list)
        for job in jobs:
            if job.future.set_running_or_notify_cancel():
                groups[job.adapter].append(job)
        for adapter, group in groups.items():
            self._run_group(adapter, group)

    def _run_group(self, adapter: str, group: list[_Job]) -> None:
        texts = [text for job in group for text in job.texts]
        try:
            info, probs = self.registry.predict(adapter, texts)
        except Exception as error:
            if len(group) > 1 and not isinstance(error, ServeError):
                for job in group:  # one request broke the batch: each runs alone, fails alone
                    self._run_group(adapter, [job])
            else:  # a ServeError is the adapter's (unloaded meanwhile): the group's
                for job in group:
                    job.future.set_exception(error)
            return
        self._deliver(group, info, probs)

    @staticmethod
    def _deliver(group: list[_Job], info: AdapterInfo, probs: np.ndarray) -> None:
        start = 0
        for job in group:
            job.future.set_result((info, probs[start : start + len(job.texts)]))
            start += len(job.texts)
