"""The service under faults an operator meets (issue 17), with real parts only: Redis servers the tests start
(one of them frozen with SIGSTOP), real HTTP on uvicorn, real sockets, real subprocesses."""

from __future__ import annotations

import logging
import os
import signal
import time

import httpx
import pytest
import redis
import torch

from helpers import start_redis_server, stop
from recsys.bundle import export_bundle
from recsys.config.experiment import ExperimentConfig
from recsys.config.model import ModelConfig
from recsys.models import build_model
from test_service_support import API_KEY, live, service_config

HEADERS = {"X-API-Key": API_KEY}
CAND = {"item_id": 5, "category_id": 1}


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> str:
    torch.manual_seed(0)
    cfg = ExperimentConfig(data="x", model=ModelConfig(max_len=16, top_k=4, dim_rep=4, dim_att=4, mlp=[8]))
    return str(export_bundle(build_model(cfg.model, 200, 5), cfg, tmp_path_factory.mktemp("b") / "bundle", metrics={}))


def _with(cfg, **changes):
    """A copy of a ServiceConfig with `section__field=value` changes (sections: http, stream, state)."""
    http, stream, state, top = {}, {}, {}, {}
    for k, v in changes.items():
        section, _, name = k.partition("__")
        {"http": http, "stream": stream, "state": state}.get(section, top)[name or section] = v
    serve = cfg.serve.model_copy(update={"stream": cfg.serve.stream.model_copy(update=stream),
                                         "state": cfg.serve.state.model_copy(update=state)})
    return cfg.model_copy(update={"http": cfg.http.model_copy(update=http), "serve": serve, **top})


def _event(i: int, user: int) -> dict:
    return {"event_id": f"e{i}", "user_id": user, "item_id": 1 + i, "category_id": 1 + i % 4, "action": 1,
            "ts": 1_700_000_000_000 + i}


# ---- backpressure ----------------------------------------------------------------------------------------

def test_backlog_bound_answers_429_and_every_accepted_event_is_applied_once(tiny_bundle, tmp_path, redis_server):
    from service.model_state import ModelStateUpdater, ServingModel
    from service.state import StateStore
    from service.stream import EventStream, StreamWorker

    cfg = _with(service_config(redis_server, tmp_path, bundle=tiny_bundle), embedded_worker=False,
                stream__max_backlog=40, stream__retry_after_s=2)
    users = (3, 4, 5)
    accepted: dict[int, list[dict]] = {u: [] for u in users}
    refused: list[dict] = []
    with live(cfg) as (srv, client):
        statuses = []
        for b in range(12):  # batches of 6: 42 entries reach the bound, so the 8th batch and later are refused
            batch = [_event(b * 6 + j, users[j % 3]) for j in range(6)]
            r = client.post("/v1/events", json={"events": batch}, headers=HEADERS)
            statuses.append(r.status_code)
            if r.status_code == 202:
                for e in batch:
                    accepted[e["user_id"]].append(e)
            else:
                assert r.status_code == 429, r.text
                assert r.headers["retry-after"] == "2" and "max_backlog" in r.json()["detail"]
                refused += batch
        assert statuses == [202] * 7 + [429] * 5, statuses
        m = client.get("/metrics").text
        assert "recsys_events_throttled_total 30.0" in m and "recsys_stream_backlog 42.0" in m
        rclient = redis.Redis.from_url(redis_server)
        stream = EventStream(rclient, cfg.serve)
        assert stream.length() == 42  # refused batches wrote nothing

        # The worker starts: every accepted event is applied exactly once, and the applied entries leave
        # the streams, so ingest resumes.
        worker = StreamWorker(cfg.serve, ModelStateUpdater(ServingModel.from_bundle(tiny_bundle)), client=rclient)
        stats = worker.run(until_idle=True)
        assert stats.applied == 42 and stats.duplicates == 0 and not stats.rejected
        worker.trim()
        assert stream.length() == 0
        store = StateStore(rclient, cfg.serve.state)
        for u in users:
            s = store.summary(u)
            assert s.events_applied == len(accepted[u]) == 14
            got = sorted(int(i) for i in store.read_users([u], "none")[0].sequence["item"])
            assert got == sorted(e["item_id"] for e in accepted[u])  # and none of the refused ones
        assert stream.counters().get("applied") == 42
        r = client.post("/v1/events", json={"events": refused[:6]}, headers=HEADERS)
        assert r.status_code == 202, r.text
        rclient.close()


