"""Logging of the service and the stream worker: level, text or JSON lines, and the request id.

Each HTTP request gets an id (`service.http.RequestContext`): the client's `X-Request-ID` when it is
well-formed, else a new one; it is echoed in the response's `X-Request-ID` and held in a contextvar for the
request's task, so every record logged while the request runs (in its task, or in a thread it started with
asyncio.to_thread, which copies the context) carries it as `request_id`. Work shared by several requests (a
scoring micro-batch, the stream worker) logs without one.

`configure_logging` is called once per process by what starts it (`service.serve`, `recsys stream-worker`),
never by `create_app`: tests build many apps in one process and keep their own logging.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import re
import sys
import uuid

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

# Printable, no spaces or quotes: an id goes into log lines and headers as it is, so a client cannot inject
# line breaks or fake fields; 128 characters hold any trace id format in use (W3C, B3, UUIDs).
_WELL_FORMED = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


def accept_request_id(given: str | None) -> str:
    """The client's id if well-formed, else a fresh one (32 hex digits)."""
    if given is not None and _WELL_FORMED.fullmatch(given):
        return given
    return uuid.uuid4().hex


class RequestIdFilter(logging.Filter):
    """Puts the current request id (or None) on every record as `request_id`."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


# What every LogRecord has: anything else on a record came through `extra=` and goes into the JSON line.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "request_id",
                                                                           "color_message", "taskName", "rid"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts (UTC, ISO 8601, ms), level, logger, message, pid, request_id, the
    record's extra fields, and exc (the traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
               "level": record.levelname, "logger": record.name, "message": record.getMessage(),
               "pid": record.process, "request_id": getattr(record, "request_id", None)}
        for k, v in vars(record).items():
            if k not in _STANDARD and k not in out:
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class _TextFormatter(logging.Formatter):
    """`ts LEVEL logger [pid request-id] message` ("-": no request)."""

    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(process)d %(rid)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        record.rid = getattr(record, "request_id", None) or "-"
        return super().format(record)


def configure_logging(level: str = "info", fmt: str = "text") -> None:
    """Root logger -> stderr at `level` ("debug" .. "error"), text or JSON lines, with the request id.
    uvicorn's loggers propagate here (the service runs uvicorn with `log_config=None`). Replaces the
    handlers a previous call installed."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else _TextFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # Python warnings become records too (logger py.warnings): one format
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).setLevel(level.upper())
