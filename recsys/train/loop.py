"""The ONE training loop: the single-process trainer runs it with the one-rank `Context`, every Ray Train
worker with a distributed one (`pipelines.train.RayContext`: rank, world, gather, checkpoint reporting).

Data: each rank trains on its `Shard` (a contiguous user range, `recsys.data.shards`) with a fixed
per-rank batch of `batch_size / world` rows, so a step's global batch is `batch_size` rows. Per epoch rank
r walks a seeded permutation of its own rows (seed, epoch, rank; rank 0 of one process keeps the order
`batch_rows` always gave), `steps_per_epoch = ceil(max rows of a rank / per-rank batch)`; a rank with
fewer rows wraps around its permutation (as torch's DistributedSampler pads), so every rank takes equally
many rows at every step and DDP's average of the ranks' mean gradients is the global batch's mean.
The order depends on seed, epoch and rank only: a resumed run replays it exactly.

Validation: every rank scores its own val users and the metrics are merged from mergeable partials
(`recsys.train.evaluation.merge_split`: count tables range-partitioned over the ranks, no rank holds the
split's), equal to the single-process metrics; every rank gets them, so early stopping is decided
identically everywhere. With sharded (`fused`) tables the sharded model itself scores (a lookup
is a collective: every rank runs as many batches as the rank with the most rows, padding with a filler
batch). Checkpoints and the best weights (`out/best`) are weights folders (`recsys.checkpoint`): rank 0
writes the plain tensors, the dense optimizers' state and the state with the validation history; with
sharded tables every rank writes its own table shards and their row-wise Adagrad state, and on resume
every rank loads its own (no rank gathers a table). At the end every rank loads the best weights and
scores its test users.

Tests inject faults through `on_step(rank, step)`, called before each step; production passes none.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from recsys.checkpoint import load_state_tensors, load_weights, read_weights, save_weights
from recsys.config.experiment import ExperimentConfig
from recsys.data.sequences import assemble, user_share
from recsys.data.shards import Shard
from recsys.train.evaluation import merge_split, split_partial
from recsys.train.step import (
    load_optimizer_state,
    make_optimizers,
    optimizer_state,
    train_step,
)

OnStep = Callable[[int, int], None]


class Context:
    """One process: rank 0 of 1. Subclasses run the same loop on several ranks."""

    rank = 0
    world = 1

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the training step calls (DDP over the ranks)."""
        return model

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        return [obj]

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        return obj

    def all_to_all(self, objs: list[Any]) -> list[Any]:
        """`objs[d]` goes to rank d; returns what every rank sent to this one, in rank order."""
        return list(objs)

    def barrier(self) -> None:
        pass

    @contextmanager
    def resume_dir(self) -> Iterator[str | None]:
        """The checkpoint folder to resume from, or None."""
        yield None

    def save(self, write: Callable[[str], None], record: dict, metrics: dict) -> None:
        """Called on every rank at each validation: `write(folder)` writes this rank's part of the checkpoint
        (call it on every rank: with sharded tables it is a collective), `record` is the validation's
        deterministic log line, `metrics` adds the timing."""

    def stepped(self, step: int, total: int, loss: float) -> None:
        pass


def per_rank_batch(batch_size: int, world: int) -> int:
    if batch_size % world:
        raise ValueError(f"train.batch_size {batch_size} must be a multiple of the {world} workers "
                         "(every worker takes batch_size / workers rows per step)")
    return batch_size // world


def epoch_batches(n_here: int, n_max: int, batch: int, seed: int, epoch: int, rank: int) -> Iterator[np.ndarray]:
    """Rank `rank`'s rows of each step of `epoch`: ceil(n_max / batch) steps of `batch` rows (the last
    step n_max - its start), taken from a seeded permutation of its n_here rows, wrapped around."""
    base = seed * 100_003 + epoch
    # int32 where the rows fit (half permutation(n_here)'s int64 bytes per row); shuffling an arange draws
    # the same swaps as permutation, so the order is permutation's
    order = np.arange(n_here, dtype=np.int32 if n_here <= np.iinfo(np.int32).max else np.int64)
    np.random.default_rng(base if rank == 0 else [base, rank]).shuffle(order)
    for a in range(0, n_max, batch):
        idx = np.arange(a, min(a + batch, n_max))
        yield order[idx % n_here] if n_max > n_here else order[idx]