def test_an_evicting_redis_is_warned_about(tmp_path, caplog):
    from service.redis_conn import warn_if_evicting

    proc, port = start_redis_server(tmp_path / "lru", None, "--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru")
    try:
        client = redis.Redis(port=port)
        log = logging.getLogger("test.evict")
        with caplog.at_level(logging.WARNING, logger="test.evict"):
            assert warn_if_evicting(client, log) == "allkeys-lru"
        assert "noeviction" in caplog.text and "allkeys-lru" in caplog.text
        caplog.clear()
        client.config_set("maxmemory-policy", "noeviction")
        with caplog.at_level(logging.WARNING, logger="test.evict"):
            assert warn_if_evicting(client, log) == "noeviction"
        assert caplog.text == ""
        client.close()
    finally:
        stop(proc)


# ---- a frozen Redis ----------------------------------------------------------------------------------------

def test_frozen_redis_is_503_within_the_request_timeout(tiny_bundle, tmp_path):
    proc, port = start_redis_server(tmp_path / "frozen")
    cfg = _with(service_config(f"redis://127.0.0.1:{port}/0", tmp_path, bundle=tiny_bundle),
                state__request_timeout_s=0.25)
    try:
        with live(cfg) as (srv, client):
            body = {"user_id": 1, "candidates": [CAND]}
            assert client.post("/v1/score", json=body).status_code == 200
            os.kill(proc.pid, signal.SIGSTOP)
            try:
                for method, path, kw in (("POST", "/v1/score", {"json": body}), ("GET", "/readyz", {}),
                                         ("POST", "/v1/events", {"json": {"events": [_event(1, 1)]},
                                                                 "headers": HEADERS}),
                                         ("GET", "/v1/users/1", {})):
                    t0 = time.perf_counter()
                    r = client.request(method, path, **kw)
                    took = time.perf_counter() - t0
                    assert r.status_code == 503, (path, r.text)
                    assert took < 0.8, (path, took)  # 0.25 s, once: was socket_timeout_s 2 s x (1 + 1 retry)
            finally:
                os.kill(proc.pid, signal.SIGCONT)
            deadline = time.monotonic() + 10
            while client.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline, "not ready again after SIGCONT"
                time.sleep(0.1)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        stop(proc)


# ---- request timeouts ----------------------------------------------------------------------------------------

