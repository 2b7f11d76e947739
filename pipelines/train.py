"""Ray Train job: the ONE training loop (`recsys.train.loop.run_loop`) on N workers, fed by Ray Data.

Data: the driver plans contiguous user ranges with about equal training rows (`recsys.data.shards`, a pure
function of the folder and N: reruns and restarts get the same split) and hands Ray Data one dataset per
rank and file (`events.<r>`, `train.<r>`, `val.<r>`, `test.<r>`: the folder's Parquet filtered to the
rank's users, pushed down to the scan). Every worker reads its own with
`ray.train.get_dataset_shard(f"<file>.<rank>").iter_batches(...)` (in file order) and builds its histories
from its users' events only: a worker holds ~1/N of the events and rows, the driver holds none. Ray's own
streaming split is not used: its row assignment is not a function of the data, and resume must replay
the same rows.

Equivalence with one process: every worker takes `batch_size / N` rows of its shard per step, so a step
is one step on a global batch of `batch_size` rows, up to float rounding:
- BatchNorm layers become `SyncBatchNorm1d` (statistics and their gradients over the global batch);
- the ranks' batches are equally large (a rank with fewer rows wraps around its own order), so DDP's
  average of their mean-loss gradients is the global mean's gradient;
- sparse table gradients are all-reduced as sparse tensors, so SparseAdam updates the union of the
  workers' rows with their summed gradient, as on one process.
Validation is sharded: every rank scores its val users and the metrics merge from partials, the count
tables range-partitioned over the ranks (`GroupContext.all_to_all`), so no rank holds the whole split's.

Resources: the shard datasets are materialised (read into the object store, in file order) before `fit`,
while no worker holds a CPU; workers then only fetch their blocks, which needs no Ray Data task, so they
may take every CPU. Streaming the reads next to the workers hung on 2 CPUs (Ray Data's ListFiles and
ReadFiles operators found no CPU next to the training workers, also with the read tasks asking 0.25 or 0
CPU and the workers leaving 0.5 free). The object store holds the dataset once (spilling to disk beyond
its size); the driver holds only block references.

Fault tolerance: every rank reports its part of a checkpoint at every validation and Ray gathers the
files into one folder (rank 0: plain weights + optimizer state in safetensors, the step counter and the
validation history in JSON; with fused tables every rank also its table shards and their row-wise Adagrad
state, through torch.distributed.checkpoint: `recsys.checkpoint`); `FailureConfig(max_failures)` restarts the worker group, which re-reads its
shards and resumes from the latest checkpoint at the exact step (the data order is a function of seed,
epoch and rank). Each run gets a fresh storage folder, so no old checkpoint is ever picked up.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from recsys.config.experiment import ExperimentConfig, load_experiment
from recsys.data.schemas import SPLITS
from recsys.train.loop import Context, OnStep

# Rank 0's line at each validation; the driver reads it back for its progress bar.
_PROGRESS_LINE = re.compile(r"\[ray-train\] step (\d+)/(\d+)")


class GroupContext(Context):
    """Rank `rank` of `world` processes in the default torch.distributed group (gloo): the collectives the
    loop and the metric merge use. Ray Train's workers (`RayContext`) and the batch evaluation's actors
    (`pipelines.evaluate`) both run on it."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        if self.world == 1:
            return obj
        box = [obj if self.rank == 0 else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def all_to_all(self, objs: list[Any]) -> list[Any]:
        # one scatter per source rank: a rank receives only what is addressed to it (all_gather_object
        # would hand every rank every rank's objects)
        if self.world == 1:
            return list(objs)
        if len(objs) != self.world:
            raise ValueError(f"all_to_all: {len(objs)} objects for {self.world} ranks")
        out = []
        for src in range(self.world):
            box = [None]
            torch.distributed.scatter_object_list(box, list(objs) if self.rank == src else None, src=src)
            out.append(box[0])
        return out

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


class RayContext(GroupContext):
    """A Ray Train worker's context: the default gloo/NCCL group Ray Train set up, checkpoints reported."""

    def __init__(self) -> None:
        import ray.train

        ctx = ray.train.get_context()
        super().__init__(ctx.get_world_rank(), ctx.get_world_size())
        self.t0 = time.perf_counter()

    def wrap(self, model: nn.Module) -> nn.Module:
        import ray.train.torch

        # Sparse table gradients are all-reduced as sparse tensors over gloo; DDP broadcasts rank 0's weights.
        return ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"broadcast_buffers": True}) if self.world > 1 else model

    @contextmanager
    def resume_dir(self) -> Iterator[str | None]:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as d:
            yield d

    def save(self, write: Callable[[str], None], record: dict, metrics: dict) -> None:
        import tempfile

        import ray.train

        with tempfile.TemporaryDirectory() as d:
            write(d)  # every rank: with sharded tables each writes its own shard files
            # Ray uploads every rank's files into the one checkpoint folder
            checkpoint = ray.train.Checkpoint.from_directory(d) if os.listdir(d) else None
            if self.rank == 0:
                print(f"[ray-train] step {record['step']}/{self.total} epoch {record['epoch']} loss {record['train_loss']:.4f} "
                      f"val_auc {record['val_auc']:.4f} {metrics['samples_per_s']:.0f} samples/s "
                      f"({time.perf_counter() - self.t0:.0f}s)", flush=True)
            ray.train.report(metrics, checkpoint=checkpoint)

    def stepped(self, step: int, total: int, loss: float) -> None:
        self.total = total


