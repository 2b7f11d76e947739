"""Sharded (`fused`) tables end to end on real gloo process groups (torch.multiprocessing): meta-device
build, the torchrec planner's layout, world-size independent initialisation, per-rank checkpoints through
torch.distributed.checkpoint, a hard kill and a resume that continues bit for bit, resharding 2 -> 1 -> 2
ranks, and one process reading a 2-rank checkpoint into full plain tensors.

The model is a table set (a 20k-row item table, row-wise on every layout here, and a 7-row table) under a
dense head kept in step by DDP, as recsys.train.loop.worker_model sets it up; the training loop's own
save_checkpoint / restore_checkpoint write and read the checkpoints.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from dist_support import leave_group
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from recsys.checkpoint import TABLES, TABLES_OPTIM, read_weights, save_weights
from recsys.config.train import TrainConfig
from recsys.embeddings import TableSet, TableSpec
from recsys.net import free_port
from recsys.train.loop import restore_checkpoint, save_checkpoint
from recsys.train.step import make_optimizers

ROWS, DIM, BATCH = 20_000, 8, 64
STEPS, CKPT = 6, 3
TABLE_BYTES = ROWS * DIM * 4


class Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tables = TableSet([TableSpec("item", ROWS, DIM), TableSpec("pos", 7, DIM)], "fused", init_std=0.1)
        self.head = torch.nn.Linear(DIM, 1)

    def forward(self, item: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        e = self.tables({"item": item, "pos": pos})
        return self.head(e["item"] + e["pos"]).squeeze(-1)


def _batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, ROWS, (BATCH,), generator=g), torch.randint(0, 7, (BATCH,), generator=g), torch.randn(BATCH, generator=g)


def _worker(rank: int, world: int, port: int, job: dict) -> None:
    """One rank of a run: build and shard, maybe resume, train steps [start, STEPS) saving checkpoints as
    the job says; rank 1 may die hard right after the step-CKPT checkpoint."""
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Toy()
    model.tables.shard(lr=0.05, memory_budget=job.get("budget"))
    tables = [n for n, _ in model.named_parameters() if n.startswith("tables.")]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, tables)
    ddp = DistributedDataParallel(model) if world > 1 else model
    opt = make_optimizers(model, TrainConfig(lr=0.01))
    out = Path(job["out"])
    if rank == 0:
        shards = {n: [list(s.metadata.shard_offsets) + list(s.metadata.shard_sizes) for s in st.local_shards()]
                  for n, st in model.tables.shard_state().items()}
        (out / "plan.json").write_text(json.dumps({"types": model.tables.sharding_types, "rank0": shards}))
    if job.get("init"):
        save_weights(model, out / "init", rank)
    if job.get("init_only"):
        leave_group()
        return
    start = 0
    if job.get("resume"):
        start = restore_checkpoint(job["resume"], model, opt)["step"]
        if job.get("save_loaded"):
            save_checkpoint(str(out / "loaded"), model, opt, {"step": start}, rank)
            leave_group()
            return
    for step in range(start, STEPS):
        if step == CKPT + 1 and job.get("kill") and rank == 1:
            os._exit(1)  # a hard crash: no cleanup, rank 0 is left in a collective
        item, pos, y = _batch(step, rank)
        for o in opt.all().values():
            o.zero_grad(set_to_none=True)
        ((ddp(item, pos) - y) ** 2).mean().backward()  # the fused kernel updates the table shards here
        for o in opt.all().values():
            o.step()
        if step + 1 == CKPT:
            (out / "ckpt").mkdir(exist_ok=True)
            save_checkpoint(str(out / "ckpt"), model, opt, {"step": CKPT}, rank)
            # the reference: the same tables gathered the plain way (test-side only)
            for name, st in model.tables.shard_state().items():
                full = torch.empty(st.size()) if rank == 0 else None
                st.gather(dst=0, out=full)
                if rank == 0:
                    save_file({name: full}, out / f"gathered_{name}.safetensors")
    if not job.get("kill"):
        (out / "final").mkdir(exist_ok=True)
        save_checkpoint(str(out / "final"), model, opt, {"step": STEPS}, rank)
    leave_group()


def _run(world: int, out: Path, **job) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    mp.start_processes(_worker, args=(world, free_port(), {"out": str(out)} | job), nprocs=world, join=True, start_method="spawn")
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharded")
    r = {"one_init": _run(1, tmp / "one_init", init=True, init_only=True)}
    r["straight"] = _run(2, tmp / "straight", init=True)
    with pytest.raises(mp.ProcessExitedException):
        _run(2, tmp / "killed", kill=True)
    r["killed"] = tmp / "killed"
    r["resumed"] = _run(2, tmp / "resumed", resume=str(tmp / "killed" / "ckpt"))
    r["to_one"] = _run(1, tmp / "to_one", resume=str(tmp / "killed" / "ckpt"), save_loaded=True)
    r["to_two"] = _run(2, tmp / "to_two", resume=str(tmp / "to_one" / "loaded"), save_loaded=True)
    return r


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    """Everything a checkpoint holds, as plain tensors: weights, table optimizer state, dense optimizer."""
    return read_weights(folder, optimizer=True) | {f"optim.{k}": v for k, v in load_file(folder / "optim.safetensors").items()}


def test_a_fused_set_is_built_on_the_meta_device():
    """No rank materialises a whole table: the set's parameters are meta tensors until shard()."""
    torch.manual_seed(0)
    assert {p.device.type for p in Toy().tables.parameters()} == {"meta"}


