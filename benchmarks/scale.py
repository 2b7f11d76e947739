"""Scaling out: the offline path on a local multi-node Ray cluster, at growing dataset sizes.

A 4-node cluster (`ray.cluster_utils.Cluster`: each node its own raylet and object store, 1 CPU each, all
on 127.0.0.1) stands in for a cluster of machines; on one 2-core VM the nodes share the cores, so wall times
measure what one machine can do, and the memory figures show what grows with what:
- preprocessing (`pipelines.preprocess.run_preprocess` with the cluster's address) of `--events` synthetic
  raw events (benchmarks/ray_pipeline.py's generator: Zipf items, log-normal history lengths): wall time and
  the DRIVER's peak RSS (its own VmHWM: the goal is flat in dataset size), plus the peak RSS of the largest
  Ray worker process (RSS counts the object-store pages a worker maps, so it overstates private memory);
- training (`pipelines.train.run_train`, the dare preset, per-worker batch fixed) for `--train-steps` steps
  on 4 workers: peak RSS of each Ray Train worker (goal: about 1/N of the data plus a constant), and its
  private part (RSS less the object-store pages it mapped, which are its node's store's);
- bytes per event and per training row on disk and as loaded (`SequenceStore` / `Samples` arrays);
- sharded evaluation on ml-latest-small (the fixed benchmark): a briefly trained bundle scored by
  `pipelines.evaluate.run_evaluate` on 4 actors against the single-process `recsys.train.trainer.evaluate`;
- `--table-rows`: benchmarks/scale_tables.py (one table sharded over 4 gloo ranks: per-rank RSS, checkpoint,
  kill-and-resume), when given.
Each job's driver is its own subprocess (`--child`), so its peak RSS is its own. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import add_out_arg, emit  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MiB = 2**20


def vm_hwm_mb() -> float:
    """This process's peak RSS (Linux VmHWM), MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RaySampler:
    """Peak RSS per Ray worker process (title `ray::...`), sampled every 0.25 s while a job runs, and the peak
    of its private part (RSS less the file and shared-memory pages: the object-store pages a worker has
    mapped are its node's store's, counted in the worker's RSS too)."""

    def __init__(self) -> None:
        self.peak: dict[int, tuple[str, int, int]] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._done.is_set():
            for p in psutil.process_iter(["pid", "cmdline"]):
                try:
                    title = " ".join(p.info["cmdline"] or [])
                    if not title.startswith("ray::"):
                        continue
                    m = p.memory_info()
                except psutil.Error:
                    continue
                old = self.peak.get(p.pid)
                name = title if "RayTrainWorker" in title or old is None else old[0]
                self.peak[p.pid] = (name, max(m.rss, old[1] if old else 0), max(m.rss - m.shared, old[2] if old else 0))
            time.sleep(0.25)

    def __enter__(self) -> "RaySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()

    def peaks_mb(self, contains: str = "", private: bool = False) -> list[float]:
        return sorted((round((own if private else rss) / MiB) for name, rss, own in self.peak.values() if contains in name),
                      reverse=True)


