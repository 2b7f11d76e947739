"""The served search alone, on the kernel's threads over an idle core, and as the lender chooses (retrieval.lend),
measured in one run.

Serving layout, DARE's serving width (d = 33: 32 semantic dims and the folded position column), k = 20, one
torch thread (the benchmark server's), C candidates against one history of L events. For each point, in
interleaved rounds so that load from other processes hits every way alike: the fused kernel on one thread
(`alone`, what a batch runs when no core is free), on two (`team`: the kernel's threads take chunks of its
blocks and rows in turn; the same result bit for bit, checked here) and `CoreLender.search` (`lender`: team or
alone by the time per unit of work it measured lately). Each point twice: with the second core idle, and with
another process spinning on it (`busy`: what the lender's count of batches cannot see), where the team waits
for a member kept off its core and the lender should learn to search alone.

    .venv/bin/python benchmarks/lend_search.py [--quick] [--out results/lend_search.json]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels.topk_attention import cpu as fused  # noqa: E402
from retrieval import lend  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import add_out_arg, emit  # noqa: E402

K, D, SEGMENTS = 20, 33, [32, 1]


def point(C: int, L: int, reps: int, busy: bool) -> dict:
    gen = torch.Generator().manual_seed(C * 7 + L)
    q, x = torch.randn(C, D, generator=gen), torch.randn(L, D, generator=gen)
    alone = lambda: fused.topk_fused(q, x, L, K, SEGMENTS, threads=1)  # noqa: E731
    team = lambda: fused.topk_fused(q, x, L, K, SEGMENTS, threads=2)   # noqa: E731
    lender = lend.CoreLender(cores=2)

    def lent():   # what dispatch.topk does: the lender's search, or the kernel as before where it does not lend
        with lender.scoring():
            out = lender.search(q, x, L, K, SEGMENTS)
        return alone() if out is None else out

    want, got = alone(), team()
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    spinner = None
    try:
        if busy:   # another process on the machine: the lender counts the core free, the OS shares it
            spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            time.sleep(0.2)
        times = {"alone": [], "team": [], "lender": []}
        for _ in range(reps):
            for name, fn in (("alone", alone), ("team", team), ("lender", lent)):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    finally:
        if spinner:
            spinner.kill()
            spinner.wait()
    med = {name: statistics.median(v) for name, v in times.items()}
    return {"C": C, "L": L, "second_core_busy": busy, "reps": reps,
            **{f"{name}_ms": round(s * 1e3, 4) for name, s in med.items()},
            "ratio_alone_to_team": round(med["alone"] / med["team"], 3),
            "ratio_alone_to_lender": round(med["alone"] / med["lender"], 3),
            "lender_searches": {"team": lender.searches[True], "alone": lender.searches[False]},
            "lends_by_rule": C * L * D >= lend.SPLIT_MIN_WORK}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer points and repetitions")
    add_out_arg(ap, "lend_search")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    Ls = [10_000, 100_000] if args.quick else [1_000, 4_000, 10_000, 30_000, 100_000]
    Cs = [200] if args.quick else [20, 200]
    rows = []
    for busy in (False, True):
        for C in Cs:
            for L in Ls:
                reps = max(2 * lend.EXPLORE, min(200, int(2e9 / (C * L * D))))
                rows.append(point(C, L, reps // (2 if args.quick else 1), busy))
                print(rows[-1], file=sys.stderr)
    emit({"benchmark": "lend_search",
          "inputs": {"d": D, "k": K, "segments": SEGMENTS, "torch_threads": 1, "split_min_work": lend.SPLIT_MIN_WORK,
                     "explore": lend.EXPLORE, "weight": lend.WEIGHT, "pass1_bits_C200_L100k": fused.pass1_bits(200, D, length=100_000)},
          "results": rows}, args.out)


if __name__ == "__main__":
    main()
