"""GET /v1/users/{user_id}: a user's stored state, summarised."""

import asyncio

import redis
from fastapi import APIRouter, Path as PathParam

from service import schemas
from service.routes.deps import RuntimeDep, unavailable


def router() -> APIRouter:
    r = APIRouter()

    @r.get("/v1/users/{user_id}", response_model=schemas.UserResponse, responses=schemas.error_responses(503))
    async def user(runtime: RuntimeDep, user_id: int = PathParam(ge=0, le=schemas.MAX_ID)):
        try:
            s = await asyncio.to_thread(runtime.store.summary, user_id)
        except redis.RedisError as e:
            raise unavailable(runtime, "summary", e) from None
        version = None if runtime.scorer is None else runtime.scorer.version
        return {"user_id": user_id, "history_length": s.history_len, "last_event_ts": s.last_event_ts,
                "last_applied_event_id": s.last_event_id,
                "state_version": version if version in s.state_versions else None,
                "state_rev": s.rev if version in s.state_versions else None, "rev": s.rev}

    return r
