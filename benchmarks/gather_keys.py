"""The serving search's key gather (`kernels/gather_keys`, recsys.models.attention.stage1_from_tables) against
torch's form, on one thread: ms per call, their ratio, and the bytes the kernel moves per second as a share of
a memory bandwidth measured in the same run.

    .venv/bin/python benchmarks/gather_keys.py [--quick] [--out results/gather_keys.json]

Keys as DARE serves them: item rows (16 floats) of a table of `rows` rows at uniform random ids, category rows
(16 floats, 1000 rows) at random ids, and the position number per position-table row (L + 1 rows) at the
recency rows 1..L. Each point is timed as served (the output allocated per call: at 1M events its page
faults are a large share) and into a preallocated output (the gather alone); paths interleaved round by
round so load from other processes hits them alike. The prefetch distance sweep times the kernel alone.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _machine import add_out_arg, emit  # noqa: E402

import torch  # noqa: E402

from kernels.gather_keys import cpu, reference  # noqa: E402

D, CATE_ROWS = 16, 1_000
COPY_BYTES = 256 << 20
AHEADS = (0, 4, 8, 16, 32, 64)


def _time(fns: dict, reps: int) -> dict:
    """Median and min ms of each fn, one warm-up call each, then `reps` interleaved rounds."""
    for f in fns.values():
        f()
    ts = {name: [] for name in fns}
    for _ in range(reps):
        for name, f in fns.items():
            t0 = time.perf_counter()
            f()
            ts[name].append(time.perf_counter() - t0)
    return {name: {"median_ms": round(statistics.median(x) * 1e3, 3), "min_ms": round(min(x) * 1e3, 3)}
            for name, x in ts.items()}


def copy_bandwidth(reps: int) -> float:
    """Bytes/s (read + written) of one large single-thread copy between preallocated buffers: the peak the
    gather's figures are shares of."""
    src, dst = torch.ones(COPY_BYTES // 4), torch.zeros(COPY_BYTES // 4)
    t = _time({"copy": lambda: dst.copy_(src)}, reps)["copy"]["min_ms"]
    return 2 * COPY_BYTES / (t / 1e3)


def point(L: int, rows: int, reps: int, peak: float, g: torch.Generator) -> dict:
    tables = [torch.randn(rows, D, generator=g), torch.randn(CATE_ROWS, D, generator=g), torch.randn(L + 1, generator=g)]
    ids = [torch.randint(0, rows, (L,), generator=g), torch.randint(0, CATE_ROWS, (L,), generator=g),
           torch.arange(1, L + 1)]
    want = reference.gather_keys(tables, ids)
    assert torch.equal(cpu.gather_keys(tables, ids), want)
    out = torch.zeros_like(want)
    t = _time({
        "torch": lambda: reference.gather_keys(tables, ids),
        "kernel": lambda: cpu.gather_keys(tables, ids),
        "torch_prealloc": lambda: reference.gather_keys(tables, ids, out),
        "kernel_prealloc": lambda: cpu.gather_keys(tables, ids, out=out),
    }, reps)
    sweep = _time({a: (lambda a=a: cpu.gather_keys(tables, ids, a, out)) for a in AHEADS}, reps)
    # what a gather must move: the ids, each row read (a 64-byte line per random row, 4 bytes per position
    # number, read in order) and the output written
    moved = L * (3 * 8 + 2 * D * 4 + 4) + out.numel() * 4
    gbs = lambda ms: moved / (ms / 1e3)  # noqa: E731
    return {
        "L": L, "item_rows": rows, "ms": t,
        "ratio_median": round(t["torch"]["median_ms"] / t["kernel"]["median_ms"], 2),
        "ratio_prealloc_median": round(t["torch_prealloc"]["median_ms"] / t["kernel_prealloc"]["median_ms"], 2),
        "bytes_moved": moved,
        "kernel_prealloc_bytes_per_s": round(gbs(t["kernel_prealloc"]["min_ms"])),
        "kernel_prealloc_share_of_copy_peak": round(gbs(t["kernel_prealloc"]["min_ms"]) / peak, 3),
        "torch_prealloc_share_of_copy_peak": round(gbs(t["torch_prealloc"]["min_ms"]) / peak, 3),
        "prefetch_ahead_ms": {str(a): v for a, v in sweep.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    add_out_arg(ap, "gather_keys")
    a = ap.parse_args()
    torch.set_num_threads(1)
    assert cpu.load() is not None, "the kernel did not build (no C compiler?)"
    g = torch.Generator().manual_seed(0)
    peak = copy_bandwidth(5 if a.quick else 15)
    points = []
    for L in (10_000, 100_000, 1_000_000):
        for rows in (100_000, 1_000_000):
            reps = max(3, (2_000_000 // L) // (4 if a.quick else 1))
            points.append(point(L, rows, min(reps, 60), peak, g))
    emit({
        "benchmark": "gather_keys",
        "inputs": {"fields": "item [rows, 16] random ids, category [1000, 16] random ids, position number [L + 1] "
                             "at rows 1..L", "threads": 1, "default_ahead": cpu.AHEAD},
        "copy_peak_bytes_per_s": round(peak),
        "points": points,
    }, a.out)


if __name__ == "__main__":
    main()