def worker_model(cfg: ExperimentConfig, n_items: int, n_cates: int, world: int) -> nn.Module:
    """The model a rank trains (before DDP wraps it): seeded alike on every rank; with world > 1 its
    BatchNorm layers synchronised over the ranks (the same parameter and buffer tensors under the same
    names, so checkpoints load in one process); with the fused backend its tables built on the meta device
    and sharded by torchrec DMP over the default process group (the planner's layout; fbgemm's fused
    row-wise Adagrad updates each shard on its owner inside backward) and marked for DDP to leave alone."""
    from recsys.embeddings import table_sets
    from recsys.models import build_model
    from recsys.models.sync_batchnorm import convert_sync_batchnorm

    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    mc = cfg.model
    if mc.embedding_backend == "fused":
        # A sharded lookup is a collective, so every rank must look each set up equally often per forward;
        # length groups (group_rows) differ between the ranks' batches: one group per batch.
        mc = mc.model_copy(update={"group_rows": 2**62})
    model = build_model(mc, n_items, n_cates)
    if world > 1:
        model = convert_sync_batchnorm(model)
    if mc.embedding_backend == "fused":
        group = torch.distributed.group.WORLD if torch.distributed.is_initialized() else None
        sets = table_sets(model)
        for tables in sets.values():
            tables.shard(lr=cfg.train.embedding_lr, process_group=group)
        if world > 1:
            named = list(model.named_parameters()) + list(model.named_buffers())
            in_tables = [n for n, _ in named if n.startswith(tuple(f"{s}." for s in sets))]
            torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, in_tables)
    return model


def plain_model(cfg: ExperimentConfig, folder: str | Path, n_items: int, n_cates: int) -> nn.Module:
    """A weights folder (the best weights, a checkpoint) as one unsharded model in eval mode, fused tables as
    plain ones (what bundles hold and serving loads): one process, no process group."""
    from recsys.models import build_model

    mc = cfg.model if cfg.model.embedding_backend != "fused" else cfg.model.model_copy(update={"embedding_backend": "sparse"})
    model = build_model(mc, n_items, n_cates)
    load_state_tensors(model, read_weights(folder))
    return model.eval()


def save_checkpoint(dirname: str, model: nn.Module, opt, state: dict, rank: int = 0) -> None:
    """A checkpoint: the weights folder (with sharded tables also their optimizer state), the dense (and
    sparse-table) optimizers, the state. Every rank calls it; with sharded tables it is a collective."""
    save_weights(model, dirname, rank, optimizer=True)
    if rank == 0:
        tensors, meta = optimizer_state(opt)
        save_file(tensors, os.path.join(dirname, "optim.safetensors"))
        Path(dirname, "state.json").write_text(json.dumps(state | {"optimizers": meta}))


def restore_checkpoint(dirname: str, model: nn.Module, opt) -> dict:
    """Load a checkpoint written by `save_checkpoint` into `model` and `opt` (on every rank; each rank
    reads its own table shards) -> its state."""
    load_weights(model, dirname, optimizer=True)
    saved = json.loads(Path(dirname, "state.json").read_text())
    load_optimizer_state(opt, load_file(os.path.join(dirname, "optim.safetensors")), saved.pop("optimizers"))
    return saved


def _write_best(out: Path, model: nn.Module, ctx: Context) -> None:
    """out/best, replaced whole: written beside it (every rank its shards), then renamed by rank 0."""
    new, best, old = out / "best.new", out / "best", out / "best.old"
    if ctx.rank == 0:
        shutil.rmtree(new, ignore_errors=True)
    ctx.barrier()  # nobody writes into best.new before rank 0 has cleared it
    save_weights(model, new, ctx.rank)
    if ctx.rank == 0:  # DCP's save returns on rank 0 once every rank's files are written
        shutil.rmtree(old, ignore_errors=True)
        if best.exists():
            best.rename(old)
        new.rename(best)
        shutil.rmtree(old, ignore_errors=True)


def _eval_batches(ctx: Context, shard: Shard, batch_size: int) -> dict[str, int]:
    """Per split, the most scoring batches any rank runs (every rank runs that many with sharded tables)."""
    counts = ctx.gather({s: math.ceil(len(v) / batch_size) for s, v in shard.splits.items()})
    return {s: max(c[s] for c in counts) for s in counts[0]}


