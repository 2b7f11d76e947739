"""Memory of one training worker's shard, stage by stage: what a rank's events and rows cost in RSS.

Two ways of building rank `--rank`'s Shard of a dataset folder (e.g. one written by
`pipelines.preprocess.run_preprocess` from benchmarks/ray_pipeline.py's `write_events`):
- `arrow` (in this process): the rank's rows read with pyarrow (the part files overlapping its user range,
  the range filter pushed down, as `pipelines.shard_io.shard_datasets` reads them), then
  `recsys.data.sequences.store_from_table` and `samples_from_table` one after the other, the tables
  dropped, then `--batches` training batches assembled (`recsys.train.loop.epoch_batches` + `assemble`,
  the dare preset's max_len); after each stage the RSS and the stage's peak (VmHWM, reset between stages
  through /proc/self/clear_refs);
- `ray` (a local Ray, one actor standing in for a Ray Train worker): the rank's datasets materialised by
  `shard_datasets`, the actor builds the Shard with `pipelines.shard_io.read_shard` (Ray Data blocks from
  the object store, as a training worker fetches them), then assembles the same batches.
`--score`: then one validation's scoring of the val rows (`split_partial`, the dare preset's model).
Prints one JSON object: per stage RSS and peak in MB (anonymous and shared-memory parts: object-store pages
a Ray worker has mapped count as shared), the shard's arrays' own size, and the steady (after the batches)
and peak (reading, converting, batches) bytes per event and per row of the rank: RSS minus the process's
RSS before reading anything; per event also the anonymous (private) part and the arrays'.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

MiB = 2**20


def mem() -> dict[str, float]:
    """This process's RSS, its peak since the last reset, and RSS's anonymous and shared-memory parts (MB)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssShmem", "RssFile"):
            fields[key] = int(value.split()[0]) / 1024
    return {"rss": fields["VmRSS"], "peak": fields["VmHWM"], "anon": fields["RssAnon"], "shmem": fields["RssShmem"]}


def reset_peak() -> None:
    """VmHWM := VmRSS (Linux: writing 5 to clear_refs resets the peak RSS)."""
    Path("/proc/self/clear_refs").write_text("5")


class Stages:
    def __init__(self) -> None:
        # what the stages call is imported before the baseline (torch and the loop's imports are ~200 MB)
        import recsys.data.sequences  # noqa: F401
        import recsys.data.shards  # noqa: F401
        import recsys.models  # noqa: F401
        import recsys.train.evaluation  # noqa: F401
        import recsys.train.loop  # noqa: F401

        gc.collect()
        self.base = mem()
        self.rows: dict[str, dict] = {}
        reset_peak()

    def mark(self, name: str) -> None:
        m = mem()
        self.rows[name] = {k: round(v, 1) for k, v in m.items()}
        gc.collect()
        reset_peak()


def array_mb(shard) -> float:
    """What the shard's arrays themselves take (MB): the store's (item and cate once, as their padded
    reversed arrays), and every split's columns."""
    st = shard.store
    arrays = [st.offsets, *st.reversed_padded] + ([st.ts] if st.ts is not None else [])
    arrays += [getattr(v, c) for v in shard.splits.values() for c in ("user", "pos", "item", "cate", "label")]
    return sum(x.nbytes for x in arrays) / MiB


def batches(shard, n: int, max_len: int, per_worker: int) -> None:
    from recsys.data.sequences import assemble
    from recsys.train.loop import epoch_batches

    train = shard.splits["train"]
    for i, rows in enumerate(epoch_batches(len(train), len(train), per_worker, 1, 0, shard.rank)):
        if i == n:
            break
        assemble(shard.store, train, rows, max_len)


def score(shard, folder: Path) -> None:
    """A validation's scoring of the rank's val rows: the dare preset's model, untrained (the arrays a
    validation holds do not depend on the weights), through `split_partial` as the training loop calls it."""
    from recsys.config.experiment import load_experiment
    from recsys.config.presets import preset_path
    from recsys.data.shards import id_space
    from recsys.models import build_model
    from recsys.train.evaluation import split_partial

    cfg = load_experiment(preset_path("dare"), {"data": str(folder)})
    n_items, n_cates, _, _ = id_space(folder)
    split_partial(build_model(cfg.model, n_items, n_cates), shard, "val", cfg.model.max_len, cfg.train.eval_batch_size)


