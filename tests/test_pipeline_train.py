"""Ray Train job on 2 CPU workers over a small real subset, each worker on its Ray Data user shard, with a
worker killed mid-training; one data-parallel step on 2 gloo processes against the single-process step;
the 1-worker Ray job against the single-process trainer (the same loop).

Two Ray runs serve most Ray checks (each Ray Train fit costs tens of seconds of worker start-up on 2 cores):
an uninterrupted 2-worker run, and the same run with rank 1 exiting hard at step FAULT_STEP (injected
through the test hook `on_step`), after which Ray restarts the group and it resumes from the step-EVAL
checkpoint. The resumed run must end bit-identical to the uninterrupted one: the same validations, the
same weights.

The comparison with a single process is the one-step check (test_data_parallel_step_equals_single_process),
to float rounding: over a whole run those rounding differences grow by an amount that depends on the CPU
(DARE's top-k is a hard choice, Adam's early steps are sign-like), so a tolerance on the end of two
different computations would pass or fail by machine. Equal computations compare exactly on any CPU.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from dist_support import leave_group
from pipelines.evaluate import run_evaluate
from pipelines.runtime import init_ray
from pipelines.train import run_train
from recsys.bundle import load_bundle
from recsys.checkpoint import read_weights, save_weights, state_tensors
from recsys.config.experiment import load_experiment
from recsys.config.presets import preset_path
from recsys.data.sequences import assemble, batch_rows, load_dataset
from recsys.data.shards import ShardPlan, shard_from_tables, split_users, whole
from recsys.embeddings import table_sets
from recsys.models import build_model
from recsys.net import free_port
from recsys.train.loop import (
    epoch_batches,
    restore_checkpoint,
    save_checkpoint,
    worker_model,
)
from recsys.train.step import make_optimizers, train_step
from recsys.train.trainer import split_metrics, train, user_subset

EVAL = 20
FAULT_STEP = 30  # after the step-20 checkpoint, before the step-40 one
USERS = 60


def crash_once(rank: int, step: int, marker: str, delay: float = 5.0):
    """An `on_step` hook: that rank exits hard at that step, once (the marker file records it). The delay
    first lets Ray register the checkpoints already reported (the controller polls workers every few
    seconds; a crash within that window loses the newest one)."""

    def hook(r: int, s: int) -> None:
        if r == rank and s == step and not os.path.exists(marker):
            Path(marker).write_text(str(s))
            time.sleep(delay)
            os._exit(1)  # a hard crash: no exception, no cleanup, as when a node dies

    return hook


@pytest.fixture(scope="module")
def ray_local():
    started = init_ray(num_cpus=2, object_store_mb=256)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def setup(ray_local, bench_dataset, tmp_path_factory):
    train_cfg = {"batch_size": 2048, "epochs": 6.0, "eval_every": EVAL, "seed": 3, "lr": 0.03, "embedding_lr": 0.03}
    cfg = load_experiment(preset_path("tiny"), {"train": train_cfg})
    ds = user_subset(bench_dataset, USERS)
    tmp = tmp_path_factory.mktemp("train")
    straight = run_train(cfg, tmp / "straight", workers=2, users=USERS, max_failures=0)
    marker = tmp / "killed"
    result = run_train(cfg, tmp / "ray", workers=2, users=USERS, max_failures=2, evaluate_test=False,
                       on_step=crash_once(1, FAULT_STEP, str(marker)))
    return cfg, ds, straight, result, marker


def _run_facts(history: list[dict]) -> list[dict]:
    """A validation record without what depends on the clock or the restart."""
    return [{k: v for k, v in h.items() if k not in ("samples_per_s", "resumed_from")} for h in history]


def test_killed_and_resumed_run_is_bit_identical_to_an_uninterrupted_one(setup):
    _, _, straight, result, _ = setup
    assert result["steps"] == straight["steps"]
    assert _run_facts(result["history"]) == _run_facts(straight["history"])  # every val metric, exactly
    assert result["best_val"] == straight["best_val"]
    got, want = (state_tensors(load_bundle(r["bundle_dir"]).model) for r in (result, straight))
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k



def test_sharded_validation_and_test_equal_single_process_metrics(setup):
    """Every rank scored its own val (and test) users; the metrics merged from their partials equal the
    best weights' metrics on one process: AUC, GAUC and category AUC exactly, logloss to rounding (a row
    scored in another batch can differ in the last bit: matrix products block by batch size; measured
    4.5e-11 relative)."""
    cfg, ds, straight, _, _ = setup
    bundle = load_bundle(straight["bundle_dir"])
    for split, got in (("val", straight["best_val"]), ("test", straight["test"])):
        want = split_metrics(bundle.model, ds, split, cfg.model.max_len)
        assert got["rows"] == want["rows"] == len(ds.splits[split])
        for k in ("auc", "gauc", "cate_auc"):
            assert got[k] == want[k], (split, k)
        assert got["logloss"] == pytest.approx(want["logloss"], rel=1e-9)


def test_each_worker_reads_only_its_user_shard(setup, bench_dir):
    """The ranks' user ranges are disjoint and cover users 0..59; each rank read exactly its range's events
    and rows (not the others', not users 60+)."""
    _, ds, straight, _, _ = setup
    ranks = straight["ranks"]
    bounds = straight["shards"]["user_bounds"]
    assert bounds[0] == 0 and bounds[-1] == USERS and bounds == sorted(set(bounds))
    events = pq.read_table(bench_dir / "events.parquet", columns=["user"]).column("user").to_numpy()
    for r, got in enumerate(ranks):
        lo, hi = bounds[r], bounds[r + 1]
        assert got["users"] == [lo, hi]
        assert got["events"] == int(((events >= lo) & (events < hi)).sum())
        for split in ("train", "val", "test"):
            u = ds.splits[split].user
            mine = u[(u >= lo) & (u < hi)]
            assert got["rows"][split] == len(mine), (r, split)
            assert got["row_users"][split] == [int(mine.min()), int(mine.max()), len(np.unique(mine))], (r, split)
    assert sum(g["rows"]["train"] for g in ranks) == len(ds.splits["train"])
    assert straight["shards"]["train_rows"] == [g["rows"]["train"] for g in ranks]
    assert all(g["peak_rss_mb"] > 0 for g in ranks)
    # about equal training rows per rank (cut at half the rows)
    assert abs(ranks[0]["rows"]["train"] - ranks[1]["rows"]["train"]) < 0.1 * len(ds.splits["train"])


def test_one_worker_ray_job_equals_the_single_process_trainer(ray_local, bench_dataset, tmp_path):
    """One loop: the 1-worker Ray job (its shard read through Ray Data) and the single-process trainer (the
    dataset in memory) give the same validations, test metrics and weights, bit for bit."""
    cfg = load_experiment(preset_path("tiny"), {"train": {"batch_size": 2048, "epochs": 1.5, "eval_every": 10, "seed": 3,
                                                          "progress": False}})
    ds = user_subset(bench_dataset, USERS)
    single = train(cfg, tmp_path / "single", dataset=ds)
    ray1 = run_train(cfg, tmp_path / "ray1", workers=1, users=USERS, max_failures=0)
    assert ray1["steps"] == single.steps and ray1["best_step"] == single.best_step
    log = [json.loads(x) for x in (tmp_path / "single" / "log.jsonl").read_text().splitlines()]
    assert _run_facts(ray1["history"]) == log
    assert ray1["best_val"] == single.best_val and ray1["test"] == single.test
    got, want = (state_tensors(load_bundle(d).model) for d in (ray1["bundle_dir"], single.bundle_dir))
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_killed_worker_resumes_from_checkpoint(setup):
    _, _, straight, result, marker = setup
    assert marker.read_text() == str(FAULT_STEP)  # the fault really fired
    steps = [h["step"] for h in result["history"]]
    assert steps == list(range(EVAL, straight["steps"], EVAL)) + [straight["steps"]]  # no lost, no repeated validation
    resumed = [h["resumed_from"] for h in result["history"]]
    assert resumed == [None] + [EVAL] * (len(steps) - 1)  # restarted from the step-20 checkpoint, not from 0
    assert {h["resumed_from"] for h in straight["history"]} == {None}


def test_batch_evaluation_reads_user_ranges_and_equals_single_process(setup, bench_dataset):
    """Each actor read only its user range of the full benchmark's val split and its events (the benchmark
    has no manifest: the plan reads the column); the merged metrics equal one process's: AUC, GAUC and
    category AUC exactly, logloss to rounding."""
    cfg, _, _, result, _ = setup
    bundle = load_bundle(result["bundle_dir"])
    want = split_metrics(bundle.model, bench_dataset, "val", cfg.model.max_len)
    got = run_evaluate(result["bundle_dir"], "val", workers=2)
    val, offsets = bench_dataset.splits["val"].user, bench_dataset.store.offsets
    assert got["rows"] == want["rows"] == len(val)
    for k in ("auc", "gauc", "cate_auc"):
        assert got[k] == want[k], k
    assert got["logloss"] == pytest.approx(want["logloss"], rel=1e-9)
    bounds = [r["users"] for r in got["ranks"]]
    assert len(bounds) == 2 and bounds[0][0] == 0 and bounds[0][1] == bounds[1][0] and bounds[1][1] == len(offsets) - 1
    for r in got["ranks"]:
        lo, hi = r["users"]
        assert r["events"] == offsets[hi] - offsets[lo] < offsets[-1]
        assert r["rows"] == int(((val >= lo) & (val < hi)).sum()) < len(val)
    assert abs(got["ranks"][0]["rows"] - got["ranks"][1]["rows"]) < 0.1 * len(val)  # balanced on the split's rows


def test_local_ray_listens_on_loopback_only(ray_local):
    """init_ray's local Ray (the one every job here starts) binds 127.0.0.1: no Ray server of this
    process tree listens on another address."""
    import psutil

    assert {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]} == {"127.0.0.1"}
    tree = {p.pid for p in psutil.Process().children(recursive=True)} | {os.getpid()}
    listening = [c for c in psutil.net_connections("inet") if c.status == psutil.CONN_LISTEN and c.pid in tree]
    assert len(listening) >= 3  # GCS, raylet, object manager at least
    assert {c.laddr.ip.removeprefix("::ffff:") for c in listening} == {"127.0.0.1"}, [(c.laddr, c.pid) for c in listening]