def test_initial_tables_are_the_same_on_one_and_two_ranks(runs):
    """Rows are drawn per fixed row block: the table a 2-rank row-wise group starts from (each rank drew
    only its half) is bit for bit the one a single rank draws whole."""
    one, two = (read_weights(runs[k] / "init") for k in ("one_init", "straight"))
    _equal(one, two)
    assert json.loads((runs["straight"] / "plan.json").read_text())["types"]["item"] == "row_wise"
    assert float(one["tables.item"].std()) == pytest.approx(0.1, rel=0.05)
    assert len(torch.unique(one["tables.item"], dim=0)) == ROWS  # every row its own draw


def test_big_table_is_row_wise_even_under_a_small_budget(tmp_path):
    """A rank budget of the item table's bytes: with its optimizer state and the planner's 15% margin no
    rank can hold it whole, so the planner must split its rows; each rank's shard is half the table."""
    out = _run(2, tmp_path, budget=TABLE_BYTES, init_only=True)
    plan = json.loads((out / "plan.json").read_text())
    assert plan["types"]["item"] == "row_wise"
    assert plan["rank0"]["item"] == [[0, 0, ROWS // 2, DIM]]


def test_each_rank_writes_only_its_own_shards(runs):
    """No gather at checkpoint: the tables/ and tables_optim/ folders hold one safetensors file per rank,
    each holding exactly that rank's rows (offsets in its JSON header) and no more bytes than them."""
    ckpt = runs["killed"] / "ckpt"
    rank0 = json.loads((runs["killed"] / "plan.json").read_text())["rank0"]
    for sub, width in ((TABLES, DIM), (TABLES_OPTIM, None)):
        files = sorted((ckpt / sub).glob("*.safetensors"))
        assert [f.name for f in files] == [f"shard-0000{r + 1}-model-00001-of-00001.safetensors" for r in range(2)]
        for r, f in enumerate(files):
            with safe_open(f, framework="pt") as sf:
                offsets = json.loads(sf.metadata()["DCP_SHARDING_INFO"])
                shapes = {k: list(sf.get_slice(k).get_shape()) for k in sf.keys()}
            item = "tables.item" if width else "tables.item.momentum1"
            lo = rank0["item"][0][2] * r
            assert offsets[item]["saved_offsets"][0] == lo and shapes[item][0] == ROWS // 2
            payload = sum(4 * torch.Size(s).numel() for s in shapes.values())
            assert payload <= (ROWS // 2 + 4) * (width or 1) * 4 + 64 and f.stat().st_size < payload + 4096


def test_two_rank_checkpoint_read_in_one_process_equals_the_gathered_tables(runs):
    got = read_weights(runs["killed"] / "ckpt")
    for name in ("item", "pos"):
        assert torch.equal(got[f"tables.{name}"], load_file(runs["killed"] / f"gathered_{name}.safetensors")[name]), name
    assert set(got) == {"tables.item", "tables.pos", "head.weight", "head.bias"}


def test_killed_run_resumes_bit_identical_to_an_uninterrupted_one(runs):
    """Rank 1 died hard after the step-3 checkpoint; a fresh 2-rank group resumed from it (each rank its
    own shards and their row-wise Adagrad state) and ran to step 6: weights, table optimizer state and the
    dense optimizer equal the uninterrupted run's bit for bit."""
    _equal(_checkpoint(runs["straight"] / "ckpt"), _checkpoint(runs["killed"] / "ckpt"))
    assert not (runs["killed"] / "final").exists()
    _equal(_checkpoint(runs["straight"] / "final"), _checkpoint(runs["resumed"] / "final"))
    assert float(read_weights(runs["straight"] / "final", optimizer=True)["tables.item.momentum1"].max()) > 0


def test_checkpoint_reshards_two_to_one_to_two_ranks(runs):
    """DCP reshards by row offsets: the 2-rank checkpoint loaded into 1 rank, and that rank's save loaded
    into 2 ranks again, hold the same tensors."""
    want = _checkpoint(runs["killed"] / "ckpt")
    _equal(_checkpoint(runs["to_one"] / "loaded"), want)
    _equal(_checkpoint(runs["to_two"] / "loaded"), want)
    assert len(list((runs["to_one"] / "loaded" / TABLES).glob("*.safetensors"))) == 1


@pytest.mark.parametrize("rank", [0, 1])
def test_a_missing_shard_file_is_named(runs, tmp_path, rank):
    """A rank's file gone: the rows it held are missing (DCP alone would leave them unset, or for the last
    rank shrink the table) and reading says so."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(runs["killed"] / "ckpt", broken)
    (broken / TABLES / f"shard-0000{rank + 1}-model-00001-of-00001.safetensors").unlink()
    with pytest.raises(ValueError, match="tables.item.*(shard files hold|rows in its shard files)"):
        read_weights(broken)
