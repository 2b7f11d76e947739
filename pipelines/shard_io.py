"""Per-rank reading of a dataset folder on Ray: what a training worker and an evaluation actor hold.

The driver plans the user ranges (`recsys.data.shards.plan_shards`) and `shard_datasets` gives one
materialised Ray dataset per rank and file: the file's rows of the rank's users in file order, the range
filter pushed down to the Parquet scan (row groups outside the range are skipped by their statistics).
The reads run before the workers or actors take their CPUs; a worker or actor then only fetches its
blocks (`read_shard`), which needs no Ray Data task. The driver holds block references only.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from recsys.data.shards import Shard, ShardPlan


def shard_datasets(folder: Path, plan: ShardPlan, splits: tuple[str, ...]) -> dict:
    """{"<file>.<rank>": materialised dataset} for events.parquet and each split."""
    import ray.data
    from ray.data.expressions import col, lit

    out = {}
    for name in ("events", *splits):
        for r in range(plan.world):
            lo, hi = plan.users(r)
            ds = ray.data.read_parquet(str(folder / f"{name}.parquet"))
            ds = ds.filter(expr=(col("user") >= lit(lo)) & (col("user") < lit(hi)))
            ds.context.execution_options.preserve_order = True
            out[f"{name}.{r}"] = ds.materialize()
    return out


def read_shard(dataset: Callable[[str], Any], folder: str | Path, plan: ShardPlan, rank: int, splits: tuple[str, ...],
               n_items: int, n_cates: int, meta: dict) -> Shard:
    """Rank `rank`'s Shard from `dataset(name)`, an iterable of its rows of file `name` (the dataset of
    `shard_datasets`, or Ray Train's `get_dataset_shard` of it), read in file order."""
    import pyarrow as pa

    from recsys.data.sequences import EVENT_COLUMNS, SAMPLE_COLUMNS
    from recsys.data.shards import shard_from_tables

    def table(name: str, columns) -> pa.Table:
        parts = list(dataset(name).iter_batches(batch_size=None, batch_format="pyarrow"))
        if not parts:  # no rows in this range: an empty table of the file's columns
            return pa.table({c: pa.array([], pa.int64()) for c in columns})
        return pa.concat_tables(parts, promote_options="default")

    events = table("events", EVENT_COLUMNS)
    tables = {s: table(s, SAMPLE_COLUMNS) for s in splits}
    return shard_from_tables(events, tables, folder, plan, rank, n_items, n_cates, meta)
