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
(`recsys.train.evaluation`), equal to the single-process metrics; every rank gets them, so early stopping
is decided identically everywhere. Rank 0 writes the checkpoint (weights, optimizer state, the fused
tables' optimizer state, the state with the validation history) and the best weights (`out/best`).
At the end every rank loads the best weights and scores its test users.

Tests inject faults through `on_step(rank, step)`, called before each step; production passes none.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from recsys.checkpoint import load_state_tensors, state_tensors
from recsys.config.experiment import ExperimentConfig
from recsys.data.sequences import assemble
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

    def barrier(self) -> None:
        pass

    @contextmanager
    def resume_dir(self) -> Iterator[str | None]:
        """The checkpoint folder to resume from, or None."""
        yield None

    def save(self, write: Callable[[str], None], record: dict, metrics: dict) -> None:
        """Called on every rank at each validation: `write(folder)` writes the checkpoint (rank 0 only),
        `record` is the validation's deterministic log line, `metrics` adds the timing."""

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
    order = np.random.default_rng(base if rank == 0 else [base, rank]).permutation(n_here)
    for a in range(0, n_max, batch):
        idx = np.arange(a, min(a + batch, n_max))
        yield order[idx % n_here] if n_max > n_here else order[idx]


def worker_model(cfg: ExperimentConfig, n_items: int, n_cates: int, world: int) -> nn.Module:
    """The model a rank trains (before DDP wraps it): seeded alike on every rank; with world > 1 its
    BatchNorm layers synchronised over the ranks (the same parameter and buffer tensors under the same
    names, so checkpoints load in one process); with the fused backend its tables sharded by torchrec DMP
    over the default process group (table-wise; fbgemm's fused row-wise Adagrad updates each table on its
    owner inside backward) and marked for DDP to leave alone."""
    from recsys.embeddings import table_sets
    from recsys.models import build_model
    from recsys.models.sync_batchnorm import convert_sync_batchnorm

    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    model = build_model(cfg.model, n_items, n_cates)
    if world > 1:
        model = convert_sync_batchnorm(model)
    if cfg.model.embedding_backend == "fused":
        group = torch.distributed.group.WORLD if torch.distributed.is_initialized() else None
        sets = table_sets(model)
        for tables in sets.values():
            tables.shard(lr=cfg.train.embedding_lr, process_group=group)
        if world > 1:
            named = list(model.named_parameters()) + list(model.named_buffers())
            in_tables = [n for n, _ in named if n.startswith(tuple(f"{s}." for s in sets))]
            torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, in_tables)
    return model


def fused_optimizer_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The fused tables' optimizer state, keyed `<set>.<table>.<state>`, gathered to rank 0 (a collective;
    empty when no set is sharded)."""
    from recsys.embeddings import table_sets

    return {f"{s}.{k}": v for s, t in table_sets(model).items() if t.sharded for k, v in t.optimizer_state().items()}


def save_checkpoint(dirname: str, weights: dict[str, torch.Tensor], tables_optim: dict[str, torch.Tensor], opt, state: dict) -> None:
    """A checkpoint: weights, the dense (and sparse-table) optimizers, the fused tables' optimizer state."""
    save_file(weights, os.path.join(dirname, "model.safetensors"))
    tensors, meta = optimizer_state(opt)
    save_file(tensors, os.path.join(dirname, "optim.safetensors"))
    if tables_optim:
        save_file(tables_optim, os.path.join(dirname, "tables_optim.safetensors"))
    Path(dirname, "state.json").write_text(json.dumps(state | {"optimizers": meta}))


def restore_checkpoint(dirname: str, model: nn.Module, opt) -> dict:
    """Load a checkpoint written by `save_checkpoint` into `model` and `opt` (on every rank) -> its state."""
    from recsys.embeddings import table_sets

    load_state_tensors(model, load_file(os.path.join(dirname, "model.safetensors")))
    saved = json.loads(Path(dirname, "state.json").read_text())
    load_optimizer_state(opt, load_file(os.path.join(dirname, "optim.safetensors")), saved.pop("optimizers"))
    sharded = {s: t for s, t in table_sets(model).items() if t.sharded}
    if sharded:
        tables_optim = load_file(os.path.join(dirname, "tables_optim.safetensors"))
        for s, t in sharded.items():
            t.load_optimizer_state({k[len(s) + 1 :]: v for k, v in tables_optim.items() if k.startswith(s + ".")})
    return saved