def run_child(*args: str) -> dict:
    """Run this script's `--child` job in a fresh Python -> its JSON (the last stdout line)."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, __file__, "--child", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, cwd=REPO, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"child {args[0]} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ child jobs


def child_preprocess(src: str, out: str, address: str) -> dict:
    from pipelines.preprocess import run_preprocess

    t0 = time.perf_counter()
    meta = run_preprocess(src, out, seed=0, address=address)
    return {"wall_s": time.perf_counter() - t0, "driver_peak_rss_mb": vm_hwm_mb(), "rows": meta["rows"],
            "partitions": meta["ray"]["partitions"], "read_tasks": meta["ray"].get("read_tasks"),
            "driver_rows": meta["ray"].get("driver_rows"), "n_users": meta["n_users"], "n_items": meta["n_items"]}


def child_train(folder: str, out: str, address: str, steps: int, workers: int, val_users: float | None) -> dict:
    from pipelines.train import run_train
    from recsys.config.experiment import load_experiment
    from recsys.config.presets import preset_path

    meta = json.loads((Path(folder) / "meta.json").read_text())
    per_worker = 512
    epochs = steps * per_worker * workers / meta["rows"]["train"]
    cfg = load_experiment(preset_path("dare"), {
        "data": folder,
        "train": {"batch_size": per_worker * workers, "epochs": epochs, "eval_every": 10**9, "patience": None,
                  "progress": False, "val_users": val_users},
    })
    r = run_train(cfg, out, workers=workers, address=address, evaluate_test=False)
    return {"wall_s": r["wall_s"], "steps": r["steps"], "samples_per_s": r["samples_per_s"],
            "driver_peak_rss_mb": vm_hwm_mb(), "ranks": r["ranks"], "batch_per_worker": per_worker}


def child_evaluate(address: str, out: str, workers: int) -> dict:
    from pipelines.evaluate import run_evaluate
    from recsys.config.experiment import load_experiment
    from recsys.config.presets import preset_path
    from recsys.paths import benchmark_dir
    from recsys.train.trainer import evaluate, train

    cfg = load_experiment(preset_path("dare"), {"data": str(benchmark_dir()),
                                                "train": {"epochs": 0.3, "eval_every": 10**9, "patience": None,
                                                          "progress": False}})
    res = train(cfg, Path(out) / "run", evaluate_test=False)
    bundle = res.bundle_dir
    single = evaluate(bundle, "test")
    sharded = run_evaluate(bundle, "test", workers=workers, address=address)
    keys = sorted(k for k in single if isinstance(single[k], float) and k in sharded)
    diffs = {k: abs(single[k] - sharded[k]) for k in keys}
    return {"single": {k: single[k] for k in keys}, "sharded": {k: sharded[k] for k in keys},
            "max_abs_diff": max(diffs.values()), "workers": workers,
            "ranks": [{k: r[k] for k in r if k != "users"} for r in sharded.get("ranks", [])]}


# ------------------------------------------------------------------------------------------ the driver


def dataset_bytes(folder: Path, meta: dict) -> dict:
    """On-disk bytes per event and per training row, and the uncompressed column widths (a worker reads
    the events without their times and holds 8 bytes per event plus 8 per user, 20 per row:
    recsys.data.shards.shard_from_blocks)."""
    from recsys.data.layout import data_files
    from recsys.data.schemas import DATASET_EVENTS_SCHEMA, SPLIT_SCHEMA

    def disk(name: str) -> int:
        return sum(p.stat().st_size for p in data_files(folder, name))

    def row_bytes(schema) -> int:
        return sum(f.type.bit_width // 8 if hasattr(f.type, "bit_width") else 0 for f in schema)

    return {
        "disk_bytes_per_event": round(disk("events") / meta["n_events"], 2),
        "disk_bytes_per_train_row": round(disk("train") / max(1, meta["rows"]["train"]), 2),
        "column_bytes_per_event": row_bytes(DATASET_EVENTS_SCHEMA),
        "column_bytes_per_row": row_bytes(SPLIT_SCHEMA),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--events", type=float, nargs="+", default=[1e6, 1e7], help="dataset sizes (events)")
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--train-steps", type=int, default=10)
    ap.add_argument("--workers", type=int, default=4, help="Ray Train workers / evaluation actors")
    ap.add_argument("--object-store-mb", type=int, default=768, help="per node")
    ap.add_argument("--val-users", type=float, default=None,
                    help="validate the trained model on this share of the users (train.val_users; default all): "
                         "the validation at the end scores every val row otherwise, hours at 100M events here")
    ap.add_argument("--no-train", action="store_true")
    ap.add_argument("--no-evaluate", action="store_true")
    ap.add_argument("--table-rows", type=int, default=0, help="also run scale_tables.py with this many rows")
    ap.add_argument("--table-dim", type=int, default=16)
    ap.add_argument("--workdir", default=None, help="where data goes (default: a temp folder, removed)")
    ap.add_argument("--keep-data", action="store_true",
                    help="keep each size's preprocessed folder in --workdir (with its preprocessing figures beside it) "
                         "and reuse one already there, so a failed training does not redo the preprocessing")
    add_out_arg(ap, "scale")
    a = ap.parse_args()
    if a.keep_data and a.workdir is None:
        ap.error("--keep-data needs --workdir")
    if a.child:
        job, *args = a.child
        fn = {"preprocess": child_preprocess, "train": child_train, "evaluate": child_evaluate}[job]
        conv = {"train": lambda f, o, ad, s, w, v: (f, o, ad, int(s), int(w), None if v == "all" else float(v)), "evaluate": lambda ad, o, w: (ad, o, int(w))}
        print(json.dumps(fn(*conv.get(job, lambda *x: x)(*args))))
        return

    import ray
    from ray.cluster_utils import Cluster

    from ray_pipeline import write_events
    from recsys.net import ray_loopback_only

    lo = ray_loopback_only()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="recsys-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    node = {"num_cpus": 1, "object_store_memory": a.object_store_mb * MiB}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "node_ip_address": lo["_node_ip_address"],
                                                            "include_dashboard": False})
    result: dict = {"inputs": {"events": [int(e) for e in a.events], "nodes": a.nodes, "workers": a.workers,
                               "train_steps": a.train_steps, "object_store_mb_per_node": a.object_store_mb,
                               "val_users": a.val_users}}
    try:
        for _ in range(a.nodes - 1):
            cluster.add_node(**node, node_ip_address=lo["_node_ip_address"])
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        result["cluster"] = {"nodes": len([n for n in ray.nodes() if n["Alive"]]),
                             "cpus": ray.cluster_resources().get("CPU")}
        ray.shutdown()  # each job's driver is a child process that joins the cluster itself
        sizes = []
        for n_events in (int(e) for e in a.events):
            src, folder = work / f"raw-{n_events}.parquet", work / f"data-{n_events}"
            kept = work / f"data-{n_events}.preprocess.json"
            row: dict
            # run_preprocess swaps its folder in whole at the end: a folder that exists is complete
            if a.keep_data and kept.is_file() and (folder / "meta.json").is_file():
                row = json.loads(kept.read_text()) | {"reused": True}
                print(f"[scale] {n_events:,} events: reusing {folder}", file=sys.stderr)
            else:
                t0 = time.perf_counter()
                info = write_events(src, n_events)
                row = {"events": n_events, "input": info, "generate_s": round(time.perf_counter() - t0, 1)}
                print(f"[scale] {n_events:,} events: generated in {row['generate_s']} s", file=sys.stderr)
                with RaySampler() as s:
                    pre = run_child("preprocess", str(src), str(folder), cluster.address)
                src.unlink()
                pre["ray_worker_peak_rss_mb"] = s.peaks_mb()[:4]
                pre["events_per_s"] = round(n_events / pre["wall_s"])
                row["preprocess"] = pre
                if a.keep_data:
                    kept.write_text(json.dumps(row))
            meta = json.loads((folder / "meta.json").read_text())
            row["bytes"] = dataset_bytes(folder, meta)
            pre = row["preprocess"]
            print(f"[scale] {n_events:,} events: preprocessed in {pre['wall_s']:.1f} s, driver peak "
                  f"{pre['driver_peak_rss_mb']:.0f} MB", file=sys.stderr)
            if not a.no_train:
                with RaySampler() as s:
                    tr = run_child("train", str(folder), str(work / f"train-{n_events}"), cluster.address,
                                   str(a.train_steps), str(a.workers), str(a.val_users or "all"))
                tr["train_worker_peak_rss_mb"] = s.peaks_mb("RayTrainWorker")
                tr["train_worker_peak_private_mb"] = s.peaks_mb("RayTrainWorker", private=True)
                row["train"] = tr
                print(f"[scale] {n_events:,} events: trained {tr['steps']} steps in {tr['wall_s']:.1f} s, worker "
                      f"peaks {tr['train_worker_peak_rss_mb']} MB", file=sys.stderr)
                shutil.rmtree(work / f"train-{n_events}", ignore_errors=True)
            if not a.keep_data:
                shutil.rmtree(folder, ignore_errors=True)
            sizes.append(row)
        result["sizes"] = sizes
        if not a.no_evaluate:
            result["evaluation"] = run_child("evaluate", cluster.address, str(work / "eval"), str(a.workers))
        if a.table_rows:
            cmd = [sys.executable, str(REPO / "benchmarks" / "scale_tables.py"), "--rows", str(a.table_rows),
                   "--dim", str(a.table_dim), "--world", str(a.workers), "--read"]
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO, check=True)
            result["tables"] = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        cluster.shutdown()
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    if len(result.get("sizes", [])) > 1:
        first, last = result["sizes"][0], result["sizes"][-1]
        grow = last["events"] / first["events"]
        result["growth"] = {
            "dataset_x": grow,
            "preprocess_wall_x": round(last["preprocess"]["wall_s"] / first["preprocess"]["wall_s"], 2),
            "driver_peak_rss_x": round(last["preprocess"]["driver_peak_rss_mb"] / first["preprocess"]["driver_peak_rss_mb"], 2),
        }
        if "train" in first and "train" in last:
            result["growth"]["train_worker_peak_rss_x"] = round(
                max(last["train"]["train_worker_peak_rss_mb"]) / max(first["train"]["train_worker_peak_rss_mb"]), 2)
    emit({"benchmark": "scale", **result}, a.out)


if __name__ == "__main__":
    main()
