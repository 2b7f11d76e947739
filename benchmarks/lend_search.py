"""The served search with and without an idle core lent to it (retrieval.lend), measured in one run.

Serving layout, DARE's serving width (d = 33: 32 semantic dims and the folded position column), k = 20, one
torch thread (the benchmark server's), C candidates against one history of L events. For each point, in
interleaved rounds so that load from other processes hits both alike: the fused kernel on this thread alone
(`whole`, what a batch runs when no core is free) and `CoreLender.search` (`lent`: the kernel's chunks taken
in turn by this thread and the lent one, the same result bit for bit; checked here). Reports medians, the ratio
whole / lent, how often the lent thread got into the search, and whether the size rule (lend.worth_lending)
lends there, so the rule can be read against the crossover on this machine. Also the same with the lent core
busy (`busy`: another process spinning, so the lent thread shares a core with it and this thread takes the
chunks it does not): what a batch pays when the lender's count of idle cores is wrong.

`--gather`: the same for the search's key gather instead (`CoreLender.gather`, kernels.gather_keys: L events'
keys of width 33 from a 100k-row item table, a 1k-row category table and a per-row position number, the
serving benchmark's tables), against lend.worth_lending_gather's rule; 32 MB written before each call, so the
tables come from memory as in a request (after its Redis read and the last request's search).

    .venv/bin/python benchmarks/lend_search.py [--quick] [--gather] [--out results/lend_search.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import subprocess
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels.gather_keys import cpu as gather  # noqa: E402
from kernels.topk_attention import cpu as fused  # noqa: E402
from retrieval import lend  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import add_out_arg, emit  # noqa: E402

K, D, SEGMENTS = 20, 33, [32, 1]


def point(C: int, L: int, reps: int, busy: bool) -> dict:
    gen = torch.Generator().manual_seed(C * 7 + L)
    q, x = torch.randn(C, D, generator=gen), torch.randn(L, D, generator=gen)
    row = timed(lambda: fused.topk_fused(q, x, L, K, SEGMENTS), lambda lender: lender.search(q, x, L, K, SEGMENTS),
                "search", reps, busy)
    return {"C": C, "L": L, **row, "lent_by_rule": lend.worth_lending(C, L, D), "work": C * L * D}


def gather_point(L: int, reps: int, busy: bool) -> dict:
    gen = torch.Generator().manual_seed(L)
    tables = [torch.randn(100_001, 16, generator=gen), torch.randn(1_001, 16, generator=gen), torch.randn(L + 1, generator=gen)]
    ids = [torch.randint(1, 100_001, (L,), generator=gen), torch.randint(1, 1_001, (L,), generator=gen), torch.arange(1, L + 1)]
    evict = torch.empty(32 << 20, dtype=torch.uint8)   # served, the gather follows the Redis read and the last
    row = timed(lambda: gather.gather_keys(tables, ids), lambda lender: lender.gather(tables, ids), "gather",
                reps, busy, before=lambda: evict.add_(1))   # request's search: its tables are out of the caches
    return {"L": L, **row, "lent_by_rule": lend.worth_lending_gather(L, D), "words": L * D}


def timed(alone, with_lender, kernel: str, reps: int, busy: bool, before=lambda: None) -> dict:
    """alone() against with_lender(lender) in interleaved rounds (the same result checked), before() untimed ahead
    of each -> the row's figures. The size rules are off meanwhile: the lent call is measured wherever it can
    run, the rule beside it."""
    lender = lend.CoreLender(cores=2)
    saved = lend.LEND_MIN_WORK, lend.GATHER_MIN_WORDS
    lend.LEND_MIN_WORK = lend.GATHER_MIN_WORDS = 0
    spinner = None
    try:
        want = alone()
        with lender.scoring():
            got = with_lender(lender)
        assert got is not None, "the lender did not lend"
        pairs = [(got, want)] if isinstance(want, torch.Tensor) else list(zip(got, want))   # a gather; a search's (s, i)
        assert all(torch.equal(a, b) for a, b in pairs), "the lent call's result differs from the one-thread call's"
        if busy:   # another process on the machine: the lender counts the core idle, the OS shares it
            spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            time.sleep(0.2)
        whole, lent = [], []
        for _ in range(reps):
            before()
            t = time.perf_counter()
            alone()
            whole.append(time.perf_counter() - t)
            before()
            t = time.perf_counter()
            with lender.scoring():
                with_lender(lender)
            lent.append(time.perf_counter() - t)
    finally:
        if spinner:
            spinner.kill()
            spinner.wait()
        lend.LEND_MIN_WORK, lend.GATHER_MIN_WORDS = saved
        lender.close()
    w, s = statistics.median(whole), statistics.median(lent)
    stats = lender.lent[kernel]
    return {"lent_core_busy": busy, "whole_ms": round(w * 1e3, 4), "lent_ms": round(s * 1e3, 4),
            "ratio_whole_to_lent": round(w / s, 3), "calls": stats.calls, "lent_thread_joined": stats.joined,
            "chunks_lent": stats.chunks_lent, "chunks_here": stats.chunks_here, "reps": reps}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer points and repetitions")
    ap.add_argument("--gather", action="store_true", help="the key gather instead of the search")
    add_out_arg(ap, "lend_search")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.gather:
        Ls = [10_000, 100_000] if args.quick else [10_000, 30_000, 50_000, 70_000, 100_000, 300_000, 1_000_000]
        rows = []
        for busy in (False, True):
            for L in Ls:
                rows.append(gather_point(L, max(10, min(300, int(3e7 / L))) // (4 if args.quick else 1), busy))
                print(rows[-1], file=sys.stderr)
        emit({"benchmark": "lend_gather",
              "inputs": {"width": D, "tables": "item [100001, 16], category [1001, 16], position [L + 1]",
                         "torch_threads": 1, "gather_min_words": lend.GATHER_MIN_WORDS, "chunk_events": 2048},
              "results": rows}, args.out)
        return
    Ls = [1_000, 10_000, 100_000] if args.quick else [500, 1_000, 2_000, 4_000, 10_000, 30_000, 100_000, 300_000]
    Cs = [200] if args.quick else [20, 200]
    rows = []
    for busy in (False, True):
        for C in Cs:
            for L in Ls:
                reps = max(20, min(400, int(8e9 / (C * L * D))))
                rows.append(point(C, L, reps // (4 if args.quick else 1), busy))
                print(rows[-1], file=sys.stderr)
    emit({"benchmark": "lend_search",
          "inputs": {"d": D, "k": K, "segments": SEGMENTS, "torch_threads": 1, "lend_min_work": lend.LEND_MIN_WORK,
                     "pass1_bits_C200": fused.pass1_bits(200, D), "pass1_bits_C20": fused.pass1_bits(20, D)},
          "results": rows}, args.out)


if __name__ == "__main__":
    main()
