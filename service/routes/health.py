"""GET /healthz (the process answers), /readyz (state store reachable, a model loaded, the event stream
keeping up), /metrics (Prometheus)."""

import asyncio
import logging

import redis
from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from service import schemas
from service.routes.deps import RuntimeDep

log = logging.getLogger("recsys.service")


def router() -> APIRouter:
    r = APIRouter()

    @r.get("/healthz", response_model=schemas.Health)
    async def healthz():
        return {"status": "ok"}

    @r.get("/readyz", response_model=schemas.Health, responses={503: {"model": schemas.Health}})
    async def readyz(runtime: RuntimeDep):
        version = None if runtime.scorer is None else runtime.scorer.version
        try:
            await asyncio.to_thread(runtime.request_redis.ping)
            problem = None if version is None else await asyncio.to_thread(runtime.stream_problem)
        except redis.RedisError as e:
            runtime.metrics.state_store_errors.labels("ping").inc()
            return JSONResponse({"status": "unavailable", "model_version": version,
                                 "detail": f"state store unreachable ({type(e).__name__})"}, status_code=503)
        if version is None:
            return JSONResponse({"status": "unavailable", "detail": "no model loaded"}, status_code=503)
        if problem is not None:
            return JSONResponse({"status": "unavailable", "model_version": version,
                                 "desired_version": runtime.desired_version, "detail": problem}, status_code=503)
        return {"status": "ready", "model_version": version, "desired_version": runtime.desired_version}

    @r.get("/metrics", response_class=Response)
    async def metrics(runtime: RuntimeDep):
        try:
            await asyncio.to_thread(runtime.measure_backlog)
        except redis.RedisError as e:  # the rest of the scrape still answers; the gauge says "unknown"
            runtime.metrics.state_store_errors.labels("backlog").inc()
            runtime.metrics.stream_backlog.set(float("nan"))
            log.warning("stream backlog for /metrics: %s", e)
        return Response(await asyncio.to_thread(runtime.metrics.render), media_type=runtime.metrics.content_type)

    return r
