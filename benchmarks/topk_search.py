"""Top-k search backends against the machine's roofline, measured in one run. Prints one JSON object.

Serving layout (C candidates sharing one history of L events, d dims, k = 20). For each backend:
median seconds, the roofline bound max(FLOPs / peak FLOP/s, bytes / peak bytes/s) from this run's own
large-matmul and large-copy peaks (each measured before and after the points, the larger taken), the fraction
bound / median, the speedup over plain matmul + topk,
and whether its indices equal the exact (reference-tie-order) result. On CPU also the bound against the
CPU's own fused multiply-add peak at its widest vectors (benchmarks/_fma_peak.c, compiled here): a BLAS
matmul does not always reach it (MKL runs AVX2 kernels on AMD CPUs with AVX-512), and a kernel can then
beat the matmul "peak". FLOPs are 2 C L d, fp32-equivalent: where the CPU has AVX512_BF16 the fused kernel
scores its pruning pass in bf16 (fused_c.pass1_bits = 16), half the instructions, or in int8 where it has
AVX512_VNNI, or AVX2 without AVX-512 from 128 queries and 16384 events (pass1_bits = 8), a quarter, so its fraction
of the fp32 peak can pass what the same FLOPs in fp32 could reach. --pass1-variants adds the same kernel built
without VNNI (fused_c_bf16_pass1) and without VNNI and bf16 (fused_c_fp32_pass1), both without the AVX2 int8 pass
(-DINT8_AVX2=0), and where the int8 pass runs on AMX tiles the same without them (fused_c_vnni_pass1): the pass-1
variants measured side by side. d = 33 is DARE's serving search (32 semantic
dims and the folded position column). Without --quick, also the training layout (one history per query), which
retrieval.dispatch sends to the torch paths.

    .venv/bin/python benchmarks/topk_search.py [--quick] [--out FILE] [--device cpu|cuda|all] [--threads N]
        [--pass1-variants]

This is the benchmark the issue calls `benchmarks/retrieval.py`: under that name it would shadow the
`retrieval` package for every script in this folder (Python puts a script's folder first on sys.path;
benchmarks/serving.py failed to import the models that way).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels.topk_attention import cpu as fused  # noqa: E402
from kernels.topk_attention.reference import segment_scale  # noqa: E402
from retrieval import dispatch  # noqa: E402
from retrieval.cpu import PATHS  # noqa: E402
from retrieval.serving import topk_shared  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import add_out_arg, emit, fma_peak  # noqa: E402

K = 20


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, device, reps, warmup=1):
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peaks(device, quick):
    """Practical peaks: best of a few large fp32 matmuls (FLOP/s) and large copies (bytes read + written /s)."""
    n = (1024 if quick else 2048) if device == "cpu" else 8192
    a = torch.randn(n, n, device=device)
    flops = 2 * n**3 / min(median_seconds(lambda: a @ a, device, 1) for _ in range(5))
    numel = (64 if quick else 256) * 2**20 // 4 if device == "cpu" else 2**30 // 4
    x = torch.randn(numel, device=device)
    y = torch.empty_like(x)
    bw = 2 * x.numel() * 4 / min(median_seconds(lambda: y.copy_(x), device, 1) for _ in range(5))
    return flops, bw


def matmul_topk(query, keys, lengths, k, segments=None):
    """The obvious fast baseline: one matmul, torch.topk. Its tie order is torch's, not the reference's."""
    s = (query.float() * segment_scale(query.shape[-1], segments, query.device)) @ keys.float().T
    s[:, lengths:] = float("-inf")
    return torch.topk(s, min(k, s.shape[1]), dim=-1)


def bf16_matmul_topk(query, keys, lengths, k, segments=None):
    """bf16 scores: fewer bytes and FLOP cycles, but rounded scores change the ranking."""
    q = (query.float() * segment_scale(query.shape[-1], segments, query.device)).bfloat16()
    s = (q @ keys.bfloat16().T).float()
    s[:, lengths:] = float("-inf")
    return torch.topk(s, min(k, s.shape[1]), dim=-1)


def shared(query, keys, lengths, k, segments=None):
    return topk_shared(query, keys[:lengths], k, segments)


# The fused kernel's pass 1 variants (--pass1-variants): name -> extra build flags; the default build is fused_c.
PASS1_VARIANTS = {"fused_c_bf16_pass1": ("-mno-avx512vnni", "-DINT8_AVX2=0"),
                  "fused_c_fp32_pass1": ("-mno-avx512vnni", "-mno-avx512bf16", "-DINT8_AVX2=0")}


def fused_build(flags):
    def run(query, keys, lengths, k, segments=None):
        return fused.topk_fused(query, keys, lengths, k, segments, build=flags)
    return run


def cpu_backends(quick, pass1_variants=False):
    backends = {"matmul_topk": matmul_topk, "bf16_matmul_topk": bf16_matmul_topk}
    backends.update({name: fn for name, fn in PATHS.items()})
    backends["shared"] = shared  # the exact torch serving path (retrieval.serving)
    if fused.available():
        backends["fused_c"] = fused.topk_fused  # kernels/topk_attention/cpu.c: what retrieval.topk runs
        if pass1_variants:
            backends.update({name: fused_build(flags) for name, flags in PASS1_VARIANTS.items()})
            if fused.int8_amx():   # the int8 pass's dots on AMX tiles: vpdpbusd's beside them
                backends["fused_c_vnni_pass1"] = fused_build(("-DINT8_AMX=0",))
    if not quick:
        # The int() of the serving length graph-breaks; torch.compile then runs the pieces eagerly.
        backends["compiled_packed"] = torch.compile(PATHS["packed"], dynamic=True)
    # What retrieval.topk runs: its first call (the warm-up) measures the shape class, unless the cache
    # beside the kernel build already holds it or RECSYS_TOPK_AUTOTUNE=0.
    backends["dispatch"] = dispatch.topk
    return backends


# Not exact (torch's tie order) or not a path of ours: left out of "best exact torch path".
NOT_EXACT_TORCH = ("fused_c", *PASS1_VARIANTS, "fused_c_vnni_pass1", "matmul_topk", "bf16_matmul_topk", "dispatch")


def compare(row):
    """Per point: the fastest exact torch path, the fused kernel's speedup over it, what dispatch chose."""
    exact = {n: v["median_s"] for n, v in row.items() if isinstance(v, dict) and "median_s" in v and n not in NOT_EXACT_TORCH}
    if exact:
        best = min(exact, key=exact.get)
        row["best_exact_torch"] = best
        if "median_s" in row.get("fused_c", {}):
            row["fused_c"]["speedup_vs_best_exact_torch_path"] = exact[best] / row["fused_c"]["median_s"]


