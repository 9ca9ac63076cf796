"""Prometheus metrics for the Letta plugin (optional: import this module only where prometheus_client is installed;
livekit-agents installs it).

    from livekit.plugins.letta.metrics import LettaMetrics
    metrics = LettaMetrics()            # once per process (collectors register once per registry)
    LettaSessions(client, options, metrics=metrics)

Under LiveKit Agents each job runs in its own process: run the worker in prometheus_client's multiprocess mode
(``livekit.plugins.session_guard.server.SessionGuardServer(prometheus_port=...)`` does it) so the worker's ``/metrics``
sums every job process.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

__all__ = ["OPERATIONS", "REQUEST_BUCKETS", "LettaMetrics"]

OPERATIONS = (
    "turn",
    "conversation_create",
    "conversation_delete",
    "conversation_recompile",
    "conversations_probe",
    "blocks_list",
    "agent_retrieve",
    "agent_reset",
    "run_cancel",
    "run_retrieve",
    "messages_list",
    "passage_create",
    "health",
)
"""The `operation` label's values (a request the plugin did not name is `other`)."""

REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 60.0)


class LettaMetrics:
    """A ``LettaMetricsSink`` as Prometheus collectors, registered in ``registry`` (prometheus_client's default
    registry unless given; None: not registered, e.g. in a job process of a multiprocess worker where the files are
    what is read)."""

    def __init__(self, *, registry: CollectorRegistry | None = REGISTRY, namespace: str = "letta") -> None:
        self.request_seconds = Histogram(
            f"{namespace}_request_duration_seconds",
            "Letta requests by operation: seconds until answered or failed (turn: the whole streamed reply)",
            ["operation"],
            buckets=REQUEST_BUCKETS,
            registry=registry,
        )
        self.request_errors = Counter(
            f"{namespace}_request_errors",
            "Letta requests that failed, by operation and kind (unavailable, timeout, config, turn, http_<status>)",
            ["operation", "kind"],
            registry=registry,
        )
        self.first_token_seconds = Histogram(
            f"{namespace}_turn_first_token_seconds",
            "Seconds from a turn's start to its first spoken token",
            buckets=REQUEST_BUCKETS,
            registry=registry,
        )

    def request_finished(self, operation: str, seconds: float, error: str | None) -> None:
        self.request_seconds.labels(operation=operation).observe(seconds)
        if error is not None:
            self.request_errors.labels(operation=operation, kind=error).inc()

    def turn_first_token(self, seconds: float) -> None:
        self.first_token_seconds.observe(seconds)