def test_fused_backend_two_workers(ray_local, bench_dataset, tmp_path):
    """torchrec DMP tables (fbgemm fused row-wise Adagrad) sharded over the 2 Ray workers, DDP for the rest,
    rank 1 killed at step 15: the run resumes from the step-10 checkpoint (tables and their optimizer
    state scattered back to the shards) and completes; the bundle is a plain single-process model and
    scores as reported."""
    train_cfg = {"batch_size": 2048, "epochs": 2.0, "eval_every": 10, "seed": 3, "lr": 0.03, "embedding_lr": 0.03}
    cfg = load_experiment(preset_path("tiny"), {"train": train_cfg, "model": {"embedding_backend": "fused"}})
    ds = user_subset(bench_dataset, USERS)
    result = run_train(cfg, tmp_path / "ray", workers=2, users=USERS, max_failures=1, evaluate_test=False,
                       on_step=crash_once(1, 15, str(tmp_path / "killed")))
    assert (tmp_path / "killed").read_text() == "15"
    assert [(h["step"], h["resumed_from"]) for h in result["history"]] == [(10, None), (20, 10), (22, 10)]
    bundle = load_bundle(result["bundle_dir"])
    assert {t.backend for t in table_sets(bundle.model).values()} == {"sparse"}
    again = split_metrics(bundle.model, ds, "val", cfg.model.max_len)
    assert again["auc"] == pytest.approx(result["best_val"]["auc"], abs=1e-9)
    # learned (0.5 is chance). Measured on the user shards: val AUC 0.6186 and train loss 1.1291 at step
    # 20, 0.6223 at step 22 (epochs of 11 steps: the larger shard's rows over 1,024 per worker).
    assert again["auc"] > 0.6


