"""ASGI plumbing under the routes: request id, latency metrics and access log, body-size cap and deadline,
API-key check, error bodies.

The body cap is a raw ASGI middleware so an oversized request is answered 413 before any JSON parsing or
validation runs: by its Content-Length when declared, else by counting the streamed chunks. The same
middleware bounds the time the body may take (408, connection closed); the headers' deadline is in the
HTTP protocol (service.http_protocol).
"""

import asyncio
import hmac
import json
import logging
import time

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from service.logs import accept_request_id, request_id
from service.metrics import ServiceMetrics

access_log = logging.getLogger("recsys.access")


async def _send_json(send, status: int, body: dict, close: bool = False) -> None:
    raw = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    if close:  # the rest of the request is not read: the connection cannot carry another one
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": raw})


class BodyLimit:
    def __init__(self, app, max_bytes: int, timeout_s: float | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                return await _send_json(send, 400, {"detail": "Content-Length: not a non-negative integer"})
            if int(declared) > self.max_bytes:
                return await _send_json(send, 413, {"detail": f"body: {int(declared)} bytes exceeds the limit of "
                                                              f"{self.max_bytes} bytes"})
        chunks, size = [], 0
        deadline = None if self.timeout_s is None else asyncio.get_running_loop().time() + self.timeout_s
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    msg = await receive()
            except TimeoutError:
                # A body that stalls holds a connection and its buffered chunks: answer and close.
                return await _send_json(send, 408, {"detail": f"body: not received within {self.timeout_s:g} s "
                                                              "(http.body_timeout_s)"}, close=True)
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await _send_json(send, 413, {"detail": f"body: exceeds the limit of {self.max_bytes} bytes"})
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


class RequestContext:
    """Outermost: each request's id (service.logs: the client's X-Request-ID if well-formed, else a new one;
    echoed in the response and on every log record of the request), its latency in the histogram per
    (method, route template, status; unmatched paths share one label), and the access log line when
    http.access_log is on."""

    def __init__(self, app, metrics: ServiceMetrics, access_log: bool = False):
        self.app = app
        self.metrics = metrics
        self.access_log = access_log

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        given = next((v for k, v in scope["headers"] if k == b"x-request-id"), None)
        rid = accept_request_id(None if given is None else given.decode("latin-1"))
        token = request_id.set(rid)
        status = 500

        async def send_wrapper(msg):
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
                msg = {**msg, "headers": [*msg.get("headers", ()), (b"x-request-id", rid.encode())]}
            await send(msg)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            took = time.perf_counter() - t0
            route = scope.get("route")
            path = getattr(route, "path", None) or "<unmatched>"
            self.metrics.request_seconds.labels(scope["method"], path, str(status)).observe(took)
            if self.access_log:
                access_log.info("%s %s %d %.1f ms", scope["method"], scope["path"], status, took * 1000,
                                extra={"method": scope["method"], "route": path, "status": status,
                                       "duration_ms": round(took * 1000, 3)})
            request_id.reset(token)


def check_api_key(expected: str | None, given: str | None) -> None:
    if expected is None:
        raise HTTPException(403, "X-API-Key: write endpoints are disabled: no API key is configured "
                                 "(http.api_key or RECSYS_API_KEY)")
    if not given:
        raise HTTPException(401, "X-API-Key: header missing", headers={"WWW-Authenticate": "ApiKey"})
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise HTTPException(403, "X-API-Key: invalid key")


def _field(loc) -> str:
    return ".".join(str(p) for p in loc) or "<body>"


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    # The input is not echoed back: it can be large, and it is the client's own data.
    errors = [{"field": _field(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
    message = "; ".join(f"{e['field']}: {e['msg']}" for e in errors[:5])
    return JSONResponse(status_code=422, content={"detail": message, "errors": errors[:50]})
