"""What the routes share: the `Runtime` and API-key dependencies, and the error answers (the policy is in
service.app's docstring)."""

import logging
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.security import APIKeyHeader

from service.http import check_api_key
from service.runtime import Runtime

log = logging.getLogger("recsys.service")


async def get_runtime(request: Request) -> Runtime:
    # async: a plain def dependency would cost every request a hop through the thread pool
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False)


def require_api_key(runtime: RuntimeDep, key: str | None = Depends(api_key_header)) -> None:
    check_api_key(runtime.config.http.resolved_api_key(), key)


def unavailable(runtime: Runtime, op: str, e: Exception) -> HTTPException:
    runtime.metrics.state_store_errors.labels(op).inc()
    log.warning("state store %s failed: %s", op, e)
    return HTTPException(503, f"state store unavailable ({type(e).__name__})")


def invalid(loc: tuple, msg: str) -> RequestValidationError:
    """A 422 in the same shape as a schema violation, for checks the schema cannot express."""
    return RequestValidationError([{"loc": loc, "msg": msg, "type": "value_error"}])
