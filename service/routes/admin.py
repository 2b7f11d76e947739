"""POST /v1/admin/reload: load another bundle and, unless told not to, rebuild every user's state for it
first (capped by rebuild_max_users; beyond that the rebuild job does it offline); then publish it, so every
other serving process and stream worker switches too (service.model_sync)."""

import asyncio
from pathlib import Path

import redis
from fastapi import APIRouter, Depends, HTTPException

from service import schemas
from service.model_state import ModelStateUpdater, ServingModel
from service.routes.deps import RuntimeDep, invalid, require_api_key, unavailable


def router() -> APIRouter:
    r = APIRouter()

    @r.post("/v1/admin/reload", response_model=schemas.ReloadResponse, dependencies=[Depends(require_api_key)],
            responses=schemas.error_responses(401, 403, 409, 503))
    async def reload(req: schemas.ReloadRequest, runtime: RuntimeDep):
        max_users = runtime.config.rebuild_max_users
        path = Path(req.bundle)
        if not path.is_dir():
            raise invalid(("body", "bundle"), f"{req.bundle!r} is not a directory on the server")
        async with runtime.reload_lock:
            try:
                model = await asyncio.to_thread(ServingModel.from_bundle, path)
            except Exception as e:  # noqa: BLE001 - a broken bundle is the caller's input
                raise invalid(("body", "bundle"), f"cannot load {req.bundle!r}: {e}") from None
            rebuilt = 0
            if req.rebuild:
                try:
                    users = await asyncio.to_thread(runtime.user_ids, max_users)
                    if users is None:
                        raise HTTPException(409, f"rebuild: more than {max_users} users; run the "
                                                 "rebuild job, then reload with rebuild: false")
                    rebuilt = await asyncio.to_thread(runtime.bulk_store.rebuild, ModelStateUpdater(model), users)
                except redis.RedisError as e:
                    raise unavailable(runtime, "rebuild", e) from None
            try:  # every other process (uvicorn workers, replicas, stream workers) follows (model_sync)
                await asyncio.to_thread(runtime.sync.publish, str(path.resolve()), model.version)
            except redis.RedisError as e:
                raise unavailable(runtime, "publish", e) from None
            runtime.desired_version = model.version
            previous = None if runtime.scorer is None else runtime.scorer.version
            await asyncio.to_thread(runtime.set_model, model)  # may start the worker: Redis calls
        return {"model_version": model.version, "previous_version": previous, "rebuilt_users": rebuilt}

    return r
