"""Synthetic lifelong generator: events/s and peak memory for N events generated and written to Parquet.

The generation runs in a child process so its peak RSS (ru_maxrss of the child) is the generator's own,
not this script's. The comparison measured in the same run is the write alone: the same events.parquet
re-written from memory by pyarrow, i.e. how close generation gets to the cost of just writing the bytes.

    python benchmarks/data_generator.py [--events N] [--repeats R] [--out results/data_generator.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _machine import add_out_arg, emit  # noqa: E402

MEAN_EVENTS = 1000

CHILD = """
import json, resource, sys, time
from recsys.config.data import EventsPerUser, SyntheticConfig
from recsys.data.synthetic import generate
cfg = SyntheticConfig(n_users=int(sys.argv[1]), events_per_user=EventsPerUser(mean=float(sys.argv[2])), seed=0)
t = time.perf_counter()
meta = generate(cfg, sys.argv[3])
dt = time.perf_counter() - t
print(json.dumps({"seconds": dt, "events": meta["n_events"], "rows": meta["rows"],
                  "far_positive_share": meta["far_positive_share"],
                  "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""

WRITE_ONLY = """
import json, sys, time
import pyarrow.parquet as pq
t = pq.read_table(sys.argv[1])
s = time.perf_counter()
pq.write_table(t, sys.argv[2])
print(json.dumps({"seconds": time.perf_counter() - s, "events": t.num_rows}))
"""


def child(code: str, *args: str) -> dict:
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    return json.loads(r.stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--repeats", type=int, default=1)
    add_out_arg(ap, "data_generator")
    args = ap.parse_args()
    n_users = max(1, round(args.events / MEAN_EVENTS))
    runs, writes = [], []
    with tempfile.TemporaryDirectory(prefix="recsys-gen-") as tmp:
        for _ in range(args.repeats):
            runs.append(child(CHILD, str(n_users), str(MEAN_EVENTS), f"{tmp}/data"))
            writes.append(child(WRITE_ONLY, f"{tmp}/data/events.parquet", f"{tmp}/copy.parquet"))
        size = sum(p.stat().st_size for p in Path(f"{tmp}/data").glob("*.parquet"))
    events = runs[0]["events"]
    gen_rate = statistics.median(r["events"] / r["seconds"] for r in runs)
    write_rate = statistics.median(w["events"] / w["seconds"] for w in writes)
    peak_gb = max(r["peak_rss_kb"] for r in runs) / 1024**2  # Linux reports KiB
    emit({
        "benchmark": "data_generator",
        "inputs": {"events_requested": args.events, "n_users": n_users, "mean_events_per_user": MEAN_EVENTS,
                   "repeats": args.repeats, "seed": 0},
        "events": events,
        "rows": runs[0]["rows"],
        "far_positive_share": round(runs[0]["far_positive_share"], 4),
        "parquet_bytes": size,
        "events_per_s": round(gen_rate),
        "seconds": round(statistics.median(r["seconds"] for r in runs), 2),
        "peak_rss_gb": round(peak_gb, 3),
        "write_only_events_per_s": round(write_rate),
        "ratio_to_write_only": round(gen_rate / write_rate, 3),
        "target_peak_rss_gb": 2.0,
        "meets_target": peak_gb < 2.0,
        "parent_peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3),
    }, args.out)


if __name__ == "__main__":
    main()
