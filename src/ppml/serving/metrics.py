"""Prometheus metrics of the serving front end (and of workers, which observe batch sizes).

Each `ServingMetrics` owns its own `CollectorRegistry`, so several apps (tests, a front end and
a worker in one process) never collide in the global registry. Labels are bounded: a route is
its template (``/v1/requests/{request_id}``), never the raw path, and an error is one of the
fixed reason codes of the front end, never text taken from a request.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

__all__ = ["CONTENT_TYPE", "ServingMetrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST

_log = logging.getLogger("ppml.serving")

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ServingMetrics:
    """The counters, histograms and gauges of one serving deployment, in a private registry."""

    def __init__(self, *, namespace: str = "ppml_serving") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ours: dict[str, Any] = {"namespace": namespace, "registry": self.registry}
        self.requests = Counter(
            "requests", "HTTP requests answered, by route template and status code.",
            ["route", "status"], **ours,
        )  # fmt: skip
        self.latency = Histogram(
            "request_seconds", "Time to answer an HTTP request, by route template.",
            ["route"], buckets=_LATENCY_BUCKETS, **ours,
        )  # fmt: skip
        self.errors = Counter(
            "errors", "Refusals and failures, by reason code.", ["reason"], **ours
        )
        self.instances = Counter("instances", "Instances accepted into the queue.", **ours)
        self.batch_size = Histogram(
            "batch_size", "Instances per model invocation (observed by workers).",
            buckets=_BATCH_BUCKETS, **ours,
        )  # fmt: skip
        self.queue_depth = Gauge(
            "queue_depth",
            "Requests accepted and not yet answered (NaN when the queue cannot be reached).",
            **ours,
        )

    def track_queue_depth(self, depth: Callable[[], int]) -> None:
        """Read the queue depth at every scrape. A failing queue reads as NaN, not as a failed
        scrape: the other metrics are what an operator needs when the queue is down."""

        def read() -> float:
            try:
                return float(depth())
            except Exception as exc:  # any backend failure; the scrape must still answer
                _log.warning("queue depth unavailable: %s", type(exc).__name__)
                return math.nan

        self.queue_depth.set_function(read)

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route=route, status=str(status)).inc()
        self.latency.labels(route=route).observe(seconds)

    def observe_error(self, reason: str) -> None:
        self.errors.labels(reason=reason).inc()

    def observe_batch(self, size: int) -> None:
        """The hook for workers: one call per model invocation with its number of instances."""
        self.batch_size.observe(size)

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)
