"""POST /v1/score: score one user's candidates (through the app's micro-batcher)."""

import logging
import math

import numpy as np
import orjson
import redis
from fastapi import APIRouter, HTTPException
from fastapi.responses import Response
from pydantic import BaseModel

from service import schemas
from service.model_state import NO_CATEGORY
from service.routes.deps import RuntimeDep, unavailable
from service.scoring import ScoreJob

log = logging.getLogger("recsys.service")


def router(score_request: type[BaseModel]) -> APIRouter:
    """`score_request`: schemas.request_models(...).score, which carries the configured candidate cap."""
    r = APIRouter()

    @r.post("/v1/score", response_model=schemas.ScoreResponse, responses=schemas.error_responses(503))
    async def score(req: score_request, runtime: RuntimeDep):
        scorer = runtime.scorer
        if scorer is None:
            raise HTTPException(503, "no model loaded: POST /v1/admin/reload with a bundle")
        n = len(req.candidates)
        items = np.fromiter((c["item_id"] for c in req.candidates), np.int64, n)
        cates = np.fromiter((NO_CATEGORY if (g := c.get("category_id")) is None else g for c in req.candidates),
                            np.int64, n)
        try:
            res = await runtime.batcher.submit(ScoreJob(req.user_id, items, cates, req.explain))
        except redis.RedisError as e:
            raise unavailable(runtime, "read", e) from None
        except Exception as e:  # noqa: BLE001 - the model failed on this request: say so, never a 500
            log.exception("scoring user %s failed", req.user_id)
            raise HTTPException(503, f"scoring failed ({type(e).__name__})") from None
        if not all(map(math.isfinite, res.scores)):   # orjson would write NaN as null
            log.error("user %s: the model produced non-finite scores", req.user_id)
            raise HTTPException(503, "scoring failed (non-finite scores)")
        # Built by hand: validating C floats through the response model costs more than the forward, and
        # orjson writes them in ~10 us where json.dumps took ~140 us for 200 (float repr).
        # the version of the model that ran this request's batch, not the one current when it was queued
        # (a reload in between would otherwise label one model's scores with the other's version)
        body = {"user_id": req.user_id, "model_version": res.version, "history_length": res.history_length,
                "scores": res.scores, "explanations": res.explanations}
        if res.memory is not None:
            body["memory"] = res.memory
        return Response(orjson.dumps(body), media_type="application/json")

    return r
