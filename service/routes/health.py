"""GET /healthz (the process answers), /readyz (state store reachable and a model loaded), /metrics
(Prometheus)."""

import asyncio

import redis
from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from service import schemas
from service.routes.deps import RuntimeDep


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
        except redis.RedisError as e:
            runtime.metrics.state_store_errors.labels("ping").inc()
            return JSONResponse({"status": "unavailable", "model_version": version,
                                 "detail": f"state store unreachable ({type(e).__name__})"}, status_code=503)
        if version is None:
            return JSONResponse({"status": "unavailable", "detail": "no model loaded"}, status_code=503)
        return {"status": "ready", "model_version": version, "desired_version": runtime.desired_version}

    @r.get("/metrics", response_class=Response)
    async def metrics(runtime: RuntimeDep):
        return Response(runtime.metrics.render(), media_type=runtime.metrics.content_type)

    return r
