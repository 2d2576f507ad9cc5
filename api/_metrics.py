"""Prometheus metrics of one shim.

Each app owns its registry, so two apps in one process (tests, a shim beside a node)
never mix their counts. Labels stay low-cardinality: routes are route templates (an
unknown path counts as `unmatched`), models are the ones the engine actually served.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

FIRST_TOKEN_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST
"""The media type of `render()`'s output."""


class Metrics:
    """Request counts, in-flight requests, tokens generated and time to first token."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "dbloom_shim_requests",
            "HTTP requests answered, by route template and status (499: client left first).",
            ["route", "status"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "dbloom_shim_requests_in_flight",
            "HTTP requests being handled now.",
            registry=self.registry,
        )
        self.tokens = Counter(
            "dbloom_shim_generated_tokens",
            "Completion tokens generated for clients, by model.",
            ["model"],
            registry=self.registry,
        )
        self.first_token = Histogram(
            "dbloom_shim_time_to_first_token_seconds",
            "From sending a request to the engine to its first chunk (or its final).",
            buckets=FIRST_TOKEN_BUCKETS,
            registry=self.registry,
        )

    def render(self) -> bytes:
        """The text exposition format, for `GET /metrics`."""
        return generate_latest(self.registry)
