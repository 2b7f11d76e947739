"""Batch assembly samples/s at L = 200 and 2,000 on the real benchmark (one core), against a per-row
Python loop measured in the same run; plus the synthetic generator's events/s and peak memory for
10M events (benchmarks/data_generator.py, run as a child process so its peak RSS is its own).

    python benchmarks/data_pipeline.py [--quick] [--events N] [--out results/data_pipeline.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _machine import add_out_arg, emit  # noqa: E402

from recsys.data.batch import HistoryBatch  # noqa: E402
from recsys.data.sequences import assemble, batch_rows, load_dataset  # noqa: E402
from recsys.paths import benchmark_dir  # noqa: E402


def per_row_loop(ds, s, rows, L):
    """The obvious implementation: one Python slice per row, building the same HistoryBatch."""
    B = len(rows)
    item, cate, pos = (np.zeros((B, L), np.int64) for _ in range(3))
    n = np.zeros(B, np.int64)
    for i, r in enumerate(rows):
        a, p = ds.store.offsets[s.user[r]], s.pos[r]
        h = slice(max(p - L, 0) + a, p + a)
        n[i] = h.stop - h.start
        item[i, : n[i]] = ds.store.item[h][::-1]
        cate[i, : n[i]] = ds.store.cate[h][::-1]
        pos[i, : n[i]] = np.arange(1, n[i] + 1)
    ids = (s.user[rows].astype(np.int64), s.item[rows].astype(np.int64), s.cate[rows].astype(np.int64))  # loaded as int32
    return HistoryBatch(*(torch.from_numpy(x) for x in (*ids, item, cate, pos, n, s.label[rows])))


def measure(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        n = fn()
        times.append(n / (time.perf_counter() - t))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--events", type=int, default=10_000_000)
    add_out_arg(ap, "data_pipeline")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ds = load_dataset(benchmark_dir())
    s = ds.splits["train"]
    repeats = 1 if args.quick else 3
    assembly = {}
    for L in (200, 2000):
        def vectorised():
            n = 0
            for rows in batch_rows(len(s), 2048, shuffle=True, seed=0):
                n += len(assemble(ds.store, s, rows, L))
            return n

        sub = np.random.default_rng(0).permutation(len(s))[:20_000]

        def loop():
            for a in range(0, len(sub), 2048):
                per_row_loop(ds, s, sub[a : a + 2048], L)
            return len(sub)

        fast, slow = measure(vectorised, repeats), measure(loop, repeats)
        assembly[f"L={L}"] = {"samples_per_s": round(fast), "per_row_loop_samples_per_s": round(slow), "ratio": round(fast / slow, 2)}

    events = 200_000 if args.quick else args.events
    gen = subprocess.run([sys.executable, str(Path(__file__).parent / "data_generator.py"), "--events", str(events)],
                         capture_output=True, text=True)
    generator = json.loads(gen.stdout) if gen.returncode == 0 else {"error": gen.stderr.strip().splitlines()[-1:]}
    emit({
        "benchmark": "data_pipeline",
        "inputs": {"dataset": "ml-latest-small", "batch_size": 2048, "threads": 1, "repeats": repeats},
        "batch_assembly": assembly,
        "generator": generator,
        "targets": {"assembly_L200_samples_per_s": 50_000, "generator_peak_rss_gb": 2.0},
    }, args.out)


if __name__ == "__main__":
    main()
