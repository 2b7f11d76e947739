"""A served history's raw -> dense id mapping through the vocabulary's tables (`kernels/id_lookup`, used by
recsys.vocab.RawIndex): the hash table (ids too large for a direct table: catalogue ids of 10^9 and up) and the
direct table (small ids), each in C against its numpy form, on one thread: ms per call, ns per id, their ratio.

    .venv/bin/python benchmarks/id_lookup.py [--quick] [--out results/id_lookup.json]

Ids as the service reads them: the item column of the stored records (29-byte rows, newest first: a strided view,
read in place), drawn uniformly from a vocabulary of `vocab` ids (random 53-bit ids for the hash table; ids
below max(3M, 4 vocab) for the direct table), 1% unknown. Paths interleaved round by round so load from other processes hits
them alike; the results are checked equal.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _machine import add_out_arg, emit  # noqa: E402

import numpy as np  # noqa: E402

from kernels.id_lookup import cpu  # noqa: E402
from recsys.vocab import RawIndex  # noqa: E402
from service.state import SEQ_DTYPE  # noqa: E402


def point(n: int, vocab: int, reps: int, rng: np.random.Generator) -> dict:
    big = np.sort(rng.choice(2**53 - 1, vocab, replace=False)).astype(np.int64)
    small = np.sort(rng.choice(max(3_000_000, 4 * vocab), vocab, replace=False)).astype(np.int64)
    hashed, direct = RawIndex(big), RawIndex(small)
    assert hashed.table is None and direct.table is not None
    pick = rng.integers(0, vocab, n)
    unknown = rng.random(n) < 0.01
    seqs = {}
    for name, ids in (("hash", big), ("direct", small)):
        seq = np.zeros(n, SEQ_DTYPE)
        seq["item"] = np.where(unknown, rng.integers(0, 2**53 - 1, n), ids[pick])
        seqs[name] = seq[::-1]["item"]
    paths = {
        "hash_c": lambda: hashed.dense(seqs["hash"]),
        "hash_numpy": lambda: _numpy(lambda: hashed.dense(seqs["hash"])),
        "direct_c": lambda: direct.dense(seqs["direct"]),
        "direct_numpy": lambda: _numpy(lambda: direct.dense(seqs["direct"])),
    }
    assert np.array_equal(paths["hash_c"](), paths["hash_numpy"]())
    assert np.array_equal(paths["direct_c"](), paths["direct_numpy"]())
    ts = {name: [] for name in paths}
    for _ in range(reps):
        for name, f in paths.items():
            t = time.perf_counter()
            f()
            ts[name].append(time.perf_counter() - t)
    med = {name: statistics.median(v) for name, v in ts.items()}
    return {"L": n, "vocab": vocab, "reps": reps, "hash_table_slots": len(hashed.keys),
            **{f"{name}_ms": round(s * 1e3, 4) for name, s in med.items()},
            **{f"{name}_ns_per_id": round(s / n * 1e9, 2) for name, s in med.items()},
            "ratio_numpy_to_c_hash": round(med["hash_numpy"] / med["hash_c"], 2),
            "ratio_numpy_to_c_direct": round(med["direct_numpy"] / med["direct_c"], 2)}


def _numpy(f):
    os.environ[cpu.SWITCH_ENV] = "0"
    try:
        return f()
    finally:
        del os.environ[cpu.SWITCH_ENV]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer points and repetitions")
    add_out_arg(ap, "id_lookup")
    args = ap.parse_args(argv)
    assert cpu.load() is not None, "the id lookup kernel did not build"
    rng = np.random.default_rng(0)
    grid = [(10_000, 100_000), (100_000, 100_000)] if args.quick else \
        [(10_000, 100_000), (100_000, 100_000), (100_000, 3_000_000), (1_000_000, 3_000_000)]
    rows = []
    for n, vocab in grid:
        rows.append(point(n, vocab, max(5, min(200, int(2e7 / n))) // (4 if args.quick else 1), rng))
        print(rows[-1], file=sys.stderr)
    emit({"benchmark": "id_lookup", "inputs": {"record_bytes": SEQ_DTYPE.itemsize, "unknown_share": 0.01,
                                               "threads": 1}, "results": rows}, args.out)


if __name__ == "__main__":
    main()
