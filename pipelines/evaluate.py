"""Batch evaluation of a model bundle on Ray: every actor reads and scores one user range of the split.

The driver plans `workers` contiguous user ranges with about equal rows of the split (from the folder's
manifest, else the split's user column: `recsys.data.shards.plan_shards`) and reads each range's events
and split rows into the object store with the training workers' per-range reading
(`pipelines.shard_io`); it never loads the split. Each actor loads the bundle once (eval mode: a row's
score does not depend on its batch), builds its range's Shard (histories from its own users' events) and
returns the mergeable partial metrics of its rows (`recsys.train.evaluation.split_partial`); the driver
merges them (`merge_split`). Users are disjoint across ranges, so AUC, GAUC and category AUC equal
`recsys.train.evaluation.split_metrics` on one process bit for bit, logloss to float rounding.
"""

from __future__ import annotations

import time
from pathlib import Path


class _Scorer:
    """A Ray actor: one loaded bundle, one user range."""

    def __init__(self, bundle_dir: str, threads: int):
        import torch

        from recsys.bundle import load_bundle

        torch.set_num_threads(threads)
        self.bundle = load_bundle(bundle_dir)

    def score(self, datasets: dict, folder: str, plan, rank: int, split: str, n_items: int, n_cates: int,
              meta: dict, batch_size: int) -> tuple[dict, dict]:
        """(the range's split_partial, what the actor held: its users, events and rows)."""
        from pipelines.shard_io import read_shard
        from recsys.train.evaluation import split_partial

        shard = read_shard(datasets.__getitem__, folder, plan, rank, (split,), n_items, n_cates, meta)
        held = {"users": list(plan.users(rank)), "events": len(shard.store.item), "rows": len(shard.splits[split])}
        model = self.bundle.model
        return split_partial(model, shard, split, self.bundle.config.model.max_len, batch_size), held


def run_evaluate(
    bundle_dir: str | Path,
    split: str = "test",
    data: str | Path | None = None,
    *,
    workers: int = 2,
    batch_size: int = 4096,
    address: str | None = None,
) -> dict:
    """Metrics of `bundle_dir` on `split` of its dataset (or of the dataset folder `data`), each of `workers`
    Ray actors scoring one user range. Returns the metric dict plus `rows_per_s`, `wall_s` and `ranks`
    (per actor: its user range, the events and rows it read)."""
    import ray

    from pipelines.runtime import ray_session
    from pipelines.shard_io import shard_datasets
    from recsys.bundle import load_bundle
    from recsys.data.shards import id_space, plan_shards
    from recsys.train.evaluation import merge_split

    t0 = time.perf_counter()
    b = load_bundle(bundle_dir)
    folder = Path(data) if data else b.config.data_path()
    n_items, n_cates, _, meta = id_space(folder)
    if n_items > b.id_space["n_items"] or n_cates > b.id_space["n_cates"]:
        raise ValueError(f"{bundle_dir}: dataset ids (items {n_items}, cates {n_cates}) exceed the bundle's id space {b.id_space}")
    plan = plan_shards(folder, workers, split=split)
    with ray_session(address=address) as res:
        threads = max(1, int(res.cpus // workers)) if address is None else 1
        # read before the actors take the CPUs: a read stage behind actors holding every CPU never runs
        datasets = shard_datasets(folder, plan, (split,))
        scorer = ray.remote(num_cpus=threads)(_Scorer)
        actors = [scorer.remote(str(bundle_dir), threads) for _ in range(plan.world)]
        done = ray.get([a.score.remote({n: datasets[f"{n}.{r}"] for n in ("events", split)}, str(folder), plan, r, split,
                                       n_items, n_cates, meta, batch_size) for r, a in enumerate(actors)])
        for a in actors:
            ray.kill(a)
    metrics = merge_split([part for part, _ in done])
    if metrics["rows"] != sum(plan.rows):
        raise RuntimeError(f"evaluation scored {metrics['rows']} rows of {sum(plan.rows)}")
    wall = time.perf_counter() - t0
    return metrics | {"rows_per_s": metrics["rows"] / wall, "wall_s": wall, "ranks": [h for _, h in done]}
