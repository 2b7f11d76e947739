"""The Titans memory's chunk loop (recsys/modules/titans.py `_ChunkLoop`): the C kernel
(kernels/titans_memory) against the torch form of the same update, forward and backward, at a training
batch's layout, one thread. Prints one JSON object.

Layout: a timeline batch of ml-latest-small at L = 2,698 and batch 2048 holds ~3,700 (chunk, user) pairs of
16 events over ~130 chunks, most chunks with a few users; `--pairs` and `--users` set it (users ranked by
chunk count, geometric decay). FLOPs counted per pair: forward 7 products of [16 x 32] x [32 x 32]
(two layers forward, the inner backward, and the two weighted gradient sums for weights and momenta),
backward 22 (the forward recomputed, 15 of its own); reported against the FMA peak measured in the run.

    .venv/bin/python benchmarks/titans_chunk.py [--out results/titans_chunk.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels.titans_memory import cpu as titans_cpu  # noqa: E402
from recsys.modules import titans  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import add_out_arg, emit, fma_peak  # noqa: E402

FWD_PRODUCTS, BWD_PRODUCTS = 7, 22


def layout(pairs: int, users: int) -> list[int]:
    """Active users per chunk, falling geometrically from `users`, summing to about `pairs`."""
    active, a = [], float(users)
    while sum(active) < pairs and a >= 1:
        active.append(int(a))
        a *= 1 - users / pairs
    return active


def run(path: str, mem: titans.NeuralMemory, active: list[int], reps: int) -> tuple[float, float]:
    titans_cpu_supports = titans_cpu.supports
    titans_cpu.supports = (lambda *a: True) if path == "c" else (lambda *a: False)
    try:
        P, U = sum(active), active[0]
        g = torch.Generator().manual_seed(0)
        x = torch.randn(P, mem.chunk_size, mem.d_in, generator=g)
        fwd, bwd = [], []
        for _ in range(reps):
            xi = x.clone().requires_grad_()
            c = mem.chunks(xi, torch.ones(P, mem.chunk_size, dtype=torch.bool))
            fields = [t.detach().requires_grad_() for t in vars(c).values()]
            weights, momentum = mem._initial(U)
            t0 = time.perf_counter()
            out = titans._ChunkLoop.apply(mem.max_grad_norm, len(weights), active, *fields, *weights, *momentum)
            t1 = time.perf_counter()
            loss = sum(o.sum() for o in out)
            t2 = time.perf_counter()
            loss.backward()
            t3 = time.perf_counter()
            fwd.append(t1 - t0)
            bwd.append(t3 - t2)
        return statistics.median(fwd), statistics.median(bwd)
    finally:
        titans_cpu.supports = titans_cpu_supports


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=3700)
    ap.add_argument("--users", type=int, default=420)
    ap.add_argument("--reps", type=int, default=7)
    add_out_arg(ap, "titans_chunk")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if titans_cpu.load() is None:
        raise SystemExit("the Titans C kernel does not build here")
    torch.manual_seed(0)
    mem = titans.NeuralMemory(d_in=32, d_key=32, d_hidden=32, chunk_size=16)
    active = layout(args.pairs, args.users)
    P, b, d = sum(active), mem.chunk_size, mem.d_key
    flops_pair = 2 * b * d * d
    res = {}
    for path in ("torch", "c"):
        f, bw = run(path, mem, active, args.reps)
        res[path] = {"forward_s": f, "backward_s": bw,
                     "forward_gflops": FWD_PRODUCTS * flops_pair * P / f / 1e9,
                     "backward_gflops": BWD_PRODUCTS * flops_pair * P / bw / 1e9}
    peak = fma_peak(1)
    for r in res.values():
        r["forward_fraction_of_fma_peak"] = r["forward_gflops"] * 1e9 / peak if peak else None
        r["backward_fraction_of_fma_peak"] = r["backward_gflops"] * 1e9 / peak if peak else None
    emit({
        "benchmark": "titans_chunk",
        "inputs": {"pairs": P, "chunks": len(active), "users": active[0], "chunk_size": b, "d_key": d, "d_hidden": d,
                   "threads": 1, "reps": args.reps, "flops_per_pair": {"forward": FWD_PRODUCTS * flops_pair,
                                                                        "backward": BWD_PRODUCTS * flops_pair}},
        "fma_peak_gflops_1_thread": peak / 1e9 if peak else None,
        "results": res,
        "speedup_c_vs_torch": {"forward": res["torch"]["forward_s"] / res["c"]["forward_s"],
                               "backward": res["torch"]["backward_s"] / res["c"]["backward_s"],
                               "both": (res["torch"]["forward_s"] + res["torch"]["backward_s"])
                               / (res["c"]["forward_s"] + res["c"]["backward_s"])},
    }, args.out)


if __name__ == "__main__":
    main()
