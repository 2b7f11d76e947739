"""Per-rank reading of a dataset folder on Ray: what a training worker and an evaluation actor hold.

The driver plans the user ranges (`recsys.data.shards.plan_shards`) and `shard_datasets` gives one
materialised Ray dataset per rank and data name (events, each split): the rows of the rank's users in user
order, read from the part files the manifest says overlap the range (`recsys.data.layout.files_for_users`),
the range filter pushed down to the Parquet scan (row groups outside the range are skipped by their statistics).
The reads run before the workers or actors take their CPUs; a worker or actor then only fetches its
blocks (`read_shard`), which needs no Ray Data task. The driver holds block references only.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from recsys.data.shards import Shard, ShardPlan


def shard_datasets(folder: Path, plan: ShardPlan, splits: tuple[str, ...], ranks=None) -> dict:
    """{"<name>.<rank>": materialised dataset} for the events and each split; `ranks`: only these ranks'
    (benchmarks/shard_memory.py measures one)."""
    import ray.data
    from ray.data.expressions import col, lit

    from recsys.data.layout import data_files, files_for_users
    from recsys.data.manifest import read_manifest
    from recsys.data.sequences import EVENT_COLUMNS

    manifest = read_manifest(folder)
    out = {}
    for name in ("events", *splits):
        for r in range(plan.world) if ranks is None else ranks:
            lo, hi = plan.users(r)
            # part files (and a single file's row groups, by their statistics) outside the range are never read;
            # a range no file overlaps still gets a dataset of the file's columns, filtered empty
            files = files_for_users(folder, name, lo, hi, manifest) or data_files(folder, name)[:1]
            # the events' times are not read: nothing a worker trains or scores reads them
            columns = [c for c in EVENT_COLUMNS if c != "ts"] if name == "events" else None
            ds = ray.data.read_parquet([str(f) for f in files], columns=columns)
            ds = ds.filter(expr=(col("user") >= lit(lo)) & (col("user") < lit(hi)))
            ds.context.execution_options.preserve_order = True
            out[f"{name}.{r}"] = ds.materialize()
    return out


def read_shard(dataset: Callable[[str], Any], folder: str | Path, plan: ShardPlan, rank: int, splits: tuple[str, ...],
               n_items: int, n_cates: int, meta: dict) -> Shard:
    """Rank `rank`'s Shard from `dataset(name)`, an iterable of its rows of file `name` (the dataset of
    `shard_datasets`, or Ray Train's `get_dataset_shard` of it), read in file order. The blocks are streamed:
    each is copied into the shard's arrays (sized from the manifest's rows per user) and released before the
    next is fetched, so a worker pins one block of the object store at a time, not its whole shard."""
    from recsys.data.manifest import read_manifest
    from recsys.data.shards import shard_from_blocks, shard_rows

    lo, hi = plan.users(rank)
    manifest = read_manifest(folder)
    return shard_from_blocks(lambda name: dataset(name).iter_batches(batch_size=None, batch_format="pyarrow"),
                             lambda name: shard_rows(folder, name, lo, hi, manifest), folder, plan, rank, splits,
                             n_items, n_cates, meta)