def cuda_backends():
    from kernels.topk_attention.triton import topk_triton

    return {"matmul_topk": matmul_topk, "triton": topk_triton}


def run(device, quick, reps, pass1_variants=False):
    # Peaks measured before and after the points, the larger taken: on a 2-vCPU VM the host sometimes gives both
    # vCPUs one core's vector units for seconds (a Zen 4 VM measured a two-thread FMA peak of 117 GFLOP/s in one run
    # and 232-234 in the runs around it), and a halved peak would put kernels above 100% of it.
    def measured():   # (matmul FLOP/s, copy bytes/s, FMA FLOP/s or None)
        return peaks(device, quick) + (fma_peak(torch.get_num_threads()) if device == "cpu" else None,)

    start = measured()
    backends = cpu_backends(quick, pass1_variants) if device == "cpu" else cuda_backends()
    Ls = [1_000, 10_000] if quick else [1_000, 10_000, 100_000]
    ds = [16] if quick else [16, 33, 64]
    rows = []
    gen = torch.Generator().manual_seed(0)
    for L in Ls:
        for C in (1, 200):
            for d in ds:
                q = torch.randn(C, d, generator=gen).to(device)
                keys = torch.randn(L, d, generator=gen).to(device)
                exact_idx = PATHS["packed"](q.cpu(), keys.cpu(), L, K)[1]
                flops = 2 * C * L * d  # fp32-equivalent: the fused kernel's bf16 pass 1 does half the instructions
                nbytes = (L * d + C * d) * 4 + C * K * 12  # keys and queries read once, scores + indices written
                row = {"L": L, "C": C, "d": d, "k": K, "flops": flops, "bytes": nbytes}
                base = None
                for name, fn in backends.items():
                    try:
                        secs = median_seconds(lambda: fn(q, keys, L, K), device, reps)
                        idx = fn(q, keys, L, K)[1].cpu()
                    except Exception as e:  # a backend that cannot run here is reported, not hidden
                        row[name] = {"error": repr(e)[:300]}
                        continue
                    base = secs if name == "matmul_topk" else base
                    row[name] = {"median_s": secs, "speedup_vs_matmul_topk": (base / secs) if base else None,
                                 "exact": bool(torch.equal(idx, exact_idx))}
                if "median_s" in row.get("fused_c", {}):   # 16: pass 1 in bf16, 8 int8 (FLOP fractions count fp32 FLOPs)
                    row["fused_c"]["pass1_bits"] = fused.pass1_bits(C, d, length=L)
                if "dispatch" in row and device == "cpu":
                    row["dispatch"]["chose"] = dispatch.choose(q, keys, L, K)
                compare(row)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    end = measured()
    flops_peak, bw_peak = max(start[0], end[0]), max(start[1], end[1])
    fma = max(start[2], end[2]) if start[2] and end[2] else None
    vector_peak = max(flops_peak, fma) if fma else None
    for row in rows:   # the roofline bounds: max(FLOPs / peak FLOP/s, bytes / peak bytes/s)
        bound = row["roofline_bound_s"] = max(row["flops"] / flops_peak, row["bytes"] / bw_peak)
        fma_bound = row["fma_roofline_bound_s"] = max(row["flops"] / vector_peak, row["bytes"] / bw_peak) if vector_peak else None
        for v in row.values():
            if isinstance(v, dict) and "median_s" in v:
                v["roofline_fraction"] = bound / v["median_s"]
                v["fma_roofline_fraction"] = fma_bound / v["median_s"] if fma_bound else None
    out = {"peak_flops": flops_peak, "peak_bytes_per_s": bw_peak, "rows": rows,
           "peaks_start_end": {"flops": [start[0], end[0]], "bytes_per_s": [start[1], end[1]]}}
    if device == "cpu":
        out["fma_peak_flops"] = fma
        out["peaks_start_end"]["fma_flops"] = [start[2], end[2]]
        if not quick:
            out["training_rows"] = training_layout(reps)
        # what the dispatch measured per shape class (this run's tunes and those read from its cache)
        out["dispatch_classes"] = dict(sorted(dispatch._cache.choices.items()))
    return out


