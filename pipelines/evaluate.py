"""Batch evaluation of a model bundle on Ray: the split's rows scored in parallel by scoring actors.

Each actor loads the bundle once (eval mode, so a row's score does not depend on its batch) and maps the
dataset's CSR events zero-copy from the object store; Ray Data feeds it row-index batches. The driver
puts the scores back in row order and computes the trainer's metric set (`recsys.metrics.ctr_metrics`),
so the result equals `recsys.train.trainer.evaluate` on one process.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np


class _Scorer:
    """A Ray Data actor: one loaded bundle, many batches."""

    def __init__(self, bundle_dir: str, data_ref, split: str, threads: int):
        import ray
        import torch

        from recsys.bundle import load_bundle

        torch.set_num_threads(threads)
        self.bundle = load_bundle(bundle_dir)
        self.ds = ray.get(data_ref)
        self.samples = self.ds.splits[split]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from recsys.data.sequences import assemble

        rows = batch["id"].astype(np.int64)
        with torch.no_grad():
            out = self.bundle.model(assemble(self.ds.store, self.samples, rows, self.bundle.config.model.max_len, trim=False))
        return {"id": rows, "prob": torch.sigmoid(out.logit).double().numpy()}


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
    import ray

    from pipelines.runtime import ray_session
    from recsys.bundle import load_bundle
    from recsys.data.sequences import load_dataset
    from recsys.metrics import ctr_metrics

    t0 = time.perf_counter()
    b = load_bundle(bundle_dir)
    ds = load_dataset(Path(data) if data else b.config.data_path(), splits=(split,))
    if ds.n_items > b.id_space["n_items"] or ds.n_cates > b.id_space["n_cates"]:
        raise ValueError(f"{bundle_dir}: dataset ids (items {ds.n_items}, cates {ds.n_cates}) exceed the bundle's id space {b.id_space}")
    samples = ds.splits[split]
    with ray_session(address=address) as res:
        threads = max(1, int(res.cpus // workers)) if address is None else 1
        # The row ids are materialised first: the actors may hold every CPU, and a lazy read stage behind
        # them would then never get one (the job hangs).
        rows = ray.data.range(len(samples), override_num_blocks=max(workers, len(samples) // batch_size + 1)).materialize()
        scored = (rows.map_batches(_Scorer, fn_constructor_args=(str(bundle_dir), ray.put(ds), split, threads),
                               batch_size=batch_size, batch_format="numpy", concurrency=workers, num_cpus=threads)
                  .to_arrow_refs())
        tables = ray.get(scored)
    ids = np.concatenate([t.column("id").to_numpy() for t in tables])
    probs = np.concatenate([t.column("prob").to_numpy() for t in tables])
    if len(ids) != len(samples) or len(np.unique(ids)) != len(samples):
        raise RuntimeError(f"evaluation scored {len(ids)} rows ({len(np.unique(ids))} distinct) of {len(samples)}")
    p = np.empty(len(samples))
    p[ids] = probs
    metrics = ctr_metrics(samples.label, p, samples.user, samples.cate)
    wall = time.perf_counter() - t0
    return metrics | {"rows_per_s": len(samples) / wall, "wall_s": wall}
