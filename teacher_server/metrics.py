"""Prometheus metrics, on a registry per app so several servers can live in one process (tests)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

disable_created_metrics()

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("trb_teacher_requests", "Requests by route, client and status.",
                                ["route", "client", "status"], registry=r)
        self.errors = Counter("trb_teacher_errors", "Error responses by route, client and code.",
                              ["route", "client", "code"], registry=r)
        self.tokens_scored = Counter("trb_teacher_tokens_scored", "Tokens run through the model.",
                                     ["client"], registry=r)
        self.model_seconds = Counter("trb_teacher_model_seconds", "Model time used, by client: the currency "
                                     "of the scheduler's fair shares.", ["client"], registry=r)
        self.latency = Histogram("trb_teacher_request_seconds", "Request latency by route.", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("trb_teacher_queue_depth", "Jobs waiting for the model.", registry=r)
        self.active_sessions = Gauge("trb_teacher_active_sessions", "Open decoding sessions.", registry=r)
        self.quarantined = Gauge("trb_teacher_quarantined_requests", "Requests quarantined so far: each "
                                 "crashed the model twice and is refused (422 quarantined) for a while.", registry=r)
        self.restarts = Gauge("trb_teacher_worker_restarts", "Model workers restarted so far (died or hung).",
                              registry=r)
        self.busy = Gauge("trb_teacher_model_busy", "1 while a model call runs (stuck at 1: a hung forward).",
                          registry=r)
        self.hung = Gauge("trb_teacher_worker_hung", "Model workers killed by the watchdog so far.", registry=r)
        self.cache_bytes = Gauge("trb_teacher_session_cache_bytes", "Bytes held by session KV caches.",
                                 registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