def _train_loop(loop: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray.train

    from pipelines.shard_io import read_shard
    from recsys.train.loop import run_loop

    ctx = RayContext()
    torch.set_num_threads(loop["threads"])
    shard = read_shard(lambda name: ray.train.get_dataset_shard(f"{name}.{ctx.rank}"), loop["folder"], loop["plan"],
                       ctx.rank, loop["splits"], loop["n_items"], loop["n_cates"], loop["meta"])
    r = run_loop(loop["config"], shard, ctx, Path(loop["out"]), evaluate_test=loop["evaluate_test"], on_step=loop["on_step"])
    if ctx.rank == 0:  # Ray keeps only metrics reported with a checkpoint: the summary goes beside best/
        (Path(loop["out"]) / "loop.json").write_text(json.dumps(r))


def run_train(
    config: ExperimentConfig | str | Path,
    out_dir: str | Path,
    workers: int = 2,
    *,
    address: str | None = None,
    use_gpu: bool = False,
    users: int | None = None,
    max_failures: int = 2,
    keep_checkpoints: int = 2,
    evaluate_test: bool = True,
    progress: Callable[[int, int], None] | None = None,
    on_step: OnStep | None = None,
) -> dict:
    """Train `config` on `workers` Ray Train workers, each on its user range of the config's dataset folder;
    export the best-by-val-AUC weights as a bundle in `out_dir/bundle` (`out_dir` must be on storage every
    node sees). Returns {bundle_dir, best_step, best_val, test, steps, workers, samples_per_s, history (every
    validation of the surviving timeline), shards (user bounds and training rows per rank), ranks (what each
    worker read: its user range, events, rows per split), storage, wall_s}.
    `users`: train on users 0..users-1 only (their rows; `recsys.train.trainer.user_subset`'s rows).
    `progress(step, total_steps)`: called at each validation, from rank 0's progress line as Ray forwards it
    (so it works whether Ray's output goes to the terminal or to a `ray_log_file`).
    `on_step(rank, step)`: called on every worker before each step (tests inject faults with it)."""
    from ray.data import ExecutionOptions
    from ray.train import (
        CheckpointConfig,
        DataConfig,
        FailureConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchTrainer

    from pipelines.runtime import on_worker_lines, ray_session
    from pipelines.shard_io import shard_datasets
    from recsys.bundle import export_bundle
    from recsys.data.shards import folder_vocabulary, id_space, plan_shards
    from recsys.train.loop import per_rank_batch, plain_model

    cfg = load_experiment(config)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("best", "best.new", "best.old"):  # a previous run's best weights must not be exported
        shutil.rmtree(out / stale, ignore_errors=True)
    (out / "loop.json").unlink(missing_ok=True)
    t_start = time.perf_counter()
    per_rank_batch(cfg.train.batch_size, workers)  # fail before Ray starts
    folder = cfg.data_path()
    n_items, n_cates, _, meta = id_space(folder)
    plan = plan_shards(folder, workers, users)
    splits = tuple(s for s in SPLITS if s != "test" or evaluate_test)
    run_name = f"train-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
    with ray_session(address=address) as res:
        cpus_per_worker = max(1, int(res.cpus // workers)) if address is None else 1
        loop = {"config": cfg, "folder": str(folder), "out": str(out), "plan": plan, "splits": splits, "n_items": n_items,
                "n_cates": n_cates, "meta": meta, "threads": cpus_per_worker, "evaluate_test": evaluate_test, "on_step": on_step}
        # preserve_order: a worker's rows come in file order, so its permutation picks the same rows on every run
        ingest = ExecutionOptions(preserve_order=True)
        trainer = TorchTrainer(
            _train_loop,
            train_loop_config=loop,
            datasets=shard_datasets(folder, plan, splits),
            dataset_config=DataConfig(datasets_to_split=[], execution_options=ingest),
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus_per_worker}),
            run_config=RunConfig(
                name=run_name,
                storage_path=str(out / "ray"),
                checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
                failure_config=FailureConfig(max_failures=max_failures),
            ),
        )

        def on_line(line: str) -> None:
            m = _PROGRESS_LINE.search(line)
            if m and progress is not None:
                progress(int(m.group(1)), int(m.group(2)))

        with on_worker_lines(on_line):
            result = trainer.fit()
    if result.error is not None:
        raise result.error
    r = json.loads((out / "loop.json").read_text())
    model = plain_model(cfg, out / "best", n_items, n_cates)  # sharded tables: every rank's shard files
    metrics = {"best_step": r["best_step"], "val": r["best_val"]} | ({"test": r["test"]} if r["test"] else {})
    bundle_dir = export_bundle(model, cfg, out / "bundle", metrics, _FolderInfo(meta),
                               vocab=folder_vocabulary(folder, n_items, n_cates))
    summary = {
        "bundle_dir": str(bundle_dir),
        "best_step": r["best_step"],
        "best_val": r["best_val"],
        "test": r["test"],
        "steps": r["steps"],
        "workers": workers,
        "samples_per_s": float(np.median([m["samples_per_s"] for m in r["history"]])) if r["history"] else float("nan"),
        "history": r["history"],
        "shards": {"user_bounds": list(plan.bounds), "train_rows": list(plan.rows)},
        "ranks": r["ranks"],
        "storage": str(out / "ray" / run_name),
        "wall_s": time.perf_counter() - t_start,
    }
    (out / "result.json").write_text(json.dumps(summary, indent=2))
    return summary


class _FolderInfo:
    """What the bundle export reads of a dataset besides its vocabulary (its meta), for a folder the driver
    does not load."""

    def __init__(self, meta: dict) -> None:
        self.meta = meta
