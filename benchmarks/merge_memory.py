"""Per-rank peak memory of one validation's metric merge: `--world` gloo processes (the collectives of
`pipelines.train.GroupContext`, what Ray Train's workers use), each holding `--rows` scored validation rows
of its own users, build their partial (`recsys.metrics.ctr_partial`) and merge it, as
`recsys.train.evaluation.merge_split` does after every validation.

Rows are synthetic, shaped like a model's: float32 sigmoid scores (ties where float32 runs out of digits),
labels drawn from them, each rank its own `--users` users, `--cates` categories shared by all ranks.
`--baseline COMMIT` runs that commit's recsys/metrics.py instead (the merge before the range exchange:
every rank gathered every rank's count tables and merged them). Prints one JSON object: per rank the RSS
before the partial (the rows loaded) and the merge's peak above it (VmHWM, reset before), in MB, and the
metrics (every rank's must be equal).

    python benchmarks/merge_memory.py --world 4 --rows 750000
    python benchmarks/merge_memory.py --world 4 --rows 750000 --baseline 93eb937
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _mem_mb() -> dict[str, float]:
    f = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            f[k] = int(v.split()[0]) / 1024
    return f


def _rank(rank: int, a: argparse.Namespace, port: int, out: str, baseline_src: str | None) -> None:
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import torch.distributed as dist

    from pipelines.train import GroupContext

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=a.world)
    ctx = GroupContext(rank, a.world)
    rng = np.random.default_rng([a.seed, rank])
    n = a.rows
    user = rank * a.users + rng.integers(0, a.users, n)
    cate = rng.integers(0, a.cates, n)
    score = (1.0 / (1.0 + np.exp(-rng.normal(-1.0, 1.5, n)))).astype(np.float32).astype(np.float64)
    label = (rng.random(n) < score).astype(np.float32)
    if baseline_src is None:
        from recsys.metrics import ctr_partial, merge_ctr

        def merge():
            return merge_ctr(ctr_partial(label, score, user, cate), ctx)
    else:
        old = types.ModuleType("metrics_baseline")
        exec(compile(baseline_src, "metrics_baseline", "exec"), old.__dict__)

        def merge():
            return old.merge_ctr(ctx.gather(old.ctr_partial(label, score, user, cate)))
    gc.collect()
    ctx.barrier()
    before = _mem_mb()["VmRSS"]
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    metrics = merge()
    peak = _mem_mb()["VmHWM"]
    Path(out, f"{rank}.json").write_text(json.dumps({"rss_before_mb": round(before, 1), "merge_peak_above_mb": round(peak - before, 1),
                                                     "metrics": metrics}))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--rows", type=int, default=750_000, help="validation rows per rank")
    ap.add_argument("--users", type=int, default=30_000, help="users per rank")
    ap.add_argument("--cates", type=int, default=5_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--baseline", help="a commit whose recsys/metrics.py merges (the gather-everything merge)")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch.multiprocessing as mp

    from recsys.net import free_port

    src = None
    if a.baseline:
        src = subprocess.run(["git", "show", f"{a.baseline}:recsys/metrics.py"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank, args=(a, free_port(), out, src), nprocs=a.world, join=True)
        ranks = [json.loads(Path(out, f"{r}.json").read_text()) for r in range(a.world)]
    metrics = [r.pop("metrics") for r in ranks]
    if any(repr(m) != repr(metrics[0]) for m in metrics):
        raise RuntimeError(f"ranks disagree: {metrics}")
    print(json.dumps({"inputs": vars(a), "ranks": ranks, "metrics": metrics[0]}))


if __name__ == "__main__":
    main()
