"""Ray Train job: the single-process trainer's step (`recsys.train.step.train_step`) on N workers.

Equivalence with `recsys.train.trainer.train` by construction: every worker walks the same seeded global
batch order (`batch_rows`, seed and epoch only) and takes a strided slice of each global batch, and one
step of N workers on their slices is one step on the whole batch, up to float rounding:
- BatchNorm layers become `SyncBatchNorm1d` (statistics and their gradients over the global batch; plain
  BatchNorm would normalise each worker's slice with its own statistics);
- DDP averages the workers' gradients, which is the gradient of the global mean loss only when the
  slices are equally large; each worker's loss gradient is scaled by N * rows_here / rows_global, so an
  odd last batch (rows split ceil/floor) is weighted as on one process;
- sparse table gradients are all-reduced as sparse tensors, so SparseAdam updates the union of the
  workers' rows with their summed gradient, as on one process.
The weights start identical (same seed; DDP broadcasts rank 0's anyway). Validation, best-by-val-AUC
selection and the bundle are the trainer's functions.

Data: the dataset (CSR events + sample rows, plain numpy) is loaded once by the driver and materialised in
the object store before `fit`; workers map it zero-copy (one copy per node). Nothing is left to a lazy
Ray Data stage during training, so workers may take every CPU without starving it (DESIGN.md section 5).

Fault tolerance: rank 0 reports a checkpoint (weights + optimizer state in safetensors, for fused tables
also fbgemm's accumulators gathered from their owners; the step counter in JSON) at every validation;
`FailureConfig(max_failures)` restarts the worker group, which resumes from the latest checkpoint at the
exact step (the data order is a function of seed and epoch). Each run gets a fresh storage folder, so no
old checkpoint is ever picked up.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from recsys.config.experiment import ExperimentConfig, load_experiment
from recsys.data.sequences import Dataset, assemble, batch_rows, load_dataset

# Fault injection for tests: "<rank>:<step>:<delay s>:<marker file>": that rank exits hard at that step,
# once (the marker file records it). The delay first lets Ray register the checkpoints already reported
# (the controller polls workers every few seconds; a crash within that window loses the newest one).
FAULT_ENV = "RECSYS_RAY_FAULT"
# Rank 0's line at each validation; the driver reads it back for its progress bar.
_PROGRESS_LINE = re.compile(r"\[ray-train\] step (\d+)/(\d+)")


def _parse_fault(spec: str | None) -> dict | None:
    if not spec:
        return None
    rank, step, delay, marker = spec.split(":", 3)
    return {"rank": int(rank), "step": int(step), "delay": float(delay), "marker": marker}


def _worker_rows(rows: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This worker's part of a global batch (a batch smaller than the world is trained whole by every rank:
    the averaged gradient is then that batch's gradient)."""
    return rows if len(rows) < world else rows[rank::world]


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by `scale`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


class WorkerShare(nn.Module):
    """One worker's share of a global batch step: picks its rows, and scales its logits' gradient by
    world * rows_here / rows_global.

    The trainer's step takes the mean loss over the rows it is given and DDP averages over workers: that
    is the global mean's gradient only for equal slices. With this scale the average is
    sum_i dloss_i / rows_global, as on one process, whatever the split. Forward values are unchanged
    (the reported loss stays this worker's mean). `model`: the DDP-wrapped model (or the plain one
    when world = 1, where this is the identity).
    """

    def __init__(self, model: nn.Module, rank: int, world: int) -> None:
        super().__init__()
        self.model, self.rank, self.world, self.global_rows = model, rank, world, 0

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """This worker's rows of the global batch `rows` (call before the step on them)."""
        parts = [_worker_rows(rows, r, self.world) for r in range(self.world)]
        self.global_rows = sum(len(p) for p in parts)
        return parts[self.rank]

    def forward(self, batch):
        out = self.model(batch)
        scale = self.world * len(batch.label) / self.global_rows
        if scale == 1.0:
            return out
        aux = None if out.aux_logit is None else _ScaleGrad.apply(out.aux_logit, scale)
        return replace(out, logit=_ScaleGrad.apply(out.logit, scale), aux_logit=aux)


def _fused_optimizer_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The fused tables' optimizer state, keyed `<set>.<table>.<state>`, gathered to rank 0 (a collective;
    empty when no set is sharded)."""
    from recsys.embeddings import table_sets

    return {f"{s}.{k}": v for s, t in table_sets(model).items() if t.sharded for k, v in t.optimizer_state().items()}


def _save(dirname: str, weights: dict[str, torch.Tensor], tables_optim: dict[str, torch.Tensor], opt, state: dict) -> None:
    """A checkpoint: weights, the dense (and sparse-table) optimizers, the fused tables' optimizer state."""
    from safetensors.torch import save_file

    from recsys.train.step import optimizer_state

    save_file(weights, os.path.join(dirname, "model.safetensors"))
    tensors, meta = optimizer_state(opt)
    save_file(tensors, os.path.join(dirname, "optim.safetensors"))
    if tables_optim:
        save_file(tables_optim, os.path.join(dirname, "tables_optim.safetensors"))
    Path(dirname, "state.json").write_text(json.dumps(state | {"optimizers": meta}))