def _read_until_closed(sock, limit_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection -> (bytes, seconds it took)."""
    t0 = time.monotonic()
    sock.settimeout(limit_s)
    got = b""
    while True:
        chunk = sock.recv(65536)  # socket.timeout here: the server kept the connection open
        if not chunk:
            return got, time.monotonic() - t0
        got += chunk


def test_partial_headers_and_partial_bodies_are_cut_off(tiny_bundle, tmp_path):
    import socket
    from urllib.parse import urlparse

    cfg = _with(service_config(None, tmp_path, bundle=tiny_bundle), http__headers_timeout_s=0.5,
                http__body_timeout_s=0.5, embedded_worker=False)
    with live(cfg) as (srv, client):
        addr = (urlparse(srv.url).hostname, urlparse(srv.url).port)
        cases = {
            "silent": b"",
            "half a request line": b"POST /v1/ev",
            "headers without the blank line": b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n",
            "half a body": (b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            b"X-API-Key: " + API_KEY.encode() + b"\r\nContent-Length: 100\r\n\r\n{\"events\": ["),
            "half a chunked body": (b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                    b"X-API-Key: " + API_KEY.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
                                    b"5\r\n{\"eve\r\n"),
        }
        for name, data in cases.items():
            with socket.create_connection(addr) as s:
                s.sendall(data)
                got, took = _read_until_closed(s, 5.0)
                assert got.startswith(b"HTTP/1.1 408"), (name, got[:200])
                assert 0.4 < took < 2.0, (name, took)
        # A kept-alive connection: a whole request is answered, then half of the next one is cut off.
        with socket.create_connection(addr) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(0.3)
            s.sendall(b"GET /heal")
            got, took = _read_until_closed(s, 5.0)
            assert got.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 408" in got, got
        # Slow but within the deadlines is fine.
        with socket.create_connection(addr) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            time.sleep(0.2)
            s.sendall(b"Connection: close\r\n\r\n")
            got, _ = _read_until_closed(s, 5.0)
            assert got.startswith(b"HTTP/1.1 200"), got
        assert client.get("/healthz").status_code == 200


# ---- the embedded Redis after kill -9 ----------------------------------------------------------------------

def _start_service(config, port: int):
    import subprocess
    import sys

    code = ("import os; from recsys.config.http import ServiceConfig; from service.serve import serve; "
            "serve(ServiceConfig.model_validate_json(os.environ['CFG']))")
    cfg = _with(config, http__port=port)
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "CFG": cfg.model_dump_json()},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "service not ready"
        time.sleep(0.2)


def test_a_restarted_service_owns_the_embedded_redis_its_killed_predecessor_left(tiny_bundle, tmp_path):
    import psutil

    from recsys.net import free_port
    from test_service_serve import _redis_servers_in

    data_dir = tmp_path / "redis"
    cfg = service_config(None, tmp_path, bundle=tiny_bundle)
    procs = []
    try:
        first, url = _start_service(cfg, free_port())
        procs.append(first)
        events = [_event(i, 3) for i in range(5)]
        assert httpx.post(f"{url}/v1/events", json={"events": events}, headers=HEADERS).status_code == 202
        deadline = time.monotonic() + 20
        while httpx.get(f"{url}/v1/users/3").json()["history_length"] < 5:
            assert time.monotonic() < deadline, "events not applied"
            time.sleep(0.1)
        [orphan] = _redis_servers_in(data_dir)
        first.kill()
        first.wait()
        time.sleep(0.2)
        assert _redis_servers_in(data_dir) == [orphan]  # the daemonized server outlives its owner

        second, url = _start_service(cfg, free_port())
        procs.append(second)
        assert httpx.get(f"{url}/v1/users/3").json()["history_length"] == 5  # the data is kept
        assert not psutil.pid_exists(orphan) or psutil.Process(orphan).status() == psutil.STATUS_ZOMBIE
        assert len(_redis_servers_in(data_dir)) == 1
        second.send_signal(signal.SIGTERM)
        # uvicorn re-raises the SIGTERM it handled once shut down: -15 after a clean shutdown
        assert second.wait(60) in (0, -signal.SIGTERM), second.stderr.read().decode()[-3000:]
        assert _redis_servers_in(data_dir) == []  # no server left behind
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for pid in _redis_servers_in(data_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# ---- one model version across processes ------------------------------------------------------------------

def test_a_reload_sent_to_one_worker_reaches_every_worker_and_the_stream_worker(tiny_bundle, tmp_path, redis_server):
    import subprocess
    import sys

    from recsys.bundle import load_bundle
    from recsys.net import free_port
    from service.model_sync import ModelSync

    torch.manual_seed(1)
    ecfg = ExperimentConfig(data="x", model=ModelConfig(max_len=16, top_k=4, dim_rep=4, dim_att=4, mlp=[8]))
    other = str(export_bundle(build_model(ecfg.model, 200, 5), ecfg, tmp_path / "other", metrics={}))
    old_v, new_v = load_bundle(tiny_bundle).version, load_bundle(other).version
    assert old_v != new_v
    cfg = _with(service_config(redis_server, tmp_path, bundle=tiny_bundle), embedded_worker=False,
                reload_poll_s=0.25, http__port=free_port())
    (tmp_path / "serve.yaml").write_text(cfg.model_dump_json())
    url = f"http://127.0.0.1:{cfg.http.port}"
    code = ("import os; from recsys.config.http import ServiceConfig; from service.serve import serve; "
            "serve(ServiceConfig.model_validate_json(os.environ['CFG']), workers=2)")
    service = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "CFG": cfg.model_dump_json()},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    worker = subprocess.Popen([sys.executable, "-m", "recsys.cli", "stream-worker", "--config",
                               str(tmp_path / "serve.yaml"), "--consumer", "w1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    rclient = redis.Redis.from_url(redis_server)
    sync = ModelSync(rclient, cfg.serve.state.key_prefix, "test")

    def versions() -> list:
        return sorted(sync.served(max_age_s=2.0).values())

    def wait(cond, what: str, timeout_s: float) -> float:
        t0 = time.monotonic()
        while not cond():
            for p in (service, worker):
                assert p.poll() is None, p.stderr.read().decode()[-3000:]
            assert time.monotonic() - t0 < timeout_s, f"{what}: {sync.served(max_age_s=2.0)}"
            time.sleep(0.05)
        return time.monotonic() - t0

    try:
        wait(lambda: versions() == [old_v] * 3, "2 http workers + 1 stream worker reporting", 90)
        r = httpx.post(f"{url}/v1/admin/reload", json={"bundle": other}, headers=HEADERS, timeout=60)
        assert r.status_code == 200 and r.json()["model_version"] == new_v, r.text
        took = wait(lambda: versions() == [new_v] * 3, "every process on the new version", 10)
        assert took < 3.0, took  # reload_poll_s = 0.25
        for _ in range(10):  # whichever worker answers
            body = httpx.get(f"{url}/readyz").json()
            assert body["model_version"] == new_v and body["desired_version"] == new_v, body
            s = httpx.post(f"{url}/v1/score", json={"user_id": 9, "candidates": [CAND]}).json()
            assert s["model_version"] == new_v
        # The separate stream worker writes state for the new version.
        assert httpx.post(f"{url}/v1/events", json={"events": [_event(7, 9)]}, headers=HEADERS).status_code == 202
        wait(lambda: httpx.get(f"{url}/v1/users/9").json()["state_version"] == new_v, "state of the new version", 10)
    finally:
        for p in (worker, service):
            p.send_signal(signal.SIGTERM)
        for p in (worker, service):
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        rclient.close()
