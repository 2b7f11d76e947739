"""HTTP service config: where it listens, what it accepts, how it batches, which bundle it serves.

`ServiceConfig` is what `service.app.create_app` and `service.serve.serve` take: this HTTP section plus the
state-store / stream section of `recsys.config.serve.ServeConfig`. Secrets never need to live in a file:
`RECSYS_API_KEY` in the environment overrides `http.api_key` (see `HttpConfig.resolved_api_key`).
"""

from __future__ import annotations

import os

from pydantic import Field

from recsys.config.base import StrictModel
from recsys.config.serve import ServeConfig


class HttpConfig(StrictModel):
    # Loopback unless told otherwise: exposing the service is a deliberate act.
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    # Write and admin endpoints (POST /v1/events, POST /v1/admin/reload) need this key in `X-API-Key`;
    # with no key configured they are refused (403), never open.
    api_key: str | None = Field(default=None, min_length=16)
    # Bodies above this many bytes get 413 before any parsing (Content-Length, or counted while streaming).
    max_body_bytes: int = Field(default=1_048_576, ge=1_024)
    max_candidates: int = Field(default=1_000, ge=1)
    max_events: int = Field(default=10_000, ge=1)
    # Micro-batching: a request waits at most this long for others to share its state fetch and forward.
    batch_window_ms: float = Field(default=1.0, ge=0.0, le=100.0)
    max_batch: int = Field(default=32, ge=1)
    # Micro-batches scored at once, each in its own thread (set torch_threads so that
    # score_concurrency x torch_threads is about the cores this process may use).
    score_concurrency: int = Field(default=1, ge=1, le=64)
    # One log line per request costs about as much as a small forward: off unless asked for.
    access_log: bool = False
    # Threads torch may use for a forward (None: torch's default).
    torch_threads: int | None = Field(default=None, ge=1)

    def resolved_api_key(self) -> str | None:
        return os.environ.get("RECSYS_API_KEY") or self.api_key


class ServiceConfig(StrictModel):
    http: HttpConfig = HttpConfig()
    serve: ServeConfig = ServeConfig()
    # Model bundle folder served at start (None: not ready until POST /v1/admin/reload loads one).
    bundle: str | None = None
    # Run the stream worker as a thread of the service process (embedded mode: no separate worker).
    embedded_worker: bool = True
    # /v1/admin/reload rebuilds every user's state in-process up to this many users; above it, run the
    # rebuild job first and reload with `rebuild: false`.
    rebuild_max_users: int = Field(default=100_000, ge=0)
