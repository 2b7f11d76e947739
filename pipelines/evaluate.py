"""Batch evaluation of a model bundle on Ray: the split's rows scored in parallel by scoring actors.

Each actor loads the bundle once (eval mode, so a row's score does not depend on its batch) and maps the
dataset's CSR events zero-copy from the object store; Ray Data feeds it chunks of the split's rows that hold
whole users. Per chunk it returns mergeable partial metrics (`recsys.metrics.ctr_partial`) instead of
per-row scores, and the driver merges them (`merge_ctr`) into the trainer's metric set: AUC, GAUC and
category AUC exactly as `recsys.metrics.ctr_metrics` on one process, logloss to float rounding, so the
result equals `recsys.train.trainer.split_metrics`.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def user_chunks(users: np.ndarray, rows_per_chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """(order, bounds): the split's rows sorted by user, and chunk bounds into `order` that cut only between
    users, each chunk about `rows_per_chunk` rows (a user with more rows is one chunk). GAUC merges per-user
    AUCs, so a user's rows must all be scored in one chunk."""
    order = np.argsort(users, kind="stable")
    u = users[order]
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]]) if len(u) else np.zeros(0, np.int64)
    # cut at the first user start at or after each multiple of rows_per_chunk
    cuts = starts[np.minimum(np.searchsorted(starts, np.arange(rows_per_chunk, len(u), rows_per_chunk)), len(starts) - 1)] if len(u) else starts
    bounds = np.unique(np.r_[0, cuts[cuts > 0], len(u)]) if len(u) else np.zeros(1, np.int64)
    return order, bounds.astype(np.int64)


class _Scorer:
    """A Ray Data actor: one loaded bundle, many user chunks."""

    def __init__(self, bundle_dir: str, data_ref, order_ref, split: str, threads: int):
        import ray
        import torch

        from recsys.bundle import load_bundle

        torch.set_num_threads(threads)
        self.bundle = load_bundle(bundle_dir)
        self.ds = ray.get(data_ref)
        self.order = ray.get(order_ref)
        self.samples = self.ds.splits[split]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import pickle

        import torch

        from recsys.data.sequences import assemble
        from recsys.metrics import ctr_partial

        out = []
        for start, end in zip(batch["start"], batch["end"]):
            rows = self.order[int(start):int(end)]
            with torch.no_grad():
                logit = self.bundle.model(assemble(self.ds.store, self.samples, rows, self.bundle.config.model.max_len, trim=False)).logit
            s = self.samples
            part = ctr_partial(s.label[rows], torch.sigmoid(logit).double().numpy(), s.user[rows], s.cate[rows])
            out.append(pickle.dumps(part, protocol=5))
        # pickled: the partials are nested arrays of varying length, one per chunk, not a table's columns
        return {"partial": np.array(out, dtype=object)}


def run_evaluate(
    bundle_dir: str | Path,
    split: str = "test",
    data: str | Path | None = None,
    *,
    workers: int = 2,
    batch_size: int = 4096,
    address: str | None = None,
) -> dict:
    """Metrics of `bundle_dir` on `split` of its dataset (or of the dataset folder `data`), scored by
    `workers` Ray actors. Returns the metric dict plus `rows_per_s` and `wall_s`."""
    import pickle

    import ray

    from pipelines.runtime import ray_session
    from recsys.bundle import load_bundle
    from recsys.data.sequences import load_dataset
    from recsys.metrics import merge_ctr

    t0 = time.perf_counter()
    b = load_bundle(bundle_dir)
    ds = load_dataset(Path(data) if data else b.config.data_path(), splits=(split,))
    if ds.n_items > b.id_space["n_items"] or ds.n_cates > b.id_space["n_cates"]:
        raise ValueError(f"{bundle_dir}: dataset ids (items {ds.n_items}, cates {ds.n_cates}) exceed the bundle's id space {b.id_space}")
    samples = ds.splits[split]
    with ray_session(address=address) as res:
        threads = max(1, int(res.cpus // workers)) if address is None else 1
        # chunks no larger than an even share, so every actor gets work on a small split
        order, bounds = user_chunks(samples.user, max(1, min(batch_size, -(-len(samples) // workers))))
        tables = []
        if len(bounds) > 1:
            # The chunk bounds are materialised first: the actors may hold every CPU, and a lazy read stage
            # behind them would then never get one (the job hangs).
            chunks = ray.data.from_items([{"start": int(lo), "end": int(hi)} for lo, hi in zip(bounds[:-1], bounds[1:])],
                                         override_num_blocks=min(len(bounds) - 1, 4 * workers)).materialize()
            tables = ray.get(chunks.map_batches(
                _Scorer, fn_constructor_args=(str(bundle_dir), ray.put(ds), ray.put(order), split, threads),
                batch_size=1, batch_format="numpy", concurrency=workers, num_cpus=threads).to_arrow_refs())
    parts = [pickle.loads(blob) for t in tables for blob in t.column("partial").to_pylist()]
    metrics = merge_ctr(parts)
    if metrics["rows"] != len(samples):
        raise RuntimeError(f"evaluation scored {metrics['rows']} rows of {len(samples)}")
    wall = time.perf_counter() - t0
    return metrics | {"rows_per_s": len(samples) / wall, "wall_s": wall}
