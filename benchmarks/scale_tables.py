"""One big embedding table sharded over a local gloo group: per-rank memory around a checkpoint, and
kill-and-resume exactness (issue 19: "a 50M-row table over 4 ranks").

`measure_tables` starts `world` processes (torch.multiprocessing, gloo on 127.0.0.1), each building the
`fused` TableSet of one `rows` x `dim` table (meta device, torchrec's planner; it picks row-wise, so each
rank holds rows / world rows and their row-wise Adagrad state) under a small dense head kept in step by
DDP, training `steps` steps of `batch` uniform ids per rank and writing a checkpoint after step
`ckpt_step` through recsys.train.loop.save_checkpoint (every rank its own shard files). Then a fresh group
of processes (the first group is gone, as after a kill) resumes from that checkpoint and trains to
`steps`: every rank's shard (weights and optimizer state) must hash equal to the uninterrupted run's.

Per rank it reports peak RSS (VmHWM) of the build, of training, and of the checkpoint alone (the peak is
reset before it through /proc/self/clear_refs), RSS before and after the checkpoint, its shard's bytes
and its checkpoint files' bytes, and of the resume (`resumed`: the peak covers build and load; the reader
copies through a buffer of `read_chunk_bytes`). `--read` also times reading the checkpoint into full plain
tensors in one process (the bundle export's path) with that process's peak RSS.

Memory: the table is rows x dim x 4 bytes plus 4 bytes a row of optimizer state (50M x 16: 3.2 GB + 0.2 GB,
0.85 GB a rank at 4 ranks). Checkpoints go under `--dir` (default: a temporary folder on the system's
temp directory, which must be disk, not tmpfs, at 50M rows).

    .venv/bin/python benchmarks/scale_tables.py [--rows 50000000] [--dim 16] [--world 4] [--steps 4]
        [--ckpt-step 2] [--batch 4096] [--read] [--out results/scale_tables.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import add_out_arg, emit  # noqa: E402


def _status_mb(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    raise KeyError(field)


def _reset_peak() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux: clear_refs 5); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _memory() -> dict:
    return {"rss_mb": _status_mb("VmRSS"), "peak_mb": _status_mb("VmHWM")}


def _rank(rank: int, world: int, port: int, job: dict) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from recsys.config.train import TrainConfig
    from recsys.embeddings import TableSet, TableSpec
    from recsys.train.loop import restore_checkpoint, save_checkpoint
    from recsys.train.step import make_optimizers

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(job["threads"])
    report: dict = {"rank": rank, "start": _memory()}
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.tables = TableSet([TableSpec("item", job["rows"], job["dim"])], "fused", init_std=0.01)
    model.head = torch.nn.Linear(job["dim"], 1)
    t0 = time.perf_counter()
    model.tables.shard(lr=0.05)
    report["shard_s"] = time.perf_counter() - t0
    report["built"] = _memory()
    report["sharding"] = model.tables.sharding_types
    shards = [s for st in model.tables.shard_state().values() for s in st.local_shards()]
    report["rows"] = sum(s.tensor.shape[0] for s in shards)
    report["shard_mb"] = sum(s.tensor.numel() * s.tensor.element_size() for s in shards) / 2**20
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, [n for n, _ in model.named_parameters() if n.startswith("tables.")])
    head = DistributedDataParallel(model.head) if world > 1 else model.head
    opt = make_optimizers(model, TrainConfig(lr=0.01))
    start = 0
    if job["resume"]:
        t0 = time.perf_counter()
        start = restore_checkpoint(job["resume"], model, opt)["step"]
        report["resume_s"] = time.perf_counter() - t0
        report["resumed"] = _memory()
    report["peak_reset"] = _reset_peak()
    times = []
    for step in range(start, job["steps"]):
        g = torch.Generator().manual_seed(1_000_003 * step + rank)
        ids = torch.randint(0, job["rows"], (job["batch"],), generator=g)
        y = torch.randn(job["batch"], generator=g)
        t0 = time.perf_counter()
        for o in opt.all().values():
            o.zero_grad(set_to_none=True)
        emb = model.tables({"item": ids})["item"]
        ((head(emb).squeeze(-1) - y) ** 2).mean().backward()  # the fused kernel updates the shards here
        for o in opt.all().values():
            o.step()
        times.append(time.perf_counter() - t0)
        if step + 1 == job["ckpt_step"] and not job["resume"]:
            report["training"] = _memory()
            _reset_peak()
            before = _memory()
            t0 = time.perf_counter()
            save_checkpoint(job["ckpt"], model, opt, {"step": step + 1}, rank)
            report["checkpoint"] = {"s": time.perf_counter() - t0, "rss_before_mb": before["rss_mb"],
                                    "peak_mb": _status_mb("VmHWM"), "rss_after_mb": _status_mb("VmRSS")}
            _reset_peak()
    report["step_s"] = statistics.median(times) if times else None
    report["end"] = _memory()
    digest = hashlib.sha256()
    for st in list(model.tables.shard_state().values()) + list(model.tables.shard_state(optimizer=True).values()):
        for s in st.local_shards():
            digest.update(s.tensor.contiguous().numpy().tobytes())
    for p in model.head.parameters():
        digest.update(p.detach().numpy().tobytes())
    report["digest"] = digest.hexdigest()
    Path(job["out"], f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


def _group(world: int, job: dict) -> list[dict]:
    import torch.multiprocessing as mp

    from recsys.net import free_port

    shutil.rmtree(job["out"], ignore_errors=True)
    Path(job["out"]).mkdir(parents=True)
    mp.start_processes(_rank, args=(world, free_port(), job), nprocs=world, join=True, start_method="spawn")
    return [json.loads(Path(job["out"], f"rank{r}.json").read_text()) for r in range(world)]


def _read(_index: int, folder: str, out: str) -> None:
    from recsys.checkpoint import read_weights

    t0 = time.perf_counter()
    tables = read_weights(folder)
    Path(out).write_text(json.dumps({"s": time.perf_counter() - t0, "peak_mb": _status_mb("VmHWM"),
                                     "shape": list(tables["tables.item"].shape)}))


def measure_tables(rows: int = 50_000_000, dim: int = 16, world: int = 4, steps: int = 4, ckpt_step: int = 2,
                   batch: int = 4096, threads: int = 1, folder: str | Path | None = None, read: bool = False) -> dict:
    """See the module docstring. -> {inputs, table_mb, sharding, ranks (per rank: rows, shard_mb, build /
    training / checkpoint memory, checkpoint files' MB), checkpoint_s, resume_s, exact, read (with `read`)}."""
    import torch.multiprocessing as mp

    from recsys.checkpoint import CHUNK_BYTES

    if not 0 < ckpt_step < steps:
        raise ValueError(f"ckpt_step {ckpt_step} must lie inside 1..{steps - 1}")
    own = folder is None
    base = Path(tempfile.mkdtemp(prefix="scale_tables-") if own else folder)
    try:
        ckpt = base / "ckpt"
        ckpt.mkdir(parents=True, exist_ok=True)
        job = {"rows": rows, "dim": dim, "steps": steps, "ckpt_step": ckpt_step, "batch": batch, "threads": threads,
               "ckpt": str(ckpt), "resume": None}
        straight = _group(world, job | {"out": str(base / "straight")})
        resumed = _group(world, job | {"out": str(base / "resumed"), "resume": str(ckpt)})
        files = {sub: {f.name: f.stat().st_size / 2**20 for f in sorted((ckpt / sub).glob("*.safetensors"))}
                 for sub in ("tables", "tables_optim")}
        ranks = []
        for r, (a, b) in enumerate(zip(straight, resumed)):
            name = f"shard-{r + 1:05d}-model-00001-of-00001.safetensors"
            ranks.append({"rows": a["rows"], "shard_mb": a["shard_mb"], "start_rss_mb": a["start"]["rss_mb"],
                          "built": a["built"], "shard_s": a["shard_s"], "training": a["training"],
                          "checkpoint": a["checkpoint"], "files_mb": {sub: files[sub].get(name, 0.0) for sub in files},
                          "step_s": a["step_s"], "resume_s": b["resume_s"], "resumed": b["resumed"],
                          "peak_reset": a["peak_reset"], "exact": a["digest"] == b["digest"]})
        result = {
            "inputs": {"rows": rows, "dim": dim, "world": world, "steps": steps, "ckpt_step": ckpt_step, "batch": batch,
                       "threads": threads, "read_chunk_bytes": CHUNK_BYTES},
            "table_mb": rows * dim * 4 / 2**20,
            "optimizer_state_mb": rows * 4 / 2**20,
            "sharding": straight[0]["sharding"],
            "ranks": ranks,
            "checkpoint_s": max(r["checkpoint"]["s"] for r in ranks),
            "resume_s": max(r["resume_s"] for r in ranks),
            "exact": all(r["exact"] for r in ranks),
        }
        if read:
            mp.start_processes(_read, args=(str(ckpt), str(base / "read.json")), nprocs=1, join=True, start_method="spawn")
            result["read"] = json.loads((base / "read.json").read_text())
        return result
    finally:
        if own:
            shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=50_000_000)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--ckpt-step", type=int, default=2)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--dir", default=None, help="folder for the checkpoint (default: a temporary one, removed)")
    p.add_argument("--read", action="store_true", help="also read the checkpoint into full tensors in one process")
    add_out_arg(p, "scale_tables")
    a = p.parse_args()
    emit(measure_tables(a.rows, a.dim, a.world, a.steps, a.ckpt_step, a.batch, a.threads, a.dir, a.read), a.out)


if __name__ == "__main__":
    main()
