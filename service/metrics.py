"""Prometheus metrics of one app instance (`ServiceMetrics`) or one `recsys stream-worker` process
(`WorkerMetrics`, the part a stream worker feeds). Each has its own registry: two apps in a process never
share counters.

Multiprocess mode (`recsys serve --workers N`): `service.serve` hands the workers a private, empty
PROMETHEUS_MULTIPROC_DIR before they start, so prometheus_client keeps every value in per-process files
there and `render` merges the files of all workers (`MultiProcessCollector`): one scrape of any worker gives
the sums. Each gauge says how processes combine (`multiprocess_mode`); a `live*` gauge of a process that
died is dropped at the next scrape. The process and GC collectors describe the one process that answers, so
they are registered in single-process mode only.
"""

from __future__ import annotations

import os
import re
import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
    values,
)

# Latency buckets around the 20 ms p99 target, fine below it.
_LATENCY_BUCKETS = (0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> str | None:
    """The folder this process's metric values live in, or None (single-process mode). prometheus_client
    chooses its value store when it is first imported; the folder counts only if that choice was made."""
    if getattr(values.ValueClass, "_multiprocess", False):
        return os.environ.get(MULTIPROC_ENV)
    return None


class WorkerMetrics:
    """What a stream worker reports: events applied, duplicates, rejections, Redis failures, the backlog,
    its last completed read and the model version it applies."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.multiproc_dir = multiprocess_dir()
        if self.multiproc_dir is None:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)
        self.events_applied = Counter("recsys_events_applied", "events applied to user state", registry=r)
        self.events_duplicate = Counter("recsys_events_duplicate", "events already applied (no-ops)", registry=r)
        self.events_rejected = Counter(
            "recsys_events_rejected", "events not applied, by reason", ["reason"], registry=r)
        self.state_store_errors = Counter(
            "recsys_state_store_errors", "Redis failures by operation", ["op"], registry=r)
        # Measured from Redis by the process that answers the scrape: the newest measurement is the answer.
        self.stream_backlog = Gauge(
            "recsys_stream_backlog", "stream entries not yet applied (pending + not yet delivered, summed over "
            "partitions), measured at this scrape", registry=r, multiprocess_mode="livemostrecent")
        self.worker_last_read: Gauge | None = None  # created by the first read: only processes with a worker
        self.model_info = Gauge("recsys_model_info", "1 for the model version being served", ["version"],
                                registry=r, multiprocess_mode="livemax")

    def set_model(self, version: str, previous: str | None) -> None:
        if previous is not None and previous != version:
            # In multiprocess mode `remove` leaves the value in this process's file: zero it first, so
            # the version no live process serves reads 0 (max over processes).
            self.model_info.labels(previous).set(0)
            self.model_info.remove(previous)
        self.model_info.labels(version).set(1)

    def count_batch(self, stats) -> None:
        """`StreamWorker(on_batch=...)`: one completed read (service.stream.WorkerStats)."""
        self.events_applied.inc(stats.applied)
        self.events_duplicate.inc(stats.duplicates)
        if stats.outside_cap:
            self.events_rejected.labels("outside_cap").inc(stats.outside_cap)
        for reason, n in stats.rejected.items():
            self.events_rejected.labels(reason).inc(n)
        if self.worker_last_read is None:
            # One series per process (label pid in multiprocess mode): `min` over them finds a stuck worker.
            self.worker_last_read = Gauge(
                "recsys_stream_worker_last_read_timestamp_seconds", "Unix time at which this process's stream "
                "worker last completed a read (a batch, or an empty read when idle)", registry=self.registry,
                multiprocess_mode="liveall")
        self.worker_last_read.set(time.time())

    def render(self) -> bytes:
        if self.multiproc_dir is None:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        _forget_dead_processes(self.multiproc_dir)
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged, path=self.multiproc_dir)
        return generate_latest(merged)

    def close(self) -> None:
        """At process exit: this process's live gauges leave the scrape."""
        if self.multiproc_dir is not None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(os.getpid(), self.multiproc_dir)


_LIVE_GAUGE_FILE = re.compile(r"gauge_live\w+?_(\d+)\.db")


def _forget_dead_processes(path: str) -> None:
    """Drop the live gauges of worker processes that are gone (a crashed worker never called `close`;
    uvicorn starts a replacement with another pid). Counters and histograms of dead workers stay: sums
    must not go backwards."""
    from prometheus_client import multiprocess

    pids = {int(m.group(1)) for m in map(_LIVE_GAUGE_FILE.fullmatch, os.listdir(path)) if m}
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            multiprocess.mark_process_dead(pid, path)
        except PermissionError:
            pass  # alive, another user's


class ServiceMetrics(WorkerMetrics):
    """Everything one app instance reports: HTTP, scoring, ingest, and its embedded stream worker."""

    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self.request_seconds = Histogram(
            "recsys_http_request_seconds", "HTTP request latency by route", ["method", "route", "status"],
            buckets=_LATENCY_BUCKETS, registry=r)
        self.score_seconds = Histogram(
            "recsys_score_batch_seconds", "state fetch + forward of one micro-batch", buckets=_LATENCY_BUCKETS,
            registry=r)
        self.score_batch_requests = Histogram(
            "recsys_score_batch_requests", "requests per micro-batch", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.scores_served = Counter("recsys_scores_served", "candidates scored", registry=r)
        self.lent_chunks = Counter(
            "recsys_score_lent_chunks", "chunks of the calls an idle core was lent to (http.lend_idle_core), by "
            "kernel (search, gather) and by the thread that took them: the lent core, or the batch's own",
            ["kernel", "by"], registry=r)
        self.cold_users = Counter("recsys_score_cold_users", "score requests for users with no history", registry=r)
        self.score_path = Counter(
            "recsys_score_path", "score requests by the path that answered them: index (the block index's summaries "
            "and the blocks they left) or whole (the whole stored sequence)", ["path"], registry=r)
        self.score_redis_bytes = Counter(
            "recsys_score_redis_bytes", "bytes score requests read from Redis (sequence, index, state)", registry=r)
        self.memory_source = Counter(
            "recsys_score_memory", "score requests of a memory model by where the user's memory came from "
            "(stored, rebuilt in the request, empty)", ["source"], registry=r)
        self.oov_ids = Counter(
            "recsys_score_oov_ids", "candidate ids the served model's vocabulary does not know (scored with the "
            "out-of-vocabulary row), by field (item, category)", ["field"], registry=r)
        self.events_ingested = Counter("recsys_events_ingested", "events accepted into the stream", registry=r)
        self.events_throttled = Counter(
            "recsys_events_throttled", "events refused with 429 because the stream backlog reached "
            "stream.max_backlog", registry=r)
        self.users_erased = Counter("recsys_users_erased", "DELETE /v1/users/{id} answered (idempotent: repeats "
                                    "count)", registry=r)

    def count_lent(self, kernel: str, lent: int, here: int) -> None:
        """`CoreLender(on_call=...)`: the chunks of one call an idle core was lent to, by the thread that took them."""
        self.lent_chunks.labels(kernel, "lent").inc(lent)
        self.lent_chunks.labels(kernel, "batch").inc(here)