@pytest.fixture
def own_process_group():
    """A fused model in this process shards over a 1-process gloo group it creates: remove it afterwards
    (other tests expect none), unless it was there before."""
    existed = dist.is_initialized()
    yield
    if not existed and dist.is_initialized():
        dist.destroy_process_group()


def test_fused_checkpoint_resumes_exactly(bench_dataset, tmp_path, own_process_group):
    """A checkpoint holds the fused tables' shards and their row-wise Adagrad accumulators (inside fbgemm):
    2 steps, save, restore into a fresh model, 1 step gives exactly the weights of 3 uninterrupted steps."""
    cfg = load_experiment(preset_path("tiny"), {"train": {"seed": 3}, "model": {"embedding_backend": "fused"}})
    ds = user_subset(bench_dataset, 20)
    train_rows = ds.splits["train"]
    batches = list(itertools.islice(batch_rows(len(train_rows), 256, shuffle=True, seed=3), 3))

    def fresh():
        model = worker_model(cfg, ds.n_items, ds.n_cates, 1)
        return model, make_optimizers(model, cfg.train)

    def run(model, opt, rows_list):
        for rows in rows_list:
            train_step(model, assemble(ds.store, train_rows, rows, cfg.model.max_len), opt, cfg.model.aux_weight)

    straight, opt = fresh()
    run(straight, opt, batches)
    first, opt = fresh()
    run(first, opt, batches[:2])
    save_checkpoint(str(tmp_path / "ckpt"), first, opt, {"step": 2})
    accumulators = {k: v for k, v in read_weights(tmp_path / "ckpt", optimizer=True).items() if k.endswith(".momentum1")}
    assert len(accumulators) == 6 and all(float(v.max()) > 0 for v in accumulators.values())
    resumed, opt = fresh()
    assert restore_checkpoint(str(tmp_path / "ckpt"), resumed, opt)["step"] == 2
    run(resumed, opt, batches[2:])
    for name, model in (("straight", straight), ("resumed", resumed)):
        save_weights(model, tmp_path / name)
    want, got = read_weights(tmp_path / "straight"), read_weights(tmp_path / "resumed")
    assert set(got) == set(want) and len(want) > 6
    for k in want:
        assert torch.equal(got[k], want[k]), k


