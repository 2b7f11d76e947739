"""What `recsys stream-worker` runs (`WorkerProcess`): one stream consumer, the follower of the published
model version, and, when `monitoring.worker_port` is set, GET /metrics and /healthz on that port.

/healthz answers 200 while the consume loop runs and is keeping up: it completed a read within
`monitoring.worker_stall_s`, or it has nothing to do (backlog 0); else 503 with the reason. /metrics is the
worker's Prometheus text (service.metrics.WorkerMetrics) with the stream backlog measured at the scrape.
Both are served by a small stdlib HTTP server on a thread: the worker has no event loop and needs no more.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import redis

from recsys.config.http import ServiceConfig
from service.metrics import WorkerMetrics
from service.model_state import ModelStateUpdater, ServingModel
from service.stream import StreamWorker, WorkerStats

log = logging.getLogger("recsys.stream")


class WorkerProcess:
    """A stream worker on `client` for the config's bundle. `serve_http()` opens the metrics/health port,
    `run(stop)` consumes until `stop` is set."""

    def __init__(self, cfg: ServiceConfig, client: redis.Redis, consumer: str):
        self.cfg = cfg
        self.client = client
        self.consumer = consumer
        self.metrics = WorkerMetrics()
        self.model = ServingModel.from_bundle(cfg.bundle)
        self.metrics.set_model(self.model.version, None)
        self.worker = StreamWorker(cfg.serve, ModelStateUpdater(self.model), client=client, consumer=consumer,
                                   on_batch=self._on_batch)
        self.running = False
        self.last_read = time.monotonic()
        self._http: ThreadingHTTPServer | None = None

    def _on_batch(self, stats: WorkerStats) -> None:
        self.metrics.count_batch(stats)
        self.last_read = time.monotonic()

    def _switch(self, model: ServingModel) -> None:
        self.worker.updater = ModelStateUpdater(model)  # read once per batch by the worker loop
        self.metrics.set_model(model.version, self.model.version)
        self.model = model

    def run(self, stop: threading.Event) -> WorkerStats:
        follower = None
        if self.cfg.reload_poll_s > 0:  # a reload sent to the service reaches this worker too
            from service.model_sync import ModelSync, follow_in_thread

            sync = ModelSync(self.client, self.cfg.serve.state.key_prefix, f"stream-worker:{self.consumer}")
            follower = follow_in_thread(sync, self.model.version, self._switch, stop, self.cfg.reload_poll_s)
        self.last_read = time.monotonic()
        self.running = True
        try:
            return self.worker.run(stop)
        finally:
            self.running = False
            if follower is not None:
                follower.join(5)

    # ---- monitoring ---------------------------------------------------------------------------------

    def measure_backlog(self) -> int:
        n = self.worker.stream.backlog()
        self.metrics.stream_backlog.set(n)
        return n

    def health(self) -> tuple[int, dict]:
        """-> (HTTP status, body) of /healthz."""
        if not self.running:
            return 503, {"status": "unavailable", "detail": "stream worker not consuming"}
        age = time.monotonic() - self.last_read
        stall_s = self.cfg.monitoring.worker_stall_s
        if age > stall_s:
            try:
                backlog = self.measure_backlog()
            except redis.RedisError as e:
                return 503, {"status": "unavailable", "detail": f"state store unreachable ({type(e).__name__})"}
            if backlog:
                return 503, {"status": "unavailable", "detail": f"stream worker completed no read for {age:.1f} s "
                             f"(monitoring.worker_stall_s = {stall_s:g}) with {backlog} entries not yet applied"}
        return 200, {"status": "ok", "model_version": self.model.version}

    def render_metrics(self) -> bytes:
        try:
            self.measure_backlog()
        except redis.RedisError as e:
            self.metrics.state_store_errors.labels("backlog").inc()
            self.metrics.stream_backlog.set(float("nan"))
            log.warning("stream backlog for /metrics: %s", e)
        return self.metrics.render()

    def serve_http(self) -> str | None:
        """Start GET /metrics and /healthz on monitoring.worker_host:worker_port in a thread (None: the port
        is not configured). -> the base URL."""
        mon = self.cfg.monitoring
        if mon.worker_port is None:
            return None
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path == "/metrics":
                    status, body, ctype = 200, owner.render_metrics(), owner.metrics.content_type
                elif self.path == "/healthz":
                    status, doc = owner.health()
                    body, ctype = json.dumps(doc).encode(), "application/json"
                else:
                    status, body, ctype = 404, b'{"detail": "not found: GET /metrics or /healthz"}', "application/json"
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format, *args):
                log.debug("metrics endpoint: " + format, *args)

        family = socket.AF_INET6 if ":" in mon.worker_host else socket.AF_INET
        self._http = type("Server", (ThreadingHTTPServer,), {"address_family": family, "daemon_threads": True})(
            (mon.worker_host, mon.worker_port), Handler)
        threading.Thread(target=self._http.serve_forever, name="worker-metrics", daemon=True).start()
        host, port = self._http.server_address[:2]
        url = f"http://[{host}]:{port}" if family == socket.AF_INET6 else f"http://{host}:{port}"
        log.info("stream worker %s: GET %s/metrics and /healthz", self.consumer, url)
        return url

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        self.metrics.close()