def _write_best(out: Path, weights: dict[str, torch.Tensor]) -> None:
    (out / "best").mkdir(parents=True, exist_ok=True)
    save_file(weights, out / "best" / "model.safetensors.tmp")
    (out / "best" / "model.safetensors.tmp").replace(out / "best" / "model.safetensors")


def run_loop(cfg: ExperimentConfig, shard: Shard, ctx: Context, out: Path, *, evaluate_test: bool = True,
             on_step: OnStep | None = None) -> dict:
    """Train `cfg` on this rank's `shard`; see the module docstring. Returns (on every rank) {steps,
    best_step, best_val, test (metrics of the best weights, or None), history (every validation of the
    surviving timeline), ranks (what each rank read: `_held`), samples_per_s (median global rows per second of a step, the first 10 steps
    excluded), stopped_early, evaluator (the plain model holding the best weights)}."""
    from recsys.models import build_model

    tc, mc = cfg.train, cfg.model
    rank, world = ctx.rank, ctx.world
    batch = per_rank_batch(tc.batch_size, world)
    model = worker_model(cfg, shard.n_items, shard.n_cates, world)
    fused = mc.embedding_backend == "fused"
    # a sharded forward is a collective, and the ranks' val shards differ in size: every rank validates
    # an unsharded copy of the gathered weights
    evaluator = build_model(mc.model_copy(update={"embedding_backend": "sparse"}), shard.n_items, shard.n_cates) if fused else model
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
                _validate(cfg, shard, ctx, out, model, evaluator, opt, state, epoch, loss, resumed_from,
                          float(np.median(rates[-tc.eval_every:])))
                if state["stopped_early"]:
                    break
            if state["step"] >= total_steps:
                break

    ctx.barrier()  # rank 0 has written the best weights
    load_state_tensors(evaluator, load_file(out / "best" / "model.safetensors"))
    evaluator.eval()
    test = None
    if evaluate_test and "test" in shard.splits:
        test = merge_split(ctx.gather(split_partial(evaluator, shard, "test", mc.max_len, tc.eval_batch_size)))
    steady = rates[10:] or rates
    ranks = ctx.gather(_held(shard))
    return {"ranks": ranks, "steps": state["step"], "best_step": state["best_step"], "best_val": state["best_val"], "test": test,
            "history": state["history"], "samples_per_s": float(np.median(steady)) if steady else float("nan"),
            "stopped_early": bool(state["stopped_early"]), "evaluator": evaluator}


def _held(shard: Shard) -> dict:
    """What this rank read: its user range, its events, and per split the rows and [min, max, distinct] of
    their users; and its process's peak RSS so far (MB)."""
    def users(u: np.ndarray) -> list[int]:
        return [int(u.min()), int(u.max()), len(np.unique(u))] if len(u) else []

    return {"users": list(shard.plan.users(shard.rank)), "events": len(shard.store.item),
            "rows": {s: len(v) for s, v in shard.splits.items()}, "row_users": {s: users(v.user) for s, v in shard.splits.items()},
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}


def _validate(cfg, shard: Shard, ctx: Context, out: Path, model: nn.Module, evaluator: nn.Module, opt, state: dict,
              epoch: int, loss: float, resumed_from: int | None, samples_per_s: float) -> None:
    tc, mc = cfg.train, cfg.model
    # collectives on every rank when the tables are sharded (the gathers land on rank 0)
    weights, tables_optim = state_tensors(model), fused_optimizer_state(model)
    if evaluator is not model:
        load_state_tensors(evaluator, ctx.broadcast(weights))
    val = merge_split(ctx.gather(split_partial(evaluator, shard, "val", mc.max_len, tc.eval_batch_size)))
    improved = val["auc"] > state["best_auc"]
    if improved:
        state.update(best_auc=val["auc"], best_step=state["step"], best_val=val, bad=0)
        if ctx.rank == 0:
            _write_best(out, weights)
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
    ctx.save(lambda d: save_checkpoint(d, weights, tables_optim, opt, state), record, metrics)
