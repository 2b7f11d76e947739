"""Batch evaluation of a model bundle on Ray: every actor reads and scores one user range of the split.

The driver plans `workers` contiguous user ranges with about equal rows of the split (from the folder's
manifest, else the split's user column: `recsys.data.shards.plan_shards`) and reads each range's events
and split rows into the object store with the training workers' per-range reading
(`pipelines.shard_io`); it never loads the split. Each actor loads the bundle once (eval mode: a row's
score does not depend on its batch), builds its range's Shard (histories from its own users' events),
scores its rows (`recsys.train.evaluation.split_partial`) and merges the metrics with the other actors
over a gloo process group (`merge_split` on `pipelines.train.GroupContext`, the training workers' code):
no process, the driver included, holds the split's count tables, each actor about 1/workers of them.
Every actor returns the same metrics, equal bit for bit to `recsys.train.evaluation.split_metrics` on one
process for the same scores (a row scored in a batch of another size can differ in the last bit).
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

    def endpoint(self) -> str:
        """An address for the process group's rendezvous on this actor's node (the OS picks a free port)."""
        import socket

        import ray

        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((ip, 0))
            return f"tcp://{ip}:{s.getsockname()[1]}"

    def score(self, datasets: dict, folder: str, plan, rank: int, split: str, n_items: int, n_cates: int,
              meta: dict, batch_size: int, endpoint: str) -> tuple[dict, dict]:
        """(the whole split's metrics, what the actor held: its users, events and rows); every actor of the
        plan must run it at once (they merge over one process group)."""
        from datetime import timedelta

        import torch.distributed as dist

        from pipelines.shard_io import read_shard
        from pipelines.train import GroupContext
        from recsys.train.evaluation import merge_split, split_partial

        shard = read_shard(datasets.__getitem__, folder, plan, rank, (split,), n_items, n_cates, meta)
        held = {"users": list(plan.users(rank)), "events": len(shard.store.item), "rows": len(shard.splits[split])}
        part = split_partial(self.bundle.model, shard, split, self.bundle.config.model.max_len, batch_size)
        del shard
        if plan.world == 1:
            return merge_split(part, GroupContext(0, 1)), held
        dist.init_process_group("gloo", init_method=endpoint, rank=rank, world_size=plan.world, timeout=timedelta(minutes=30))
        try:
            metrics = merge_split(part, GroupContext(rank, plan.world))
            # rank 0 hosts the group's store: a rank tearing down while another still talks to it can abort
            # that process (seen in the spawned test ranks, tests/dist_support.leave_group); after an error
            # the others may never get here, so only the normal end waits
            dist.barrier()
            return metrics, held
        finally:
            dist.destroy_process_group()


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
        endpoint = ray.get(actors[0].endpoint.remote())
        done = ray.get([a.score.remote({n: datasets[f"{n}.{r}"] for n in ("events", split)}, str(folder), plan, r, split,
                                       n_items, n_cates, meta, batch_size, endpoint) for r, a in enumerate(actors)])
        for a in actors:
            ray.kill(a)
    metrics = done[0][0]
    if any(repr(m) != repr(metrics) for m, _ in done[1:]):  # repr: a float's exact digits, and NaN equals NaN
        raise RuntimeError(f"evaluation actors disagree on the metrics: {[m for m, _ in done]}")
    if metrics["rows"] != sum(plan.rows):
        raise RuntimeError(f"evaluation scored {metrics['rows']} rows of {sum(plan.rows)}")
    wall = time.perf_counter() - t0
    return metrics | {"rows_per_s": metrics["rows"] / wall, "wall_s": wall, "ranks": [h for _, h in done]}