# --- one data-parallel step (no Ray: the loop's pieces over 2 gloo processes, each on its user shard) ---

STEP_BATCH = 512  # 256 rows per rank
STEP_USERS = 20


def _shard(bench_dir, cfg, plan: ShardPlan, rank: int):
    """Rank `rank`'s shard, read as a worker reads it: its user range's rows of each file."""
    lo, hi = plan.users(rank)
    rows = [("user", ">=", lo), ("user", "<", hi)]
    tables = {s: pq.read_table(bench_dir / f"{s}.parquet", filters=rows) for s in ("train",)}
    ds = load_dataset(bench_dir)
    return shard_from_tables(pq.read_table(bench_dir / "events.parquet", filters=rows), tables, bench_dir, plan, rank,
                             ds.n_items, ds.n_cates, {})


def _step_plan(bench_dataset) -> ShardPlan:
    return split_users(np.bincount(user_subset(bench_dataset, STEP_USERS).splits["train"].user, minlength=STEP_USERS)[:STEP_USERS], 2)


def _first_rows(plan: ShardPlan, rank: int, world: int, seed: int) -> np.ndarray:
    return next(epoch_batches(plan.rows[rank], max(plan.rows), STEP_BATCH // world, seed, 0, rank))


def _one_step(cfg, shard, rows: np.ndarray, world: int, folder: Path, rank: int = 0) -> dict[str, torch.Tensor]:
    """One training step on `rows` of the shard -> the gradients DDP leaves (dense), the BatchNorm buffers,
    and the tables after the step (the fused kernel updates them inside backward; read back from the
    ranks' shard files in `folder`), on rank 0."""
    model = worker_model(cfg, shard.n_items, shard.n_cates, world)
    opt = make_optimizers(model, cfg.train)
    step_model = DistributedDataParallel(model, broadcast_buffers=True) if world > 1 else model
    model.train()
    train_step(step_model, assemble(shard.store, shard.splits["train"], rows, cfg.model.max_len), opt, cfg.model.aux_weight)
    # train_step leaves this step's gradients in place (it clears them at the start of the next step)
    out = {f"grad.{n}": (p.grad.coalesce().to_dense() if p.grad.is_sparse else p.grad)
           for n, p in model.named_parameters() if p.grad is not None}
    out |= {f"buffer.{n}": b for n, b in model.named_buffers() if ".net." in n}
    if cfg.model.embedding_backend == "fused":  # every rank writes its shards
        save_weights(model, folder, rank)
        if rank == 0:
            out |= {f"table.{n}": w for n, w in read_weights(folder).items() if n.split(".")[0] in table_sets(model)}
    return out


def _ddp_worker(rank: int, port: int, cfg, bench_dir, plan, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    shard = _shard(bench_dir, cfg, plan, rank)
    got = _one_step(cfg, shard, _first_rows(plan, rank, 2, cfg.train.seed), 2, Path(out).parent / "tables2", rank)
    if rank == 0:
        torch.save(got, out)
    leave_group()


@pytest.mark.parametrize("backend", ["sparse", "fused"])
def test_data_parallel_step_equals_single_process(backend, bench_dataset, bench_dir, tmp_path, own_process_group):
    """Sync BatchNorm, equal per-rank batches, the sparse table gradients (sparse) or the DMP tables
    (fused): one step of 2 gloo workers, each on 256 rows of its own user shard, equals the
    single-process step on the 512 rows together, to float rounding."""
    cfg = load_experiment(preset_path("tiny"), {"train": {"seed": 3, "batch_size": STEP_BATCH}, "model": {"embedding_backend": backend}})
    plan = _step_plan(bench_dataset)
    mp.spawn(_ddp_worker, args=(free_port(), cfg, bench_dir, plan, str(tmp_path / "rank0.pt")), nprocs=2, join=True)
    got = torch.load(tmp_path / "rank0.pt")
    # the shards' train rows are consecutive runs of the file's (sorted by user): rank 1's start after rank 0's
    ds = user_subset(bench_dataset, STEP_USERS)
    both = np.concatenate([_first_rows(plan, 0, 2, 3), plan.rows[0] + _first_rows(plan, 1, 2, 3)])


    want = _one_step(cfg, whole(ds), both, 1, tmp_path / "tables1")
    assert set(got) == set(want)
    tables = [k for k in want if "embeddings" in k or k.startswith("table.")]
    assert len(tables) == 6  # every table is compared: its sparse gradient, or its fused update
    # A Linear's bias right before a BatchNorm has a zero gradient up to rounding (BatchNorm removes any
    # shift): on both sides it must be negligible next to that Linear's weight gradient.
    pre_bn = [f"{name}.{i}" for name, seq in build_model(cfg.model, ds.n_items, ds.n_cates).named_modules()
              if isinstance(seq, torch.nn.Sequential)
              for i, (lin, bn) in enumerate(zip(seq, list(seq)[1:]))
              if isinstance(lin, torch.nn.Linear) and isinstance(bn, torch.nn.BatchNorm1d)]
    assert pre_bn
    for layer in pre_bn:
        w_scale = float(want[f"grad.{layer}.weight"].abs().max())
        for side in (got, want):
            assert float(side.pop(f"grad.{layer}.bias").abs().max()) < 1e-3 * w_scale
    for k, w in want.items():
        if not w.is_floating_point():
            assert torch.equal(got[k], w), k
            continue
        err, scale = float((got[k].double() - w.double()).abs().max()), float(w.abs().max())
        # fused tables: row-wise Adagrad's first update is g / (rms(g) + eps), so rows with a near-eps
        # gradient (rare positions) carry the gradient's rounding at lr scale
        tol = 1e-2 * cfg.train.embedding_lr if k.startswith("table.") else 1e-4 * scale
        assert err <= tol, f"{k}: max error {err:.3g}, scale {scale:.3g}"
