"""Erasing a user (DELETE /v1/users/{id}) and the TTL of inactive users, against a real redis-server: after an
erase and its tombstone's lifetime no key of the user is left (SCAN of the whole keyspace), events of the user
accepted before the erase never bring it back, and events after it start a new history."""

from __future__ import annotations

import time

import pytest
import redis
import torch

from recsys.bundle import export_bundle
from recsys.config.experiment import ExperimentConfig
from recsys.config.model import ModelConfig
from recsys.models import build_model
from service.model_state import ModelStateUpdater, ServingModel
from service.state import Event, StateStore
from service.stream import EventStream, StreamWorker
from test_service_support import API_KEY, live, service_config

T0 = 1_700_000_000_000


def _model(seed: int = 0):
    torch.manual_seed(seed)
    cfg = ExperimentConfig(data="benchmarks/ml-latest-small",
                           model=ModelConfig(max_len=16, top_k=4, dim_rep=8, dim_att=4, mlp=[16], aaren=True))
    return cfg, build_model(cfg.model, 50, 6).eval()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    cfg, model = _model()
    return str(export_bundle(model, cfg, tmp_path_factory.mktemp("erase") / "b", metrics={}))


def _events(user: int, n: int, start: int = 0, tag: str = "e") -> list[dict]:
    return [{"event_id": f"{tag}{user}-{j}", "user_id": user, "item_id": 1 + (user * 7 + j) % 40,
             "category_id": 1 + j % 5, "action": 0, "ts": T0 + 1000 * (start + j)} for j in range(n)]


def _user_keys(client: redis.Redis, prefix: str, user: int) -> list[str]:
    """Every key of the user on the server, by SCAN of the whole keyspace."""
    tag = f"{{u:{user}}}"
    return sorted(k.decode() for k in client.scan_iter(count=1000) if k.decode().startswith(prefix) and tag in k.decode())


def test_erase_leaves_no_key_and_earlier_events_do_not_bring_the_user_back(bundle, redis_server, tmp_path):
    cfg = service_config(redis_server, tmp_path, bundle=bundle)
    cfg = cfg.model_copy(update={"embedded_worker": False, "serve": cfg.serve.model_copy(update={
        "state": cfg.serve.state.model_copy(update={"erase_tombstone_s": 1})})})
    prefix = cfg.serve.state.key_prefix
    client = redis.Redis.from_url(redis_server)
    serving = ServingModel.from_bundle(bundle)
    worker = StreamWorker(cfg.serve, ModelStateUpdater(serving), client=client, consumer="test-worker")
    key = {"X-API-Key": API_KEY}
    with live(cfg) as (_, http):
        assert http.post("/v1/events", json={"events": _events(1, 30) + _events(2, 20)}, headers=key).status_code == 202
        worker.run(until_idle=True)
        # a second model version's state and block index for user 1, and a dead letter of user 1 (an event
        # older than its dedup floor)
        _, other = _model(seed=1)
        store = StateStore(client, cfg.serve.state)
        assert store.rebuild(ModelStateUpdater(ServingModel(other, "erase-v2", 50, 6, 16)), [1]) == 1
        late = {**_events(1, 1, tag="late")[0], "ts": T0 - 8 * 24 * 3600 * 1000}
        assert http.post("/v1/events", json={"events": [late]}, headers=key).status_code == 202
        worker.run(until_idle=True)
        assert len(EventStream(client, cfg.serve).dead_letters()) == 1
        before = _user_keys(client, prefix, 1)
        assert len([k for k in before if ":st:" in k]) == 2 and len([k for k in before if ":ix:" in k]) == 2
        assert all(client.pttl(k) == -1 for k in before)  # user_ttl_s 0: nothing expires
        user2 = _user_keys(client, prefix, 2)

        # events of user 1 accepted but not applied yet when the erase comes
        assert http.post("/v1/events", json={"events": _events(1, 12, start=30)}, headers=key).status_code == 202
        assert http.delete("/v1/users/1").status_code == 401
        r = http.delete("/v1/users/1", headers=key)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["keys_deleted"] == len(before) and body["dead_letters_deleted"] == 1
        assert _user_keys(client, prefix, 1) == [f"{prefix}{{u:1}}:erased"]  # the tombstone only
        assert client.get(f"{prefix}{{u:1}}:erased").decode() == body["stream_position"]
        assert EventStream(client, cfg.serve).dead_letters() == []

        applied = worker.totals.applied
        stats = worker.run(until_idle=True)  # cumulative
        assert stats.rejected["erased"] == 12 and stats.applied == applied
        assert _user_keys(client, prefix, 1) == [f"{prefix}{{u:1}}:erased"]
        assert http.get("/v1/users/1").json()["history_length"] == 0
        assert EventStream(client, cfg.serve).counters()["rejected:erased"] == 12
        assert EventStream(client, cfg.serve).dead_letters() == []  # dropped events leave no copy

        time.sleep(1.2)  # the tombstone's lifetime
        assert _user_keys(client, prefix, 1) == []
        assert _user_keys(client, prefix, 2) == user2 and http.get("/v1/users/2").json()["history_length"] == 20

        # after the erase: a new history, with only the new events
        assert http.post("/v1/events", json={"events": _events(1, 5, start=100, tag="new")}, headers=key).status_code == 202
        worker.run(until_idle=True)
        assert http.get("/v1/users/1").json()["history_length"] == 5
        # idempotent, and a user never seen is fine
        assert http.delete("/v1/users/999", headers=key).json()["keys_deleted"] == 0
        assert 'recsys_users_erased_total 2.0' in http.get("/metrics").text
    client.close()


