"""HTTP service config: where it listens, what it accepts, how it batches, which bundle it serves.

`ServiceConfig` is what `service.app.create_app` and `service.serve.serve` take: this HTTP section plus the
state-store / stream section of `recsys.config.serve.ServeConfig`. Secrets never need to live in a file:
`RECSYS_API_KEY` in the environment overrides `http.api_key` (see `HttpConfig.resolved_api_key`).
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field

from recsys.config.base import StrictModel
from recsys.config.serve import ServeConfig

MIN_API_KEY_CHARS = 16


class HttpConfig(StrictModel):
    """Where the service listens, what it accepts, how it batches. RECSYS_API_KEY overrides `api_key`."""

    # Loopback unless told otherwise: exposing the service is a deliberate act.
    host: str = Field("127.0.0.1", description="bind address (0.0.0.0 exposes the service on every interface)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: any free port)")
    api_key: str | None = Field(None, min_length=MIN_API_KEY_CHARS, description="key that write and admin endpoints (POST "
                                "/v1/events, POST /v1/admin/reload) require in `X-API-Key`; with no key configured "
                                "they answer 403, never open. RECSYS_API_KEY in the environment overrides it")
    max_body_bytes: int = Field(1_048_576, ge=1_024, description="bodies above this many bytes get 413 before any "
                                "parsing (Content-Length, or counted while streaming)")
    max_candidates: int = Field(1_000, ge=1, description="most candidates in one /v1/score request (more: 422)")
    max_events: int = Field(10_000, ge=1, description="most events in one /v1/events request (more: 422)")
    event_max_future_s: float = Field(86_400.0, ge=0.0, description="an event stamped more than this far ahead "
                                      "of the server clock is refused (422): one far-future timestamp would "
                                      "raise its user's late-event floor, and every later real event of that "
                                      "user would be dead-lettered as late")
    event_min_ts_ms: int = Field(0, ge=0, description="events stamped before this time (ms since the epoch) "
                                 "are refused (422); 0: no lower bound")
    # 0: measured at L = 10k, C = 200, one client, a 1 ms window cost 6 ms of p50 (15 vs 9 ms): requests
    # of different users never share a forward, only a Redis round trip, and under load batches form anyway.
    batch_window_ms: float = Field(0.0, ge=0.0, le=100.0, description="micro-batching: how long a score request "
                                   "waits for others to share its state fetch (0: none; requests that queue while "
                                   "the scorer threads are busy still form batches)")
    max_batch: int = Field(32, ge=1, description="most score requests in one micro-batch")
    score_concurrency: int = Field(1, ge=1, le=64, description="micro-batches scored at once, each in its own "
                                   "thread; keep score_concurrency x torch_threads about the cores the process may use")
    memory_rebuild_max_events: int = Field(2_048, ge=0, description="models with memory branches: a user whose "
                                           "stored state is missing or of another model version gets it "
                                           "recomputed inside the request from the stored sequence when that "
                                           "has at most this many events (response `memory: rebuilt`), else "
                                           "is scored with an empty memory (`memory: empty`); the stream "
                                           "worker or the rebuild job writes the real state")
    # uvicorn alone arms no timer while headers arrive and none while a body arrives: a client that sends half
    # a request held its connection (and a file descriptor) for as long as it liked.
    headers_timeout_s: float = Field(10.0, gt=0, description="a connection whose request line and headers are "
                                     "not complete this long after it opened (or after the first byte of its "
                                     "next request) gets 408 and is closed")
    body_timeout_s: float = Field(30.0, gt=0, description="a request whose body is not complete this long after "
                                  "its headers gets 408 and its connection is closed")
    keep_alive_timeout_s: float = Field(5.0, gt=0, description="an idle kept-alive connection is closed after "
                                        "this long (uvicorn's timeout_keep_alive)")
    # One log line per request costs about as much as a small forward.
    access_log: bool = Field(False, description="one log line per request (logger recsys.access: method, route, "
                             "status, duration_ms, request_id)")
    torch_threads: int | None = Field(None, ge=1, description="threads torch may use for a forward (None: torch's "
                                      "default)")
    lend_idle_core: bool = Field(True, description="while fewer micro-batches score than the process has cores "
                                 "for (score_concurrency x torch_threads below them), a long history's top-k search "
                                 "borrows an idle core: the kernel's chunks taken by two threads in turn, the same "
                                 "result (retrieval.lend); off in each process of `recsys serve --workers N` (N > 1) "
                                 "and of Ray Serve replicas, which cannot see each other's idle cores")

    def resolved_api_key(self) -> str | None:
        """The key write/admin endpoints require; RECSYS_API_KEY wins and is held to the same length rule as
        the file's `api_key` (a short key in the environment used to pass unchecked)."""
        key = os.environ.get("RECSYS_API_KEY") or self.api_key
        if key is not None and len(key) < MIN_API_KEY_CHARS:
            raise ValueError(f"RECSYS_API_KEY: {len(key)} characters; a key needs at least {MIN_API_KEY_CHARS} "
                             "(a short key can be guessed)")
        return key


