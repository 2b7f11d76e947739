"""Prometheus metrics of one app instance (its own registry: two apps in a process never share counters)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Latency buckets around the 20 ms p99 target, fine below it.
_LATENCY_BUCKETS = (0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServiceMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.request_seconds = Histogram(
            "recsys_http_request_seconds", "HTTP request latency by route", ["method", "route", "status"],
            buckets=_LATENCY_BUCKETS, registry=r)
        self.score_seconds = Histogram(
            "recsys_score_batch_seconds", "state fetch + forward of one micro-batch", buckets=_LATENCY_BUCKETS,
            registry=r)
        self.score_batch_requests = Histogram(
            "recsys_score_batch_requests", "requests per micro-batch", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.scores_served = Counter("recsys_scores_served", "candidates scored", registry=r)
        self.cold_users = Counter("recsys_score_cold_users", "score requests for users with no history", registry=r)
        self.memory_source = Counter(
            "recsys_score_memory", "score requests of a memory model by where the user's memory came from "
            "(stored, rebuilt in the request, empty)", ["source"], registry=r)
        self.oov_ids = Counter(
            "recsys_score_oov_ids", "candidate ids the served model's vocabulary does not know (scored with the "
            "out-of-vocabulary row), by field (item, category)", ["field"], registry=r)
        self.events_ingested = Counter("recsys_events_ingested", "events accepted into the stream", registry=r)
        self.events_applied = Counter("recsys_events_applied", "events applied to user state", registry=r)
        self.events_duplicate = Counter("recsys_events_duplicate", "events already applied (no-ops)", registry=r)
        self.events_throttled = Counter(
            "recsys_events_throttled", "events refused with 429 because the stream backlog reached "
            "stream.max_backlog", registry=r)
        self.stream_backlog = Gauge(
            "recsys_stream_backlog", "stream entries seen by the last /v1/events (not yet applied, plus those "
            "applied within about a second; measured when stream.max_backlog is set)", registry=r)
        self.events_rejected = Counter(
            "recsys_events_rejected", "events not applied, by reason", ["reason"], registry=r)
        self.users_erased = Counter("recsys_users_erased", "DELETE /v1/users/{id} answered (idempotent: repeats "
                                    "count)", registry=r)
        self.state_store_errors = Counter(
            "recsys_state_store_errors", "Redis failures by operation", ["op"], registry=r)
        self.model_info = Gauge("recsys_model_info", "1 for the model version being served", ["version"], registry=r)

    def set_model(self, version: str, previous: str | None) -> None:
        if previous is not None:
            self.model_info.remove(previous)
        self.model_info.labels(version).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