def test_an_erase_between_planning_and_applying_is_a_conflict(redis_server, tmp_path):
    """The apply script compares the tombstone with the one the plan saw: an erase that lands between the
    snapshot and the write (here: of a user with nothing stored yet, rev 0 both times) sends the batch back
    to planning, which then drops the erased events."""
    from recsys.config.serve import StateStoreConfig

    client = redis.Redis.from_url(redis_server)
    cfg = StateStoreConfig(redis_url=redis_server, key_prefix=f"t-race-{time.time_ns()}:", index_block=0)
    store = StateStore(client, cfg)
    _, model = _model()
    updater = ModelStateUpdater(ServingModel(model, "race-v1", 50, 6, 16))
    events = [Event(e["event_id"], 7, e["item_id"], e["category_id"], 0, e["ts"], stream_id=f"{1000 + j}-0")
              for j, e in enumerate(_events(7, 4))]
    plans = store._plan(updater, "race-v1", {7: events})
    store.erase(7, "1002-0")  # covers the first three events
    from service.state import ApplyReport

    assert store._commit("race-v1", plans, ApplyReport()) == [7]  # a conflict: nothing written
    assert _user_keys(client, cfg.key_prefix, 7) == [f"{cfg.key_prefix}{{u:7}}:erased"]
    report = store.apply(updater, events)
    assert report.applied == 1 and [e.event_id for e in report.erased] == ["e7-0", "e7-1", "e7-2"]
    assert store.read_users([7], "race-v1")[0].sequence["ts"].tolist() == [events[3].ts]
    client.close()


def test_inactive_users_expire_every_key_at_once(redis_server):
    from recsys.config.serve import StateStoreConfig

    client = redis.Redis.from_url(redis_server)
    cfg = StateStoreConfig(redis_url=redis_server, key_prefix=f"t-ttl-{time.time_ns()}:", user_ttl_s=2,
                           seq_cap=20, seq_slack=4)
    store = StateStore(client, cfg)
    _, model = _model()
    serving = ServingModel(model, "ttl-v1", 50, 6, 16)
    evs = [Event(e["event_id"], 3, e["item_id"], e["category_id"], 0, e["ts"]) for e in _events(3, 30)]
    t0 = time.monotonic()
    store.apply(ModelStateUpdater(serving), evs[:25])
    _, other = _model(seed=1)
    store.rebuild(ModelStateUpdater(ServingModel(other, "ttl-v2", 50, 6, 16)), [3])  # another version's keys
    time.sleep(0.3)
    store.apply(ModelStateUpdater(serving), evs[25:])  # activity: every key's expiry moves on, together
    t1 = time.monotonic()
    keys = _user_keys(client, cfg.key_prefix, 3)
    tag = f"{cfg.key_prefix}{{u:3}}:"
    assert {k[len(tag):] for k in keys} >= {"meta", "seq", "dedup", "st:ttl-v1", "ix:ttl-v1", "st:ttl-v2", "ix:ttl-v2"}
    expiry = {k: client.pexpiretime(k) for k in keys}
    main = {k: v for k, v in expiry.items() if "ttl-v2" not in k}
    assert len(set(main.values())) == 1, expiry  # one absolute expiry for the keys an apply writes
    ttl = client.pttl(f"{cfg.key_prefix}{{u:3}}:meta")
    assert 2000 - 1000 * (time.monotonic() - t1) - 5 < ttl <= 2000
    # the other version's state and index took the meta's expiry when they were written (that of the first
    # apply; the last one leaves them stale anyway): they go a little earlier, never later
    v2 = {v for k, v in expiry.items() if "ttl-v2" in k}
    assert len(v2) == 1 and 0 < next(iter(main.values())) - v2.pop() <= 1000 * (t1 - t0) + 5
    time.sleep(2.5)
    assert _user_keys(client, cfg.key_prefix, 3) == []
    assert store.read_users([3], "ttl-v1")[0].sequence.size == 0
    client.close()