def run_loop(cfg: ExperimentConfig, shard: Shard, ctx: Context, out: Path, *, evaluate_test: bool = True,
             on_step: OnStep | None = None) -> dict:
    """Train `cfg` on this rank's `shard`; see the module docstring. Returns (on every rank) {steps,
    best_step, best_val, test (metrics of the best weights, or None), history (every validation of the
    surviving timeline), ranks (what each rank read: `_held`), samples_per_s (median global rows per second of a step, the first 10 steps
    excluded), stopped_early}. The best weights are in `out/best` (`plain_model` reads them)."""
    tc, mc = cfg.train, cfg.model
    rank, world = ctx.rank, ctx.world
    batch = per_rank_batch(tc.batch_size, world)
    model = worker_model(cfg, shard.n_items, shard.n_cates, world)
    if tc.val_users is not None and "val" in shard.splits:
        shard.splits["val"] = shard.splits["val"].take(user_share(shard.splits["val"].user, tc.val_users))
    pad = _eval_batches(ctx, shard, tc.eval_batch_size) if mc.embedding_backend == "fused" else {}
    opt = make_optimizers(model, tc)
    state: dict = {"step": 0, "best_auc": -1.0, "best_step": 0, "best_val": {}, "bad": 0, "stopped_early": False, "history": []}
    resumed_from = None
    with ctx.resume_dir() as d:
        if d is not None:
            state = restore_checkpoint(d, model, opt)
            resumed_from = state["step"]
    ddp = ctx.wrap(model)
    train_rows = shard.splits["train"]
    n_max = max(shard.plan.rows)
    steps_per_epoch = math.ceil(n_max / batch)
    total_steps = math.ceil(tc.epochs * steps_per_epoch)
    aux = mc.aux_weight if mc.aux_loss else 0.0
    model.train()
    rates: list[float] = []
    while state["step"] < total_steps and not state["stopped_early"]:
        epoch, skip = divmod(state["step"], steps_per_epoch)
        for i, rows in enumerate(epoch_batches(len(train_rows), n_max, batch, tc.seed, epoch, rank)):
            if i < skip:
                continue
            if on_step is not None:
                on_step(rank, state["step"])
            b = assemble(shard.store, train_rows, rows, mc.max_len)
            t0 = time.perf_counter()
            loss = train_step(ddp, b, opt, aux)
            rates.append(world * len(rows) / (time.perf_counter() - t0))
            state["step"] += 1
            ctx.stepped(state["step"], total_steps, loss)
            if state["step"] % tc.eval_every == 0 or state["step"] == total_steps:
                _validate(cfg, shard, ctx, out, model, opt, state, epoch, loss, resumed_from,
                          float(np.median(rates[-tc.eval_every:])), pad)
                if state["stopped_early"]:
                    break
            if state["step"] >= total_steps:
                break

    ctx.barrier()  # the best weights are written
    load_weights(model, out / "best")
    model.eval()
    test = None
    if evaluate_test and "test" in shard.splits:
        test = merge_split(split_partial(model, shard, "test", mc.max_len, tc.eval_batch_size, pad.get("test")), ctx)
    steady = rates[10:] or rates
    ranks = ctx.gather(_held(shard))
    return {"ranks": ranks, "steps": state["step"], "best_step": state["best_step"], "best_val": state["best_val"], "test": test,
            "history": state["history"], "samples_per_s": float(np.median(steady)) if steady else float("nan"),
            "stopped_early": bool(state["stopped_early"])}


def _held(shard: Shard) -> dict:
    """What this rank read: its user range, its events, and per split the rows and [min, max, distinct] of
    their users; and its process's peak RSS so far (MB)."""
    def users(u: np.ndarray) -> list[int]:
        return [int(u.min()), int(u.max()), len(np.unique(u))] if len(u) else []

    return {"users": list(shard.plan.users(shard.rank)), "events": len(shard.store.item),
            "rows": {s: len(v) for s, v in shard.splits.items()}, "row_users": {s: users(v.user) for s, v in shard.splits.items()},
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}


def _validate(cfg, shard: Shard, ctx: Context, out: Path, model: nn.Module, opt, state: dict, epoch: int, loss: float,
              resumed_from: int | None, samples_per_s: float, pad: dict[str, int]) -> None:
    tc, mc = cfg.train, cfg.model
    val = merge_split(split_partial(model, shard, "val", mc.max_len, tc.eval_batch_size, pad.get("val")), ctx)
    improved = val["auc"] > state["best_auc"]
    if improved:
        state.update(best_auc=val["auc"], best_step=state["step"], best_val=val, bad=0)
        _write_best(out, model, ctx)
    else:
        state["bad"] += 1
        if tc.patience is not None and state["bad"] >= tc.patience:
            state["stopped_early"] = True
    # the ranks' losses are means over equally many rows: their mean is the global batch's loss
    train_loss = float(np.mean(ctx.gather(loss)))
    record = {"step": state["step"], "epoch": epoch, "train_loss": train_loss, "improved": improved} | {f"val_{k}": v for k, v in val.items()}
    metrics = record | {"samples_per_s": samples_per_s, "resumed_from": resumed_from}
    # The history travels in the checkpoint: after a restart it holds exactly the validations up to the
    # checkpoint resumed from, then the new ones.
    state["history"].append(metrics)
    ctx.save(lambda d: save_checkpoint(d, model, opt, state, ctx.rank), record, metrics)