def training_layout(reps):
    """One history per query (B x [L, d], lengths in [L/2, L]): the fused kernel against the torch paths."""
    backends = {name: fn for name, fn in PATHS.items()}
    if fused.available():
        backends["fused_c"] = fused.topk_fused
    backends["dispatch"] = dispatch.topk
    gen = torch.Generator().manual_seed(1)
    rows = []
    for B, L, d in [(256, 2_698, 16), (256, 2_698, 32), (256, 2_698, 64), (64, 10_000, 32)]:
        q, keys = torch.randn(B, d, generator=gen), torch.randn(B, L, d, generator=gen)
        n = torch.randint(L // 2, L + 1, (B,), generator=gen)
        exact_idx = PATHS["packed"](q, keys, n, K)[1]
        row = {"B": B, "L": L, "d": d, "k": K}
        for name, fn in backends.items():
            secs = median_seconds(lambda: fn(q, keys, n, K), "cpu", max(3, reps // 3))
            row[name] = {"median_s": secs, "exact": bool(torch.equal(fn(q, keys, n, K)[1], exact_idx))}
        row["dispatch"]["chose"] = dispatch.choose(q, keys, n, K)
        compare(row)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def headline(cpu, L=10_000, C=200, d=16):
    """The README's figure: the fused kernel at L = 10k, C = 200, d = 16 against this run's peaks."""
    row = next((r for r in cpu["rows"] if (r["L"], r["C"], r["d"]) == (L, C, d)), None)
    if row is None or "median_s" not in row.get("fused_c", {}):
        return None
    f = row["fused_c"]
    # the exact torch paths (retrieval's own; matmul + topk breaks ties in torch's order, not the reference's)
    exact = [row[n]["median_s"] for n in row if isinstance(row[n], dict) and "median_s" in row[n]
             and n not in NOT_EXACT_TORCH]
    return {"L": L, "C": C, "d": d, "fused_c_ms": f["median_s"] * 1e3,
            "fraction_of_fma_peak_roofline": f["fma_roofline_fraction"],
            "fraction_of_matmul_peak_roofline": f["roofline_fraction"],
            "fma_peak_gflops": (cpu["fma_peak_flops"] or 0) / 1e9, "matmul_peak_gflops": cpu["peak_flops"] / 1e9,
            "copy_gb_per_s": cpu["peak_bytes_per_s"] / 1e9,
            "speedup_vs_matmul_topk": f["speedup_vs_matmul_topk"],
            "speedup_vs_best_exact_torch_path": min(exact) / f["median_s"] if exact else None,
            "dispatch_chose": row.get("dispatch", {}).get("chose"),
            "target_fraction": 0.3, "target_met_vs_fma_peak": f["fma_roofline_fraction"] >= 0.3}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="L in {1k, 10k}, d = 16, fewer repetitions")
    add_out_arg(parser, "topk_search_cpu")
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--pass1-variants", action="store_true",
                        help="also the fused kernel built without int8 (bf16 pass 1) and without int8 and bf16 (fp32 pass 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reps = 5 if args.quick else 9
    result = {
        "benchmark": "retrieval.topk",
        "inputs": {"layout": "serving", "k": K, "quick": args.quick, "reps": reps, "threads": args.threads,
                   "autotune": dispatch.autotune_enabled(), "pass1_variants": args.pass1_variants},
    }
    if args.device in ("cpu", "all"):
        result["cpu"] = run("cpu", args.quick, reps, args.pass1_variants)
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        result["cuda"] = run("cuda", args.quick, reps)
    if "cpu" in result:
        result["headline"] = headline(result["cpu"])
    emit(result, args.out)

if __name__ == "__main__":
    main()