def _restore(dirname: str, model: nn.Module, opt) -> dict:
    """Load a checkpoint written by `_save` into `model` and `opt` (on every rank) -> the saved state."""
    from safetensors.torch import load_file

    from recsys.checkpoint import load_state_tensors
    from recsys.embeddings import table_sets
    from recsys.train.step import load_optimizer_state

    load_state_tensors(model, load_file(os.path.join(dirname, "model.safetensors")))
    saved = json.loads(Path(dirname, "state.json").read_text())
    load_optimizer_state(opt, load_file(os.path.join(dirname, "optim.safetensors")), saved.pop("optimizers"))
    sharded = {s: t for s, t in table_sets(model).items() if t.sharded}
    if sharded:
        tables_optim = load_file(os.path.join(dirname, "tables_optim.safetensors"))
        for s, t in sharded.items():
            t.load_optimizer_state({k[len(s) + 1 :]: v for k, v in tables_optim.items() if k.startswith(s + ".")})
    return saved


def worker_model(cfg: ExperimentConfig, n_items: int, n_cates: int, world: int) -> nn.Module:
    """The model a data-parallel worker trains (before DDP wraps it): seeded as the single-process
    trainer's; with world > 1 its BatchNorm layers synchronised over the workers (the same parameter and
    buffer tensors under the same names, so checkpoints load in one process); with the fused backend its
    tables sharded by torchrec DMP over the workers' gloo group (table-wise; fbgemm's fused row-wise
    Adagrad updates each table on its owner inside backward) and marked for DDP to leave alone."""
    from recsys.embeddings import table_sets
    from recsys.models import build_model
    from recsys.models.sync_batchnorm import convert_sync_batchnorm

    torch.manual_seed(cfg.train.seed)
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


