"""The server's metrics in Prometheus' text format (prometheus_client), and a count of XLA
compilations (jax.monitoring) that proves none happens after warm-up."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Sequence

import jax
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from softprompt_jax.serving.batcher import BatchStats

CONTENT_TYPE = CONTENT_TYPE_LATEST
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
RATE_WINDOW = 10.0  # seconds of history behind examples/s


class CompileCounter:
    """XLA programs compiled in this process since it was made (a program loaded from the
    persistent compilation cache counts too: each is one backend-compile event)."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **kwargs) -> None:
        if event == BACKEND_COMPILE_EVENT:
            with self._lock:
                self.count += 1

    def close(self) -> None:
        jax.monitoring.unregister_event_duration_listener(self._on_event)


class _Rate:
    """Events per second over the last `RATE_WINDOW` seconds."""

    def __init__(self) -> None:
        self._events: collections.deque[tuple[float, int]] = collections.deque()

    def add(self, n: int) -> None:
        self._events.append((time.monotonic(), n))

    def __call__(self) -> float:
        now = time.monotonic()
        while self._events and self._events[0][0] < now - RATE_WINDOW:
            self._events.popleft()
        return sum(n for _, n in self._events) / RATE_WINDOW


class ServeMetrics:
    """Requests, errors, latency, batch sizes, queue time and length, requests refused for a
    full queue, examples/s, compiles, prompts."""

    def __init__(
        self,
        batch_sizes: Sequence[int],
        compiles: CompileCounter,
        programs: int,
        prompts: Callable[[], int],
        queued_rows: Callable[[], int],
    ) -> None:
        self.registry = registry = CollectorRegistry()
        by_endpoint = ["endpoint", "status"]
        self.requests = Counter(
            "softprompt_requests", "HTTP requests answered", by_endpoint, registry=registry
        )
        self.errors = Counter(
            "softprompt_request_errors",
            "HTTP requests answered with an error (status >= 400)",
            by_endpoint,
            registry=registry,
        )
        self.latency = Histogram(
            "softprompt_request_latency_seconds",
            "time from a request's arrival to its answer",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "softprompt_batch_size",
            "rows per batch, before padding to a compiled batch size",
            buckets=tuple(sorted(batch_sizes)),
            registry=registry,
        )
        self.queue = Histogram(
            "softprompt_queue_seconds",
            "a row's wait from its request's arrival to the start of its batch",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_seconds = Histogram(
            "softprompt_batch_seconds",
            "compute time of one batch",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_full = Counter(
            "softprompt_queue_full",
            "requests refused with 503 because SERVE_MAX_QUEUED_ROWS rows were queued",
            ["endpoint"],
            registry=registry,
        )
        Gauge("softprompt_queued_rows", "rows waiting for a batch", registry=registry).set_function(
            queued_rows
        )
        self.examples = Counter(
            "softprompt_examples",
            "rows computed (inputs, or input-candidate pairs)",
            registry=registry,
        )
        self._rate = _Rate()
        Gauge(
            "softprompt_examples_per_second",
            f"rows computed per second over the last {RATE_WINDOW:g} s",
            registry=registry,
        ).set_function(self._rate)
        Gauge(
            "softprompt_xla_compiles",
            "XLA programs compiled by this process since start-up (constant after warm-up)",
            registry=registry,
        ).set_function(lambda: compiles.count)
        Gauge("softprompt_programs", "programs compiled at warm-up", registry=registry).set(
            programs
        )
        Gauge("softprompt_prompts", "prompts in the bank", registry=registry).set_function(prompts)

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        if status >= 400:
            self.errors.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def observe_batch(self, stats: BatchStats) -> None:
        self.batch_size.observe(stats.size)
        for seconds in stats.queue_seconds:
            self.queue.observe(seconds)
        self.batch_seconds.observe(stats.run_seconds)
        self.examples.inc(stats.size)
        self._rate.add(stats.size)

    def render(self) -> bytes:
        return generate_latest(self.registry)
