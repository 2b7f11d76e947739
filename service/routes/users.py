"""GET /v1/users/{user_id}: a user's stored state, summarised. DELETE /v1/users/{user_id}: erase the user."""

import asyncio

import redis
from fastapi import APIRouter, Depends, Path as PathParam

from service import schemas
from service.routes.deps import RuntimeDep, require_api_key, unavailable
from service.runtime import Runtime
from service.stream import EventStream


def _erase(runtime: Runtime, user_id: int) -> dict:
    # The bulk client: the dead-letter scan may take longer than a request's Redis timeout.
    store = runtime.bulk_store
    stream = EventStream(store.client, runtime.config.serve)
    # Read before the erase: every event of the user accepted before this request is at or before it.
    position = stream.position(user_id)
    keys = store.erase(user_id, position)
    return {"user_id": user_id, "keys_deleted": keys, "dead_letters_deleted": stream.erase_dead_letters(user_id),
            "stream_position": position}


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

    @r.delete("/v1/users/{user_id}", response_model=schemas.EraseResponse, dependencies=[Depends(require_api_key)],
              responses=schemas.error_responses(401, 403, 503))
    async def erase(runtime: RuntimeDep, user_id: int = PathParam(ge=0, le=schemas.MAX_ID)):
        """Erase the user: its sequence, meta, dedup window, every model version's state and block index, and
        its dead letters. Its events accepted before this request and not yet applied are dropped when a
        worker reaches them (docs/operations.md, "Erasing a user"). Idempotent."""
        try:
            out = await asyncio.to_thread(_erase, runtime, user_id)
        except redis.RedisError as e:
            raise unavailable(runtime, "erase", e) from None
        runtime.metrics.users_erased.inc()
        return out

    return r