def arrow_path(folder: Path, plan, rank: int, splits: tuple[str, ...], a) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from recsys.data.layout import data_files, files_for_users
    from recsys.data.manifest import read_manifest
    from recsys.data.sequences import EVENT_COLUMNS, samples_from_table, store_from_table
    from recsys.data.shards import Shard

    lo, hi = plan.users(rank)
    manifest = read_manifest(folder)
    st = Stages()

    def read(name: str) -> pa.Table:
        files = files_for_users(folder, name, lo, hi, manifest) or data_files(folder, name)[:1]
        columns = [c for c in EVENT_COLUMNS if c != "ts"] if name == "events" else None
        return pa.concat_tables([pq.read_table(f, columns=columns, filters=[("user", ">=", lo), ("user", "<", hi)])
                                 for f in files])

    events = read("events")
    tables = {s: read(s) for s in splits}
    st.mark("arrow_read")
    store = store_from_table(events, "events", (lo, hi), times=False)
    st.mark("store")
    samples = {s: samples_from_table(t, s, store) for s, t in tables.items()}
    st.mark("samples")
    del events, tables
    pa.default_memory_pool().release_unused()  # what arrow's allocator keeps cached for reuse
    st.mark("tables_dropped")
    shard = Shard(store, samples, 0, 0, {}, plan, rank)
    batches(shard, a.batches, a.max_len, a.per_worker)
    st.mark("batches")
    if a.score:
        score(shard, folder)
        st.mark("score_val")
    return {"base": st.base, "stages": st.rows, "events": len(store.item), "rows": {s: len(v) for s, v in samples.items()},
            "arrays_mb": round(array_mb(shard), 1)}


def ray_path(folder: Path, plan, rank: int, splits: tuple[str, ...], a) -> dict:
    import ray

    from pipelines.runtime import ray_session
    from pipelines.shard_io import shard_datasets

    @ray.remote(num_cpus=0)
    class Worker:
        def run(self, datasets: dict) -> dict:
            from pipelines.shard_io import read_shard

            st = Stages()
            shard = read_shard(lambda name: datasets[f"{name}.{rank}"], str(folder), plan, rank, splits, 0, 0, {})
            st.mark("read_shard")
            batches(shard, a.batches, a.max_len, a.per_worker)
            st.mark("batches")
            if a.score:
                score(shard, folder)
                st.mark("score_val")
            return {"base": st.base, "stages": st.rows, "events": len(shard.store.item),
                    "rows": {s: len(v) for s, v in shard.splits.items()}, "arrays_mb": round(array_mb(shard), 1)}

    with ray_session(num_cpus=2, object_store_mb=a.object_store_mb):
        mine = shard_datasets(folder, plan, splits, ranks=[rank])
        return ray.get(Worker.remote().run.remote(mine))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--via", choices=["arrow", "ray"], default="arrow")
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--splits", nargs="+", default=["train", "val"], help="what a training worker reads (no test)")
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--per-worker", type=int, default=512, help="rows per batch (benchmarks/scale.py's)")
    ap.add_argument("--max-len", type=int, default=200, help="the dare preset's")
    ap.add_argument("--score", action="store_true", help="also score the val rows once (a validation)")
    ap.add_argument("--object-store-mb", type=int, default=768, help="--via ray: the object store (benchmarks/scale.py's per node)")
    a = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from recsys.data.shards import plan_shards

    plan = plan_shards(a.folder, a.world)
    run = arrow_path if a.via == "arrow" else ray_path
    r = run(a.folder, plan, a.rank, tuple(a.splits), a)
    n_events, n_rows = r["events"], sum(r["rows"].values())
    base = r["base"]["rss"]
    steady = r["stages"]["batches"]["rss"] - base
    # the data's peak: reading, converting, the first batches (a validation's scoring is reported on its own)
    peak = max(s["peak"] for k, s in r["stages"].items() if k != "score_val") - base
    # the private part (anonymous memory: the arrays, the loaders' temporaries); the rest of RSS is mapped
    # object-store pages (shared with the store) and files
    anon = r["stages"]["batches"]["anon"] - r["base"]["anon"]
    r["per_event_bytes"] = {"steady": round(steady * MiB / n_events, 1), "peak": round(peak * MiB / n_events, 1),
                            "anon_steady": round(anon * MiB / n_events, 1),
                            "arrays": round(r["arrays_mb"] * MiB / n_events, 1)}
    # the same MB over the rank's rows (events and rows both grow with the data; a row costs less than an event)
    r["per_row_bytes"] = {"steady": round(steady * MiB / n_rows, 1), "peak": round(peak * MiB / n_rows, 1)}
    r["inputs"] = {"folder": str(a.folder), "via": a.via, "world": a.world, "rank": a.rank, "splits": a.splits,
                   "batches": a.batches, "per_worker": a.per_worker, "max_len": a.max_len, "score": a.score,
                   "object_store_mb": a.object_store_mb if a.via == "ray" else None}
    print(json.dumps(r))


if __name__ == "__main__":
    main()
