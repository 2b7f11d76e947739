"""Observability (issue 17, item 9), with real parts only: one scrape sums every uvicorn worker (prometheus
multiprocess mode), the stream worker's own /metrics and /healthz, readiness that follows the embedded
worker and the backlog bound, request ids and JSON log lines."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest
import redis
import torch
from helpers import wait_for
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from test_service_support import API_KEY, cleanup_server_keys, live, service_config

from recsys.bundle import export_bundle, load_bundle
from recsys.config.experiment import ExperimentConfig
from recsys.config.model import ModelConfig
from recsys.models import build_model
from recsys.net import free_port

HEADERS = {"X-API-Key": API_KEY}


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> str:
    torch.manual_seed(0)
    cfg = ExperimentConfig(data="x", model=ModelConfig(max_len=16, top_k=4, dim_rep=4, dim_att=4, mlp=[8]))
    return str(export_bundle(build_model(cfg.model, 200, 5), cfg, tmp_path_factory.mktemp("b") / "bundle", metrics={}))


def _event(i: int, user: int) -> dict:
    return {"event_id": f"e{i}", "user_id": user, "item_id": 1 + i, "category_id": 1 + i % 4, "action": 1,
            "ts": 1_700_000_000_000 + i}


def _with(cfg, **sections):
    """`cfg` with section fields replaced: _with(cfg, monitoring={...}, stream={...}, top={...})."""
    serve = cfg.serve.model_copy(update={"stream": cfg.serve.stream.model_copy(update=sections.get("stream", {}))})
    return cfg.model_copy(update={"http": cfg.http.model_copy(update=sections.get("http", {})), "serve": serve,
                                  "monitoring": cfg.monitoring.model_copy(update=sections.get("monitoring", {})),
                                  **sections.get("top", {})})


def samples(text: str, name: str) -> dict[tuple, float]:
    """{sorted label items: value} of every sample called `name` in Prometheus text."""
    return {tuple(sorted(s.labels.items())): s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == name}


HEALTHZ_COUNT = (("method", "GET"), ("route", "/healthz"), ("status", "200"))


def _healthz_count_of(path: str) -> float:
    """The /healthz request count in one worker's histogram file."""
    for m in MultiProcessCollector.merge([path]):
        for s in m.samples:
            if s.name == "recsys_http_request_seconds_count" and tuple(sorted(s.labels.items())) == HEALTHZ_COUNT:
                return s.value
    return 0.0


# ---- several processes ------------------------------------------------------------------------------------

