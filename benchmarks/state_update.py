"""Batched streaming-state updates: events/s when one call folds one event for each of U users.

For U in (1, 100, 10,000) users per call and for Aaren, Titans and both (one `step` each per call),
over `--calls` calls per measurement (median of `--repeats`). Titans users start staggered (user i has
i mod chunk_size events buffered), so every call commits chunks for ~1/chunk_size of the users, as in
a real stream; Titans steps in place (the stream worker owns its batch). Every figure is measured with
1 and with 2 torch threads: on a shared 2-core machine intra-op threading can cost more than it gives.
Also: bytes of encoded state per user. The comparison measured in the same run is U = 1 (one user per
call, what a per-event loop would get): `speedup_vs_1_user`.

    python benchmarks/state_update.py [--quick] [--threads 1,2] [--out results/state_update.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _machine import add_out_arg, emit  # noqa: E402

from recsys.modules.aaren import Aaren  # noqa: E402
from recsys.modules.state_codec import encode, split, to_tensors  # noqa: E402
from recsys.modules.titans import NeuralMemory  # noqa: E402


def staggered_titans_state(mem: NeuralMemory, users: int):
    """Each user i has i mod chunk_size events in its open chunk (zero events committed)."""
    b = mem.chunk_size
    lengths = torch.arange(users) % b
    return mem.forward_state(torch.randn(users, b, mem.d_in), lengths)


def measure(aaren, mem, which: str, users: int, calls: int, repeats: int) -> float:
    events = torch.randn(calls, users, aaren.d_in)
    active = torch.ones(users, dtype=torch.bool)
    rates = []
    for _ in range(repeats):
        a_state = aaren.init_state(users)
        t_state = staggered_titans_state(mem, users)
        start = time.perf_counter()
        for c in range(calls):
            if which in ("aaren", "both"):
                a_state = aaren.step(a_state, events[c], active)
            if which in ("titans", "both"):
                t_state = mem.step(t_state, events[c], active, inplace=True)
        rates.append(users * calls / (time.perf_counter() - start))
    return statistics.median(rates)


def state_bytes(state) -> dict:
    one = split(state)[0]
    return {"encoded": len(encode(one, "bench")), "raw_tensors": sum(t.numel() * t.element_size() for t in to_tensors(one).values())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="users 1, 100, 1000 and fewer calls")
    ap.add_argument("--threads", default="1,2", help="comma-separated torch thread counts to measure")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--d-in", type=int, default=48, help="event embedding dim (3 fields x 16)")
    ap.add_argument("--chunk", type=int, default=16)
    add_out_arg(ap, "state_update")
    args = ap.parse_args()
    torch.manual_seed(0)
    aaren = Aaren(args.d_in, d_model=32, n_heads=2, n_layers=1, recency_slope=True).eval()
    mem = NeuralMemory(args.d_in, d_key=32, d_hidden=32, depth=2, chunk_size=args.chunk).eval()
    user_counts = (1, 100, 1000) if args.quick else (1, 100, 10_000)
    # at least two full chunks per user, more calls where calls are cheap
    calls = {u: max(2 * args.chunk, (64 if args.quick else 256) // max(1, u // 100)) for u in user_counts}
    threads = [int(t) for t in args.threads.split(",")]
    results = {}
    with torch.inference_mode():
        for n_threads in threads:
            torch.set_num_threads(n_threads)
            results[str(n_threads)] = {
                which: {str(u): round(measure(aaren, mem, which, u, calls[u], args.repeats)) for u in user_counts}
                for which in ("aaren", "titans", "both")}
        sizes = {"aaren": state_bytes(aaren.init_state(2)), "titans": state_bytes(mem.init_state(2))}
    top = str(user_counts[-1])
    best_threads = max(results, key=lambda t: results[t]["both"][top])
    best = results[best_threads]["both"][top]
    out = {
        "benchmark": "state_update",
        "inputs": {"users_per_call": list(user_counts), "calls": {str(u): c for u, c in calls.items()},
                   "repeats": args.repeats, "d_in": args.d_in, "torch_threads": threads,
                   "aaren": {"d_model": 32, "n_heads": 2, "n_layers": 1, "recency_slope": True},
                   "titans": {"d_key": 32, "d_hidden": 32, "depth": 2, "chunk_size": args.chunk,
                              "start": "staggered (user i has i mod chunk events buffered)"}},
        "events_per_s_median": results,
        "speedup_vs_1_user": {t: {w: round(r[top] / r["1"], 1) for w, r in res.items()} for t, res in results.items()},
        "state_bytes_per_user": sizes,
        "target": {"events_per_s_both_per_process": 50_000, "users_per_call": int(top), "torch_threads": int(best_threads),
                   "measured": best, "met": best >= 50_000},
    }
    emit(out, args.out)


if __name__ == "__main__":
    main()
