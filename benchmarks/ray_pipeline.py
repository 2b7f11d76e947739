"""Ray pipeline benchmark: preprocessing events/s and peak memory, training samples/s on 1 and 2 workers.

Preprocessing input: `--events` synthetic raw events (our Parquet event schema; Zipf items, categories by
item, users with log-normal lengths) written in 1M-event chunks. The Ray job (pipelines.preprocess) is
compared with the single-process `recsys.data.prepare` on the same file, each in its own subprocess, so
peak memory is measured per job: the single process's max RSS, and for Ray the peak of the summed RSS of
the driver and every Ray process it started (sampled every 0.2 s; shared object-store pages are counted
once per process mapping them, so this overstates). Training: `pipelines.train.run_train` on the fixed
benchmark at the original settings (the dare preset: L = 200, batch 2048) for `--train-steps` steps,
median steady-state global samples/s of 1 and 2 workers; scaling efficiency = sps(2) / (2 sps(1)).
Equivalence: validation AUC of the single-process trainer and of the 2-worker Ray job with the same
config and seed (the dare preset for `--equivalence-epochs`), next to the float-rounding floor: the same
single-process run with each batch's rows in reverse order (the same step in exact arithmetic; only the
order of float sums changes). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import add_out_arg, emit  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def write_events(path: Path, n_events: int, seed: int = 0, chunk: int = 1_000_000) -> dict:
    """Synthetic raw events in EVENT_SCHEMA, users contiguous, written chunk by chunk (bounded memory)."""
    from recsys.data.schemas import EVENT_SCHEMA

    rng = np.random.default_rng(seed)
    n_items = max(1000, n_events // 25)
    lengths = np.clip(rng.lognormal(np.log(500), 1.0, size=n_events // 20 + 1).astype(np.int64), 5, 50_000)
    lengths = lengths[: np.searchsorted(np.cumsum(lengths), n_events) + 1]
    lengths[-1] -= lengths.sum() - n_events
    user_of = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    with pq.ParquetWriter(path, EVENT_SCHEMA) as w:
        for a in range(0, n_events, chunk):
            n = min(chunk, n_events - a)
            item = np.minimum(rng.zipf(1.2, n), n_items).astype(np.int64) * 7919 % 10_000_019
            w.write_table(pa.Table.from_arrays([
                pa.array([f"e{a + i}" for i in range(n)]),
                pa.array(user_of[a : a + n] * 31 + 5), pa.array(item), pa.array(item % 997 + 1),
                pa.array(np.zeros(n, np.int8)), pa.array(1_600_000_000_000 + rng.integers(0, 10**10, n)),
            ], schema=EVENT_SCHEMA))
    return {"events": n_events, "users": int(len(lengths)), "file_mb": round(path.stat().st_size / 2**20, 1)}


def read_all(folder: Path, name: str) -> pa.Table:
    """A data name's rows in either layout (prepare: one file; preprocess: part files), in user order."""
    from recsys.data.layout import data_files

    return pa.concat_tables([pq.read_table(f) for f in data_files(folder, name)])


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc] + proc.children(recursive=True):
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_measured(code: str) -> tuple[dict, float, float]:
    """Run `code` in a fresh Python; -> (its printed JSON, wall s, peak summed RSS of its process tree, MB)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO)
    ps, peak, done = psutil.Process(proc.pid), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _tree_rss(ps))
            time.sleep(0.2)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, _ = proc.communicate()
    done.set()
    t.join()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark subprocess failed ({proc.returncode}): {code[:200]}")
    return json.loads(out.strip().splitlines()[-1]), wall, peak[0] / 2**20


def bench_preprocess(n_events: int, tmp: Path) -> dict:
    src = tmp / "events.parquet"
    info = write_events(src, n_events)
    single_code = (f"import json, resource; from recsys.data.prepare import prepare; from recsys.data.raw import open_raw; "
                   f"m = prepare(open_raw({str(src)!r}), {str(tmp / 'single')!r}, seed=0); "
                   f"print(json.dumps({{'rows': m['rows'], 'maxrss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))")
    ray_code = (f"import json; from pipelines.preprocess import run_preprocess; "
                f"m = run_preprocess({str(src)!r}, {str(tmp / 'ray')!r}, seed=0); "
                f"print(json.dumps({{'rows': m['rows'], 'partitions': m['ray']['partitions']}}))")
    single, single_wall, single_tree = run_measured(single_code)
    ray_out, ray_wall, ray_tree = run_measured(ray_code)
    same = all(read_all(tmp / "single", f).equals(read_all(tmp / "ray", f)) for f in ("events", "train", "val", "test"))
    return {
        "input": info,
        "single_process": {"wall_s": round(single_wall, 1), "events_per_s": round(n_events / single_wall),
                           "peak_rss_mb": round(single["maxrss_mb"])},
        "ray": {"wall_s": round(ray_wall, 1), "events_per_s": round(n_events / ray_wall),
                "peak_tree_rss_mb": round(ray_tree), "partitions": ray_out["partitions"]},
        "ray_over_single_events_per_s": round(single_wall / ray_wall, 3),
        "outputs_identical": bool(same),
    }


def bench_train(steps: int, repeats: int, tmp: Path) -> dict:
    import ray

    from pipelines.runtime import init_ray
    from pipelines.train import run_train
    from recsys.config.experiment import load_experiment
    from recsys.config.presets import preset_path
    from recsys.data.sequences import load_dataset
    from recsys.paths import benchmark_dir

    ds = load_dataset(benchmark_dir())
    epochs = steps * 2048 / len(ds.splits["train"])
    cfg = load_experiment(preset_path("dare"), {"train": {"epochs": epochs, "eval_every": 10_000, "patience": None, "progress": False}})
    runs: dict[int, list[dict]] = {1: [], 2: []}
    init_ray(log_to_driver=False)  # workers' progress lines would break the one-JSON-object output
    try:
        for i in range(repeats):  # interleaved, so a burst of load from other jobs hits both sides
            for w in (1, 2):
                r = run_train(cfg, tmp / f"train{w}-{i}", workers=w, evaluate_test=False)
                runs[w].append({"samples_per_s": round(r["samples_per_s"]), "wall_s": round(r["wall_s"], 1)})
    finally:
        ray.shutdown()
    out = {f"workers_{w}": {"median_samples_per_s": float(np.median([x["samples_per_s"] for x in v])), "runs": v}
           for w, v in runs.items()}
    out["scaling_efficiency_2_workers"] = round(
        out["workers_2"]["median_samples_per_s"] / (2 * out["workers_1"]["median_samples_per_s"]), 3)
    out["config"] = {"model": "dare", "max_len": 200, "batch_size": 2048, "steps": steps}
    return out


# The test subset's settings (tests/test_pipeline_train.py): the first 60 users, the tiny DARE, 60 steps.
SUBSET_USERS = 60
SUBSET_TRAIN = {"batch_size": 2048, "epochs": 6.0, "eval_every": 20, "seed": 3, "lr": 0.03, "embedding_lr": 0.03}


def bench_equivalence(epochs: float, tmp: Path, subset: bool = False, model: dict | None = None) -> dict:
    import ray

    from recsys.train import loop
    import recsys.train.trainer as trainer
    from pipelines.runtime import init_ray
    from pipelines.train import run_train
    from recsys.config.experiment import load_experiment
    from recsys.config.presets import preset_path
    from recsys.data.sequences import load_dataset
    from recsys.paths import benchmark_dir

    ds = load_dataset(benchmark_dir())
    if subset:
        ds = trainer.user_subset(ds, SUBSET_USERS)
        cfg = load_experiment(preset_path("tiny"), {"train": SUBSET_TRAIN, "model": model or {}})
    else:
        steps = int(np.ceil(epochs * np.ceil(len(ds.splits["train"]) / 2048)))
        cfg = load_experiment(preset_path("dare"), {"train": {"epochs": epochs, "eval_every": max(1, steps // 3),
                                                                      "patience": None, "progress": False},
                                                            "model": model or {}})

    def curve(out: Path) -> list[float]:
        return [json.loads(line)["val_auc"] for line in (out / "log.jsonl").read_text().splitlines()]

    single = trainer.train(cfg, tmp / "eq-single", dataset=ds, evaluate_test=False)

    epoch_batches = loop.epoch_batches

    def reversed_rows(*args):
        for rows in epoch_batches(*args):
            yield rows[::-1].copy()

    loop.epoch_batches = reversed_rows  # the loop's own batch order, each training batch reversed
    try:
        floor = trainer.train(cfg, tmp / "eq-reversed", dataset=ds, evaluate_test=False)
    finally:
        loop.epoch_batches = epoch_batches
    init_ray(log_to_driver=False)
    try:
        two = run_train(cfg, tmp / "eq-ray2", workers=2, users=SUBSET_USERS if subset else None, evaluate_test=False)
    finally:
        ray.shutdown()
    ray_curve = [h["val_auc"] for h in two["history"]]
    one, rev = curve(tmp / "eq-single"), curve(tmp / "eq-reversed")
    return {
        "config": {"data": f"first {SUBSET_USERS} users" if subset else "full benchmark", "model": cfg.model.name,
                   "embedding_backend": cfg.model.embedding_backend, "max_len": cfg.model.max_len,
                   "batch_size": cfg.train.batch_size, "epochs": cfg.train.epochs, "steps": single.steps,
                   "validations_at": [h["step"] for h in two["history"]]},
        "best_val_auc": {"single_process": single.best_val["auc"], "ray_2_workers": two["best_val"]["auc"],
                         "single_process_rows_reversed": floor.best_val["auc"]},
        "best_val_auc_diff_2_workers": two["best_val"]["auc"] - single.best_val["auc"],
        "best_val_auc_diff_rows_reversed": floor.best_val["auc"] - single.best_val["auc"],
        "val_auc_curve": {"single_process": one, "ray_2_workers": ray_curve, "single_process_rows_reversed": rev},
        "max_abs_curve_diff_2_workers": max(abs(a - b) for a, b in zip(one, ray_curve)),
        "max_abs_curve_diff_rows_reversed": max(abs(a - b) for a, b in zip(one, rev)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--train-steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=2, help="training runs per worker count")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-preprocess", action="store_true")
    ap.add_argument("--equivalence-epochs", type=float, default=0.5, help="epochs of the 1-process vs 2-worker AUC check")
    ap.add_argument("--skip-equivalence", action="store_true")
    ap.add_argument("--equivalence-subset", action="store_true",
                    help="the equivalence check on the 2-worker test's subset and settings (tiny DARE, 60 steps)")
    ap.add_argument("--equivalence-model", default=None, help="model name override (dare, twin, din)")
    ap.add_argument("--equivalence-backend", default=None, help="embedding backend override (sparse, dense, fused)")
    add_out_arg(ap, "ray_pipeline")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        result = {
            "benchmark": "ray_pipeline",
            "inputs": {"events": None if args.skip_preprocess else args.events,
                       "train_steps": None if args.skip_train else args.train_steps, "repeats": args.repeats,
                       "equivalence_epochs": None if args.skip_equivalence else args.equivalence_epochs,
                       "equivalence_subset": args.equivalence_subset, "equivalence_model": args.equivalence_model,
                       "equivalence_backend": args.equivalence_backend},
            "machine": {"memory_gb": round(psutil.virtual_memory().total / 2**30, 1)},
        }
        if not args.skip_preprocess:
            result["preprocess"] = bench_preprocess(args.events, tmp)
            print(json.dumps(result["preprocess"]), file=sys.stderr, flush=True)  # kept if training fails
        if not args.skip_train:
            result["train"] = bench_train(args.train_steps, args.repeats, tmp)
        if not args.skip_equivalence:
            model = ({"name": args.equivalence_model} if args.equivalence_model else {}) | (
                {"embedding_backend": args.equivalence_backend} if args.equivalence_backend else {})
            result["equivalence"] = bench_equivalence(args.equivalence_epochs, tmp, args.equivalence_subset, model)
    emit(result, args.out)


if __name__ == "__main__":
    main()
