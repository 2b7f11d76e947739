"""POST /v1/events: append events to the user-partitioned stream (the stream worker applies them)."""

import asyncio
import time

import redis
from fastapi import APIRouter, Depends, HTTPException
from pydantic import BaseModel

from service import schemas
from service.routes.deps import RuntimeDep, invalid, require_api_key, unavailable
from service.state import Event
from service.stream import BacklogFull


def router(events_request: type[BaseModel]) -> APIRouter:
    """`events_request`: schemas.request_models(...).events, which carries the configured batch cap."""
    r = APIRouter()

    @r.post("/v1/events", status_code=202, response_model=schemas.EventsResponse,
            dependencies=[Depends(require_api_key)], responses=schemas.error_responses(401, 403, 429, 503))
    async def events(req: events_request, runtime: RuntimeDep):
        batch = []
        http = runtime.config.http
        latest = int((time.time() + http.event_max_future_s) * 1000)
        for i, e in enumerate(req.events):
            if not http.event_min_ts_ms <= e.ts <= latest:
                raise invalid(("body", "events", i, "ts"),
                              f"{e.ts} outside the accepted window [{http.event_min_ts_ms}, {latest}] ms (at most "
                              f"http.event_max_future_s = {http.event_max_future_s:g} s ahead of the server clock)")
            try:
                batch.append(Event(e.event_id, e.user_id, e.item_id, e.category_id, e.action, e.ts))
            except ValueError as err:  # the store's own checks, should they ever be stricter than the schema
                name, _, msg = str(err).partition(": ")
                raise invalid(("body", "events", i, name), msg) from None
        sc = runtime.config.serve.stream
        try:
            await asyncio.to_thread(runtime.stream.append, batch, sc.max_backlog)
        except BacklogFull as e:
            # Backpressure: nothing was written; the client retries the same events later (event ids make a
            # retry of events that did get in a no-op).
            runtime.metrics.events_throttled.inc(len(batch))
            raise HTTPException(429, f"{e}; retry after {sc.retry_after_s} s",
                                headers={"Retry-After": str(sc.retry_after_s)}) from None
        except redis.RedisError as e:
            raise unavailable(runtime, "append", e) from None
        runtime.metrics.events_ingested.inc(len(batch))
        return {"accepted": len(batch)}

    return r