def test_one_scrape_sums_both_uvicorn_workers_and_the_stream_worker_has_its_own_port(tiny_bundle, tmp_path,
                                                                                     redis_server):
    """`serve(workers=2)` in a subprocess (JSON logs, access log on) and a `recsys stream-worker` with a metrics
    port: a scrape of either uvicorn worker counts the requests both served; the stream worker answers
    /healthz and /metrics on its own loopback port; the metrics folder is gone after SIGTERM."""
    cfg = _with(service_config(redis_server, tmp_path, bundle=tiny_bundle), http={"port": free_port(),
                "access_log": True}, monitoring={"log_format": "json", "worker_port": free_port()})
    version = load_bundle(tiny_bundle).version
    code = ("import os; from recsys.config.http import ServiceConfig; from service.serve import serve; "
            "serve(ServiceConfig.model_validate_json(os.environ['CFG']), workers=2)")
    service = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "CFG": cfg.model_dump_json()},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    (tmp_path / "serve.yaml").write_text(cfg.model_dump_json())
    worker = subprocess.Popen([sys.executable, "-m", "recsys.cli", "stream-worker", "--config",
                               str(tmp_path / "serve.yaml"), "--consumer", "w1", "--log-format", "json",
                               "--log-level", "debug"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url, worker_url = f"http://127.0.0.1:{cfg.http.port}", f"http://127.0.0.1:{cfg.monitoring.worker_port}"

    def answers(u: str) -> bool:
        for p in (service, worker):
            assert p.poll() is None, p.stderr.read().decode()[-3000:]
        try:
            return httpx.get(u, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(lambda: answers(f"{url}/readyz") and answers(f"{worker_url}/healthz"), "service and worker", 120)
        # The private metrics folder, as the workers see it (never this process's environment).
        workers = [c for c in psutil.Process(service.pid).children() if "python" in c.name()]
        folders = {c.environ().get("PROMETHEUS_MULTIPROC_DIR") for c in workers}
        assert len(folders) == 1 and None not in folders, folders
        folder = folders.pop()
        assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ

        # /healthz on fresh connections until both workers served some (the kernel spreads the accepts).
        sent = 0
        while True:
            for _ in range(10):
                assert httpx.get(f"{url}/healthz").status_code == 200
                sent += 1
            per_pid = {int(re.fullmatch(r"histogram_(\d+)\.db", f).group(1)): _healthz_count_of(f"{folder}/{f}")
                       for f in os.listdir(folder) if f.startswith("histogram_")}
            if sum(v > 0 for v in per_pid.values()) >= 2:
                break
            assert sent < 400, per_pid
        assert sum(per_pid.values()) == sent
        text = httpx.get(f"{url}/metrics").text  # one scrape, whichever worker answers it
        assert samples(text, "recsys_http_request_seconds_count")[HEALTHZ_COUNT] == sent
        assert max(per_pid.values()) < sent  # so no single worker's own count could have given that
        # Per-process gauge: one series per live worker, labelled with its pid; model_info is a max, not a sum.
        last_read = samples(text, "recsys_stream_worker_last_read_timestamp_seconds")
        assert {dict(k)["pid"] for k in last_read} == {str(p) for p in per_pid}
        assert all(time.time() - v < 30 for v in last_read.values())
        assert samples(text, "recsys_model_info") == {(("version", version),): 1.0}
        assert samples(text, "recsys_stream_backlog") == {(): 0.0}

        # A worker killed with SIGKILL: uvicorn starts another; its requests stay counted (sums never go back)
        # and its per-process gauge leaves the scrape.
        killed = min(per_pid)
        os.kill(killed, signal.SIGKILL)

        def replaced() -> bool:
            alive = {c.pid for c in psutil.Process(service.pid).children() if c.pid != killed and c.is_running()}
            got = samples(httpx.get(f"{url}/metrics").text, "recsys_stream_worker_last_read_timestamp_seconds")
            pids = {int(dict(k)["pid"]) for k in got}
            return len(pids) == 2 and killed not in pids and pids <= alive

        wait_for(replaced, "a replacement worker reporting, the killed one gone", 120)
        text = httpx.get(f"{url}/metrics").text
        assert samples(text, "recsys_http_request_seconds_count")[HEALTHZ_COUNT] == sent
        live_pids = {int(dict(k)["pid"]) for k in samples(text, "recsys_stream_worker_last_read_timestamp_seconds")}

        # Request id round trip through a worker process; its access line is checked in the log below.
        r = httpx.get(f"{url}/v1/users/7", headers={"X-Request-ID": "probe-7f3a"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "probe-7f3a"

        # The separate stream worker: its own registry (single process: process collectors too).
        wtext = httpx.get(f"{worker_url}/metrics").text
        assert samples(wtext, "recsys_model_info") == {(("version", version),): 1.0}
        assert samples(wtext, "process_resident_memory_bytes")[()] > 0
        assert samples(wtext, "recsys_stream_backlog") == {(): 0.0}
        assert httpx.get(f"{worker_url}/healthz").json() == {"status": "ok", "model_version": version}
    finally:
        for p in (worker, service):
            p.send_signal(signal.SIGTERM)
        for p in (worker, service):
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        cleanup_server_keys(redis_server, cfg.serve.state.key_prefix)
    service_log, worker_log = service.stderr.read().decode(), worker.stderr.read().decode()
    assert service.returncode == 0, service_log[-3000:]
    assert worker.returncode == 0, worker_log[-3000:]
    assert not os.path.exists(folder)  # removed at exit
    assert [x for x in service_log.splitlines() if not x.startswith("{")] == []  # JSON lines only
    lines = [json.loads(x) for x in service_log.splitlines()]
    probe = [x for x in lines if x.get("request_id") == "probe-7f3a"]
    assert len(probe) == 1 and probe[0]["logger"] == "recsys.access", probe
    assert (probe[0]["route"], probe[0]["status"], probe[0]["method"]) == ("/v1/users/{user_id}", 200, "GET")
    assert probe[0]["pid"] in live_pids
    worker_lines = [json.loads(x) for x in worker_log.splitlines()]
    assert any(x["logger"] == "recsys.stream" and x["level"] == "INFO" for x in worker_lines)
    # --log-level debug: the port's request lines (DEBUG) are there
    assert any(x["level"] == "DEBUG" and "GET /healthz" in x["message"] for x in worker_lines)


@pytest.mark.parametrize("flag,value,field", [("--log-level", "loud", "log_level"),
                                              ("--log-format", "xml", "log_format"),
                                              ("--metrics-port", "70000", "worker_port")])
def test_bad_monitoring_flags_are_one_error_line(flag, value, field):
    from typer.testing import CliRunner

    from recsys.cli import app

    command = "serve" if flag != "--metrics-port" else "stream-worker"
    r = CliRunner().invoke(app, [command, flag, value], catch_exceptions=False)
    assert r.exit_code == 2, (r.output, r.stderr)
    assert r.stderr.startswith("error: ") and field in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_stream_worker_endpoint_reports_the_backlog_queued_while_it_is_stopped(tiny_bundle, tmp_path, redis_server):
    from service.state import Event
    from service.stream import EventStream
    from service.worker_process import WorkerProcess

    cfg = _with(service_config(redis_server, tmp_path, bundle=tiny_bundle), monitoring={"worker_port": 0})
    client = redis.Redis.from_url(redis_server)
    process = WorkerProcess(cfg, client, "w-test")
    stop = threading.Event()
    runner = None
    try:
        url = process.serve_http()
        assert url.startswith("http://127.0.0.1:")
        EventStream(client, cfg.serve).append([Event(f"e{i}", 3 + i % 2, 1 + i, 1, 1, 1_700_000_000_000 + i)
                                               for i in range(12)])
        text = httpx.get(f"{url}/metrics").text
        assert samples(text, "recsys_stream_backlog") == {(): 12.0}
        assert samples(text, "recsys_events_applied_total") == {(): 0.0}
        r = httpx.get(f"{url}/healthz")
        assert r.status_code == 503 and "not consuming" in r.json()["detail"]
        assert httpx.get(f"{url}/nothing").status_code == 404

        runner = threading.Thread(target=process.run, args=(stop,))
        runner.start()
        wait_for(lambda: samples(httpx.get(f"{url}/metrics").text, "recsys_events_applied_total") == {(): 12.0},
                 "the worker applying the 12 events")
        assert samples(httpx.get(f"{url}/metrics").text, "recsys_stream_backlog") == {(): 0.0}
        assert httpx.get(f"{url}/healthz").status_code == 200
    finally:
        stop.set()
        if runner is not None:
            runner.join(10)
        process.close()
        client.close()
        cleanup_server_keys(redis_server, cfg.serve.state.key_prefix)


# ---- readiness ---------------------------------------------------------------------------------------------

class HangingUpdater:
    """The real model updater, except that every use waits until `release` is set: a worker stuck in a call."""

    def __init__(self, real):
        self.real = real
        self.release = threading.Event()

    def __getattr__(self, name):
        self.release.wait(30)
        return getattr(self.real, name)


def test_readiness_follows_the_embedded_worker(tiny_bundle, tmp_path, redis_server):
    cfg = _with(service_config(redis_server, tmp_path, bundle=tiny_bundle), monitoring={"worker_stall_s": 0.5})
    with live(cfg) as (srv, client):
        rt = srv.runtime
        assert client.get("/readyz").status_code == 200
        # Stuck in a call with an event waiting: not ready once worker_stall_s has passed; ready again after.
        hang = rt.worker.updater = HangingUpdater(rt.worker.updater)
        assert client.post("/v1/events", json={"events": [_event(1, 3)]}, headers=HEADERS).status_code == 202
        time.sleep(0.6)
        r = client.get("/readyz")
        assert r.status_code == 503 and "completed no read" in r.json()["detail"] and "1 entries" in r.json()["detail"]
        assert r.json()["model_version"] == rt.scorer.version
        hang.release.set()
        wait_for(lambda: client.get("/readyz").status_code == 200, "ready once the worker moves again", 10)
        # An idle worker with nothing to do stays ready however long ago its last batch was.
        assert client.get("/v1/users/3").json()["history_length"] == 1
        # The worker thread is gone: not ready.
        rt.worker_stop.set()
        rt.worker_thread.join(10)
        r = client.get("/readyz")
        assert r.status_code == 503 and r.json()["detail"] == "stream worker thread not running"


@pytest.mark.parametrize("backend", ["embedded", "server"])  # Redis 6.2 (no group lag) and Redis 7
def test_readiness_follows_the_backlog_bound(backend, backend_url, tiny_bundle, tmp_path):
    from service.model_state import ModelStateUpdater, ServingModel
    from service.stream import StreamWorker

    cfg = _with(service_config(backend_url, tmp_path, bundle=tiny_bundle), stream={"max_backlog": 5},
                top={"embedded_worker": False})
    with live(cfg) as (srv, client):
        assert client.get("/readyz").status_code == 200
        # A worker that has not read yet: the group exists, the events wait undelivered.
        worker = StreamWorker(cfg.serve, ModelStateUpdater(ServingModel.from_bundle(tiny_bundle)),
                              client=srv.runtime.redis.client)
        events = [_event(i, 3 + i % 2) for i in range(8)]
        assert client.post("/v1/events", json={"events": events}, headers=HEADERS).status_code == 202
        r = client.get("/readyz")
        assert r.status_code == 503, r.text
        assert r.json()["detail"] == "stream backlog: 8 entries not yet applied, at stream.max_backlog (5) or above"
        assert samples(client.get("/metrics").text, "recsys_stream_backlog") == {(): 8.0}
        assert worker.run(until_idle=True).applied == 8
        assert client.get("/readyz").status_code == 200
        assert samples(client.get("/metrics").text, "recsys_stream_backlog") == {(): 0.0}


# ---- request ids and logs ----------------------------------------------------------------------------------

def test_request_ids_round_trip_into_json_log_lines(tiny_bundle, tmp_path):
    from service.logs import JsonFormatter, RequestIdFilter

    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    access = logging.getLogger("recsys.access")
    access.addHandler(handler)
    level = access.level
    access.setLevel(logging.INFO)
    cfg = _with(service_config(None, tmp_path, bundle=tiny_bundle), http={"access_log": True})
    try:
        with live(cfg) as (_, client):
            given = client.get("/healthz", headers={"X-Request-ID": "trace-00f1:a/b=c"})
            assert given.headers["x-request-id"] == "trace-00f1:a/b=c"
            fresh = [client.get("/healthz").headers["x-request-id"] for _ in range(2)]
            bad = client.get("/healthz", headers={"X-Request-ID": "two words"}).headers["x-request-id"]
            long = client.get("/healthz", headers={"X-Request-ID": "x" * 129}).headers["x-request-id"]
            for rid in (*fresh, bad, long):
                assert re.fullmatch(r"[0-9a-f]{32}", rid), rid
            assert len({*fresh, bad, long}) == 4
            # Answers from the outermost layers carry one too.
            big = client.post("/v1/events", content=b"x" * (cfg.http.max_body_bytes + 1), headers=HEADERS)
            assert big.status_code == 413 and re.fullmatch(r"[0-9a-f]{32}", big.headers["x-request-id"])
    finally:
        access.removeHandler(handler)
        access.setLevel(level)
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert [x["request_id"] for x in lines] == ["trace-00f1:a/b=c", *fresh, bad, long, big.headers["x-request-id"]]
    first = lines[0]
    assert (first["logger"], first["level"], first["method"], first["route"], first["status"]) == \
        ("recsys.access", "INFO", "GET", "/healthz", 200)
    assert first["pid"] == os.getpid() and first["duration_ms"] >= 0
    assert (lines[-1]["route"], lines[-1]["status"]) == ("<unmatched>", 413)
