"""Stage 2's attention over the kept events (`kernels/kept_attention`): the C kernel against its torch form,
alone on cached inputs and inside the served forward, where the search has just evicted the tables.

    .venv/bin/python benchmarks/kept_attention.py [--quick] [--out results/kept_attention.json]

`alone`: `attend` on DARE's default widths (item and category rows of 16, the folded position number; the
representation rows 16 + 16 + 16) for C = 200 targets x k = 20 kept events over tables of 100k rows, the same
inputs again and again (cached). `forward`: `ServingModel.score` of a DARE bundle (default dims, untrained)
on a history of L events and C = 200 candidates, one thread, with the kernel on and off
(RECSYS_KEPT_ATTENTION_KERNEL) in turn, each request after the other's, so machine drift falls on both alike;
the ratio is on / off of the medians. The logits of the two agree within float32 rounding (checked).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _machine import add_out_arg, emit  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from kernels.kept_attention import cpu, reference  # noqa: E402

C, K = 200, 20


def alone(reps: int) -> dict:
    g = torch.Generator().manual_seed(0)
    rows = 100_000
    att = [torch.randn(rows, 16, generator=g), torch.randn(1_000, 16, generator=g), torch.randn(rows + 1, generator=g)]
    rep = [torch.randn(rows, 16, generator=g), torch.randn(1_000, 16, generator=g), torch.randn(rows + 1, 16, generator=g)]
    ids = [torch.randint(0, t.shape[0], (C * K,), generator=g) for t in att]
    valid = torch.ones(C, K, dtype=torch.bool)
    q = torch.randn(C, 33, generator=g)
    torch.testing.assert_close(cpu.attend(q, att, rep, ids, valid), reference.attend(q, att, rep, ids, valid),
                               rtol=1e-5, atol=1e-6)
    ts = {"c": [], "torch": []}
    for _ in range(reps):
        for name, f in (("c", cpu.attend), ("torch", reference.attend)):
            t = time.perf_counter()
            f(q, att, rep, ids, valid)
            ts[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in ts.items()}
    return {"C": C, "k": K, "table_rows": rows, "reps": reps, "c_us": round(med["c"] * 1e6, 1),
            "torch_us": round(med["torch"] * 1e6, 1), "ratio_torch_to_c": round(med["torch"] / med["c"], 2)}


def forward(L: int, reps: int, tmp: Path) -> dict:
    from serving import N_CATES, N_ITEMS, build_bundle
    from service.model_state import ServingModel
    from service.state import SEQ_DTYPE

    model = ServingModel.from_bundle(build_bundle(L, tmp / f"bundle-{L}"))
    rng = np.random.default_rng(0)
    seq = np.zeros(L, SEQ_DTYPE)
    seq["item"], seq["cate"], seq["ts"] = rng.integers(1, N_ITEMS, L), rng.integers(1, N_CATES, L), np.arange(L)
    jobs = [model.map_candidates(rng.integers(1, N_ITEMS, C), rng.integers(1, N_CATES, C))[:2] for _ in range(4)]
    ts = {"on": [], "off": []}
    logits = {}
    with torch.inference_mode():
        for i in range(reps + 2):
            for name in ("on", "off") if i % 2 else ("off", "on"):
                os.environ[cpu.SWITCH_ENV] = "1" if name == "on" else "0"
                items, cates = jobs[i % len(jobs)]
                t = time.perf_counter()
                scores, _, _ = model.score(seq, None, items, cates)
                if i >= 2:
                    ts[name].append(time.perf_counter() - t)
                if i % len(jobs) == 0:
                    logits[name] = scores
            if i % len(jobs) == 0:
                torch.testing.assert_close(torch.as_tensor(logits["on"]), torch.as_tensor(logits["off"]),
                                           rtol=1e-5, atol=1e-6)
    os.environ.pop(cpu.SWITCH_ENV, None)
    med = {k: statistics.median(v) for k, v in ts.items()}
    return {"L": L, "C": C, "reps": reps, "forward_on_ms": round(med["on"] * 1e3, 3),
            "forward_off_ms": round(med["off"] * 1e3, 3), "saved_ms": round((med["off"] - med["on"]) * 1e3, 3),
            "ratio_on_to_off": round(med["on"] / med["off"], 3)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="L = 10k only, fewer repetitions")
    add_out_arg(ap, "kept_attention")
    args = ap.parse_args(argv)
    assert cpu.load() is not None, "the kept-attention kernel did not build"
    torch.set_num_threads(1)
    rows = [alone(100 if args.quick else 400)]
    print(rows[-1], file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        for L in [10_000] if args.quick else [10_000, 100_000]:
            rows.append(forward(L, 40 if args.quick else (200 if L <= 10_000 else 100), Path(tmp)))
            print(rows[-1], file=sys.stderr)
    emit({"benchmark": "kept_attention",
          "inputs": {"threads": 1, "candidates": C, "k": K, "model": "DARE default dims (untrained), top_k 20"},
          "results": rows}, args.out)


if __name__ == "__main__":
    main()