class MonitoringConfig(StrictModel):
    """Logs, metrics and health checks of `recsys serve` and `recsys stream-worker` (docs/operations.md)."""

    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="lowest level logged "
                                                                    "(`--log-level` overrides it)")
    log_format: Literal["text", "json"] = Field("text", description="text: one readable line per record; json: "
                                                "one JSON object per line (ts, level, logger, message, pid, "
                                                "request_id and the record's extra fields; `--log-format` "
                                                "overrides it)")
    # An idle worker completes an empty read every stream.block_ms, a busy one a batch every fraction of a
    # second: 30 s without either is a worker stuck in a call or failing every attempt.
    worker_stall_s: float = Field(30.0, gt=0, description="a stream worker (embedded thread or `recsys "
                                  "stream-worker`) that completed no read for this long while entries wait is "
                                  "stalled: the service's /readyz and the worker's /healthz answer 503")
    worker_port: int | None = Field(None, ge=0, le=65535, description="`recsys stream-worker` serves GET "
                                    "/metrics and /healthz on this port (0: a free port, logged at start; None: "
                                    "no HTTP endpoint)")
    worker_host: str = Field("127.0.0.1", description="bind address of the stream worker's metrics/health port")


class ServiceConfig(StrictModel):
    """A service config (`recsys serve --config`, `recsys stream-worker --config`, e.g. the preset `serve`); the
    flags `--bundle`, `--host` and `--port` override the file."""

    http: HttpConfig = Field(HttpConfig(), description="the HTTP front end")
    serve: ServeConfig = Field(ServeConfig(), description="the Redis user-state store and the event stream")
    monitoring: MonitoringConfig = Field(MonitoringConfig(), description="logs, metrics and health checks")
    bundle: str | None = Field(None, description="model bundle folder served at start (None: not ready until POST "
                               "/v1/admin/reload loads one); `--bundle` overrides it")
    embedded_worker: bool = Field(True, description="run the stream worker as a thread of the service process "
                                  "(embedded mode: no separate `recsys stream-worker`)")
    ray_loopback: bool = Field(True, description="`--ray-serve`: every Ray port (GCS, raylet, object manager, "
                               "agents, Serve controller, proxy and replicas) listens on 127.0.0.1 only: a "
                               "single-machine Ray that nothing else can reach. false: Ray's defaults (every "
                               "interface: needed by a multi-node Ray cluster, which must then be firewalled; "
                               "docs/operations.md)")
    reload_poll_s: float = Field(1.0, ge=0.0, description="every serving process and stream worker reads the "
                                 "model version published by the last POST /v1/admin/reload (a Redis key) this "
                                 "often and switches to it, so a reload sent to one of N workers reaches all "
                                 "within about this long (0: off; each process keeps what it loaded)")
    rebuild_max_users: int = Field(100_000, ge=0, description="/v1/admin/reload rebuilds every user's state "
                                   "in-process up to this many users; above it, run the rebuild job first "
                                   "(pipelines/rebuild_state.py) and reload with `rebuild: false`")
