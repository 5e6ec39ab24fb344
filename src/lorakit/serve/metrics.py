"""The generation server's Prometheus metrics (`GET /metrics`, text format, prometheus-client).

Each app has a registry of its own, so two servers in one process (tests) never share counts.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .decoding import Generation, StepHooks

CONTENT_TYPE = CONTENT_TYPE_LATEST


class GenerationMetrics:
    """Requests and tokens by model (the base or an adapter), the queue, the batch, time to first
    token and the adapter cache."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "lorakit_requests", "Generation requests received, by model and endpoint",
            ["model", "endpoint"], registry=self.registry,
        )  # fmt: skip
        self.tokens = Counter(
            "lorakit_generated_tokens", "Tokens generated, by model", ["model"],
            registry=self.registry,
        )  # fmt: skip
        self.queue = Gauge("lorakit_queue_length", "Requests waiting to join the batch",
                           registry=self.registry)  # fmt: skip
        self.running = Gauge("lorakit_running_requests", "Requests decoding in the batch",
                             registry=self.registry)  # fmt: skip
        self.batch = Histogram(
            "lorakit_batch_size", "Rows per decoding step", registry=self.registry,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )  # fmt: skip
        self.first_token = Histogram(
            "lorakit_time_to_first_token_seconds", "From a request's arrival to its first token",
            registry=self.registry,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )  # fmt: skip
        self.evictions = Counter(
            "lorakit_adapter_evictions", "Adapters taken off the model to make room, by model",
            ["model"], registry=self.registry,
        )  # fmt: skip

    def hooks(self, base_name: str) -> StepHooks:
        def model_of(request: Generation) -> str:
            return request.adapter or base_name

        def on_step(rows: int) -> None:
            self.running.set(rows)
            if rows:
                self.batch.observe(rows)

        def on_first_token(request: Generation) -> None:
            self.first_token.observe(time.perf_counter() - request.created)

        return StepHooks(
            on_step=on_step,
            on_first_token=on_first_token,
            on_token=lambda request: self.tokens.labels(model_of(request)).inc(),
            on_queue=self.queue.set,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