def _train_loop(loop: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray
    import ray.train
    import ray.train.torch
    from recsys.checkpoint import load_state_tensors, state_tensors
    from recsys.models import build_model
    from recsys.train.step import make_optimizers, train_step
    from recsys.train.trainer import split_metrics

    cfg: ExperimentConfig = loop["config"]
    tc, mc = cfg.train, cfg.model
    ds: Dataset = ray.get(loop["dataset"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(loop["threads"])
    np.random.seed(tc.seed)
    model = worker_model(cfg, ds.n_items, ds.n_cates, world)
    fused = mc.embedding_backend == "fused"
    # A sharded forward is a collective: rank 0 validates an unsharded copy of the gathered weights
    evaluator = model
    if fused:
        evaluator = build_model(mc.model_copy(update={"embedding_backend": "sparse"}), ds.n_items, ds.n_cates) if rank == 0 else None
    opt = make_optimizers(model, tc)
    state = {"step": 0, "best_auc": -1.0, "best_step": 0, "bad": 0, "stopped_early": False, "history": []}
    resumed_from = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = _restore(d, model, opt)
        resumed_from = state["step"]
    # Sparse table gradients are all-reduced as sparse tensors over gloo; DDP broadcasts rank 0's weights.
    ddp = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"broadcast_buffers": True}) if world > 1 else model
    share = WorkerShare(ddp, rank, world)
    train_rows = ds.splits["train"]
    steps_per_epoch = math.ceil(len(train_rows) / tc.batch_size)
    total_steps = math.ceil(tc.epochs * steps_per_epoch)
    fault = loop["fault"]
    aux = mc.aux_weight if mc.aux_loss else 0.0
    model.train()
    rates: list[float] = []
    t_seen = time.perf_counter()
    while state["step"] < total_steps and not state["stopped_early"]:
        epoch, skip = divmod(state["step"], steps_per_epoch)
        for i, rows in enumerate(batch_rows(len(train_rows), tc.batch_size, shuffle=True, seed=tc.seed * 100_003 + epoch)):
            if i < skip:
                continue
            if fault and rank == fault["rank"] and state["step"] == fault["step"] and not os.path.exists(fault["marker"]):
                Path(fault["marker"]).write_text(str(state["step"]))
                time.sleep(fault["delay"])
                os._exit(1)  # a hard crash: no exception, no cleanup, as when a node dies
            batch = assemble(ds.store, train_rows, share.rows(rows), mc.max_len)
            t0 = time.perf_counter()
            loss = train_step(share, batch, opt, aux)
            rates.append(len(rows) / (time.perf_counter() - t0))
            state["step"] += 1
            if state["step"] % tc.eval_every == 0 or state["step"] == total_steps:
                metrics = {"step": state["step"], "epoch": epoch, "train_loss": loss,
                           "samples_per_s": float(np.median(rates[-tc.eval_every:])), "resumed_from": resumed_from}
                # gathers on every rank when the tables are sharded
                weights, tables_optim = state_tensors(model), _fused_optimizer_state(model)
                with tempfile.TemporaryDirectory() as d:
                    checkpoint = None
                    if rank == 0:
                        if evaluator is not model:
                            load_state_tensors(evaluator, weights)
                        val = split_metrics(evaluator, ds, "val", mc.max_len, tc.eval_batch_size)
                        if val["auc"] > state["best_auc"]:
                            state.update(best_auc=val["auc"], best_step=state["step"], bad=0)
                        else:
                            state["bad"] += 1
                        metrics |= {f"val_{k}": v for k, v in val.items()}
                        # The history travels in the checkpoint: after a restart it holds exactly the
                        # validations up to the checkpoint resumed from, then the new ones.
                        state["history"].append(metrics)
                        _save(d, weights, tables_optim, opt, state)
                        checkpoint = ray.train.Checkpoint.from_directory(d)
                        print(f"[ray-train] step {state['step']}/{total_steps} epoch {epoch} loss {loss:.4f} "
                              f"val_auc {val['auc']:.4f} {metrics['samples_per_s']:.0f} samples/s "
                              f"({time.perf_counter() - t_seen:.0f}s)", flush=True)
                    ray.train.report(metrics, checkpoint=checkpoint)
                # Early stopping must be decided identically on every rank: rank 0 knows the AUC.
                if tc.patience is not None and world > 1:
                    flag = torch.tensor([float(state["bad"] >= tc.patience)])
                    torch.distributed.broadcast(flag, src=0)
                    state["stopped_early"] = bool(flag.item())
                elif tc.patience is not None:
                    state["stopped_early"] = state["bad"] >= tc.patience
                if state["stopped_early"]:
                    break
            if state["step"] >= total_steps:
                break


def run_train(
    config: ExperimentConfig | str | Path,
    out_dir: str | Path,
    workers: int = 2,
    *,
    address: str | None = None,
    use_gpu: bool = False,
    dataset: Dataset | None = None,
    max_failures: int = 2,
    keep_checkpoints: int = 2,
    evaluate_test: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Train `config` on `workers` Ray Train workers; export the best-by-val-AUC weights as a bundle in
    `out_dir/bundle`. Returns {bundle_dir, best_step, best_val, test, steps, workers, samples_per_s, history
    (every validation of the surviving timeline), storage, wall_s}. `dataset`: an already loaded dataset (else the config's data folder is loaded).
    `progress(step, total_steps)`: called at each validation, from rank 0's progress line as Ray forwards it
    (so it works whether Ray's output goes to the terminal or to a `ray_log_file`)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from safetensors.torch import load_file

    from pipelines.runtime import on_worker_lines, ray_session
    from recsys.bundle import export_bundle
    from recsys.checkpoint import load_state_tensors
    from recsys.models import build_model
    from recsys.train.trainer import split_metrics

    cfg = load_experiment(config)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    ds = dataset or load_dataset(cfg.data_path())
    run_name = f"train-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
    with ray_session(address=address) as res:
        cpus_per_worker = max(1, int(res.cpus // workers)) if address is None else 1
        loop = {"config": cfg, "dataset": ray.put(ds), "threads": cpus_per_worker, "fault": _parse_fault(os.environ.get(FAULT_ENV))}
        trainer = TorchTrainer(
            _train_loop,
            train_loop_config=loop,
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": cpus_per_worker}),
            run_config=RunConfig(
                name=run_name,
                storage_path=str(out / "ray"),
                checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints, checkpoint_score_attribute="val_auc",
                                                   checkpoint_score_order="max"),
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
    best = result.get_best_checkpoint(metric="val_auc", mode="max")
    model = build_model(cfg.model if cfg.model.embedding_backend != "fused" else cfg.model.model_copy(update={"embedding_backend": "sparse"}),
                        ds.n_items, ds.n_cates)
    with best.as_directory() as d:
        load_state_tensors(model, load_file(os.path.join(d, "model.safetensors")))
        state = json.loads(Path(d, "state.json").read_text())
    model.eval()
    val = split_metrics(model, ds, "val", cfg.model.max_len, cfg.train.eval_batch_size)
    test = split_metrics(model, ds, "test", cfg.model.max_len, cfg.train.eval_batch_size) if evaluate_test and "test" in ds.splits else None
    metrics = {"best_step": state["step"], "val": val} | ({"test": test} if test else {})
    bundle_dir = export_bundle(model, cfg, out / "bundle", metrics, ds)
    with result.checkpoint.as_directory() as d:  # the latest one: its history is the whole surviving timeline
        history = json.loads(Path(d, "state.json").read_text())["history"]
    summary = {
        "bundle_dir": str(bundle_dir),
        "best_step": state["step"],
        "best_val": val,
        "test": test,
        "steps": int(result.metrics["step"]),
        "workers": workers,
        "samples_per_s": float(np.median([m["samples_per_s"] for m in history])) if history else float("nan"),
        "history": history,
        "storage": str(out / "ray" / run_name),
        "wall_s": time.perf_counter() - t_start,
    }
    (out / "result.json").write_text(json.dumps(summary, indent=2))
    return summary
