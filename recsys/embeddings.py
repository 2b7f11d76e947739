"""Embedding table sets through torchrec, with row-sparse updates.

A `TableSet` owns named tables (e.g. DARE's `att_item, att_cate, att_pos, rep_item, rep_cate, rep_pos`) in
one torchrec `EmbeddingCollection`, one feature per table. `tables({"att_item": ids, ...})` accepts id
tensors of any shape and returns embeddings of shape `ids.shape + (dim,)`; a tuple of id tensors (a batch's
targets and history) gives the tuple of their embeddings from one lookup. Ids are deduplicated per table
before the lookup: a 2048 x 200 history batch of a 10k-item catalogue touches a few thousand rows, so the
lookup and its backward work on those rows only. The backward sums each row's gradients serially in lookup
order (a C loop, kernels/sparse_rows).

How the tables learn (`backend`, measured in docs/models.md):
- `sparse` (default): the collection's tables emit sparse row gradients and SparseAdam (fused,
  recsys.train.sparse_adam) updates only the rows of the batch (lazy Adam: moments of untouched rows are
  not decayed). Memory and time per step scale with the rows touched, not the table size; this is what
  makes Taobao-sized tables cheap.
- `dense`: the original DARE code's behaviour, dense gradients and dense Adam over every row.
- `fused`: torchrec `DistributedModelParallel` shards the collection over a gloo process group with
  fbgemm's fused TBE kernel, which applies row-wise Adagrad inside backward (fbgemm's CPU build has no fused
  Adam). This is the multi-worker layout for Ray Train; on one CPU process it is slower than `sparse`.
  On CPU only `compute_kernel="fused"` is correct (the dense kernel pools sequence embeddings).

A `fused` set is built on the meta device: no rank ever holds a whole table. `shard()` lets torchrec's
planner choose table-wise or row-wise per table for a real topology (the group's world size, CPU, and a
per-rank memory budget: the host's memory over the ranks on it, or `memory_budget`); on CPU it chooses
row-wise, and a table above the budget can only be row-wise. Each rank then allocates and initialises only
its shards: rows are drawn in blocks of `INIT_BLOCK_ROWS` rows, each block from its own generator seeded by
(set seed, table, block), so a table starts the same whatever the world size and sharding. A sharded set is
never gathered: its shards are saved and loaded per rank with torch.distributed.checkpoint
(`shard_state`, used by recsys.checkpoint), and a sharded lookup is a collective, so every rank must make
the same lookups in the same order (recsys.train.loop runs one length group per batch and pads validation).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from torch import nn

try:
    from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor
except ImportError as e:  # torchrec is installed on its own (README "Installing"): say how, not just what
    raise ImportError(f"{e}. torchrec is installed separately, without its declared dependencies (it names the "
                      "CUDA fbgemm-gpu): pip install --no-deps torchrec==1.8.0 (README, Installing)") from e

from kernels.sparse_rows import cpu as rows_cpu
from kernels.sparse_rows import reference as rows_reference
from recsys.net import free_port

Backend = Literal["sparse", "dense", "fused"]
BACKENDS: tuple[str, ...] = ("sparse", "dense", "fused")
# A sharded table's initial rows come in blocks of this many rows, each from its own seeded generator: a
# shard boundary can fall anywhere, a block is drawn whole and the shard keeps its part (4 MB at d = 16).
INIT_BLOCK_ROWS = 65_536
# How torchrec may lay a table out: whole on one rank, or its rows split over the ranks. Column-wise would
# split each row's few dims (16-64 here) over ranks and buys nothing at these widths.
SHARDING_TYPES = ["table_wise", "row_wise"]


@dataclass(frozen=True)
class TableSpec:
    name: str
    num_embeddings: int
    dim: int


class _Collection(nn.Module):
    """The module DMP shards: one EmbeddingCollection, KJT in, dict of JaggedTensors out."""

    def __init__(self, specs: list[TableSpec], init_std: float, device: torch.device) -> None:
        super().__init__()
        self.ec = EmbeddingCollection(
            tables=[
                EmbeddingConfig(
                    name=s.name,
                    num_embeddings=s.num_embeddings,
                    embedding_dim=s.dim,
                    feature_names=[s.name],
                    init_fn=partial(nn.init.normal_, mean=0.0, std=init_std),
                )
                for s in specs
            ],
            device=device,
        )

    def forward(self, kjt: KeyedJaggedTensor):
        return self.ec(kjt)


class TableSet(nn.Module):
    """Named embedding tables; id 0 is padding (a real row, masked by the models)."""

    def __init__(self, specs: list[TableSpec], backend: Backend = "sparse", init_std: float = 0.01) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"embedding backend {backend!r}: expected one of {BACKENDS}")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate table names in {names}")
        if len({s.dim for s in specs}) != 1:  # a torchrec EmbeddingCollection requires one dim for all tables
            raise ValueError(f"tables of one set must share a dim, got {[(s.name, s.dim) for s in specs]}")
        self.specs = {s.name: s for s in specs}
        self.backend = backend
        self.init_std = init_std
        # fused: meta tensors only; shard() allocates each rank's shards. The set's seed comes from the
        # global generator, which the model's build seeds alike on every rank.
        self.init_seed = int(torch.randint(0, 2**62, (1,))) if backend == "fused" else None
        self.collection = _Collection(specs, init_std, torch.device("meta" if backend == "fused" else "cpu"))
        if backend == "sparse":
            for emb in self.collection.ec.embeddings.values():
                emb.sparse = True  # torchrec builds plain nn.Embedding tables; ask for row gradients
        self._sharded: nn.Module | None = None
        self._process_group = None
        self.sharding_types: dict[str, str] = {}

    def shard(self, lr: float, eps: float = 1e-8, process_group=None, memory_budget: int | None = None) -> None:
        """Switch a `fused` set to its DMP-sharded form (call once, on every rank, before training).

        `process_group`: the gloo group to shard over; a one-process group is created when none exists.
        `memory_budget`: bytes a rank may hold (the planner's per-rank DDR capacity); default the host's
        memory over the ranks on this host (LOCAL_WORLD_SIZE, which torchrun and Ray Train set; else the
        group's size). The planner places tables within it, with a clear error when none fits."""
        if self.backend != "fused":
            raise ValueError(f"shard() is for the 'fused' backend, this set is {self.backend!r}")
        if self.sharded:
            raise ValueError("this table set is already sharded")
        import torch.distributed as dist
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from torchrec.distributed import DistributedModelParallel
        from torchrec.distributed.embedding import EmbeddingCollectionSharder
        from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
        from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
        from torchrec.distributed.types import ShardingEnv

        if process_group is None:
            if not dist.is_initialized():
                os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
                os.environ.setdefault("MASTER_PORT", str(free_port()))
                dist.init_process_group("gloo", rank=0, world_size=1)
            process_group = dist.group.WORLD
        self._process_group = process_group
        sharder = EmbeddingCollectionSharder(
            fused_params={"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": lr, "eps": eps}
        )
        constraints = {n: ParameterConstraints(sharding_types=SHARDING_TYPES, compute_kernels=["fused"]) for n in self.specs}
        # the planner keeps 15% of each rank's budget free (torchrec's default margin); the set holds no
        # dense tensor, so the fixed margin, not torchrec's dense-tensor heuristic
        planner = EmbeddingShardingPlanner(topology=topology(dist.get_world_size(process_group), memory_budget),
                                           constraints=constraints, storage_reservation=FixedPercentageStorageReservation(0.15))
        plan = planner.collective_plan(self.collection, [sharder], process_group)
        self._sharded = DistributedModelParallel(
            self.collection,
            device=torch.device("cpu"),
            plan=plan,
            sharders=[sharder],
            env=ShardingEnv.from_process_group(process_group),
        )
        # the planner's choice per table (e.g. {"item": "row_wise"}), for logs and tests
        self.sharding_types = {n: ps.sharding_type for by_module in plan.plan.values() for n, ps in by_module.items()}
        self._init_shards()

    @torch.no_grad()
    def _init_shards(self) -> None:
        """N(0, init_std) rows, block by block (see INIT_BLOCK_ROWS): each local shard copies its part of every
        block it overlaps, so row r's value depends on the set's seed, the table and r only."""
        for name, st in self.shard_state().items():
            rows, dim = self.specs[name].num_embeddings, self.specs[name].dim
            for shard in st.local_shards():
                (r0, c0), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                for b in range(r0 // INIT_BLOCK_ROWS, -(-(r0 + nr) // INIT_BLOCK_ROWS)):
                    lo, hi = b * INIT_BLOCK_ROWS, min((b + 1) * INIT_BLOCK_ROWS, rows)
                    g = torch.Generator().manual_seed(_block_seed(self.init_seed, name, b))
                    block = torch.empty(hi - lo, dim).normal_(0.0, self.init_std, generator=g)
                    a, z = max(lo, r0), min(hi, r0 + nr)
                    shard.tensor[a - r0 : z - r0].copy_(block[a - lo : z - lo, c0 : c0 + nc])

    def shard_state(self, optimizer: bool = False) -> dict:
        """This rank's part of a sharded set as torchrec ShardedTensors (views of the live shards, for
        torch.distributed.checkpoint to save or load in place): the tables keyed by table name, or with
        `optimizer` the fused optimizer's state keyed `<table>.<state>` (row-wise Adagrad: `momentum1`,
        one value per row, sharded like its table's rows)."""
        if not self.sharded:
            raise ValueError("shard_state() is for a sharded set (call shard() first)")
        if optimizer:
            return {key: st for per_table in self._sharded.fused_optimizer.state_dict()["state"].values()
                    for key, st in per_table.items()}
        return {key.split(".")[-2]: st for key, st in self._sharded.state_dict().items()}

    @property
    def sharded(self) -> bool:
        return self._sharded is not None

    @property
    def process_group(self):
        """The group a sharded set's shards live on (its checkpoints are collectives over it)."""
        return self._process_group

    def forward(self, ids: dict[str, torch.Tensor | tuple[torch.Tensor, ...]]) -> dict[str, torch.Tensor | tuple[torch.Tensor, ...]]:
        """Per table, ids of any shape -> embeddings of shape ids.shape + (dim,); or a tuple of id tensors ->
        the tuple of their embeddings, one dedupe and lookup for all parts (e.g. a batch's targets and its
        history), without concatenating the parts' embeddings and slicing them apart again."""
        names = list(ids)
        parts = {n: (ids[n],) if torch.is_tensor(ids[n]) else tuple(ids[n]) for n in names}
        uniq, inverse = [], []
        for n in names:
            if n not in self.specs:
                raise KeyError(f"no embedding table {n!r}; tables: {list(self.specs)}")
            u, inv = _unique(torch.cat([p.reshape(-1) for p in parts[n]]), self.specs[n].num_embeddings)
            uniq.append(u)
            inverse.append(inv)
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=names,
            values=torch.cat(uniq),
            lengths=torch.tensor([len(u) for u in uniq], dtype=torch.int64),
        )
        out = (self._sharded or self.collection)(kjt)
        result: dict[str, torch.Tensor | tuple[torch.Tensor, ...]] = {}
        for n, inv in zip(names, inverse):
            embs = _Expand.apply(out[n].values(), *inv.split([p.numel() for p in parts[n]]))
            embs = tuple(e.reshape(*p.shape, -1) for e, p in zip(embs, parts[n]))
            result[n] = embs[0] if torch.is_tensor(ids[n]) else embs
        return result

    # --- weights as plain tensors (bundles and checkpoints never store ShardedTensors) ---

    def weights(self) -> dict[str, torch.Tensor]:
        """Full tables as plain tensors, keyed by table name (an unsharded set: a sharded one is read through
        its checkpoint shards, recsys.checkpoint.read_weights, never gathered)."""
        if self.sharded or self.backend == "fused":
            raise ValueError("a fused (sharded) table set has no full tables in memory: save it with "
                             "recsys.checkpoint.save_weights and read the folder with read_weights")
        return {n: e.weight.detach() for n, e in self.collection.ec.embeddings.items()}

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        if self.backend == "fused":
            raise ValueError("a fused (sharded) table set loads its shards from a weights folder: "
                             "recsys.checkpoint.load_weights")
        missing = set(self.specs) - set(weights)
        if missing:
            raise KeyError(f"embedding weights missing tables {sorted(missing)}")
        for n, w in weights.items():
            want = (self.specs[n].num_embeddings, self.specs[n].dim)
            if tuple(w.shape) != want:
                raise ValueError(f"embedding table {n!r}: weight shape {tuple(w.shape)}, expected {want}")
        with torch.no_grad():
            for n, e in self.collection.ec.embeddings.items():
                e.weight.copy_(weights[n])

    def dense_parameters(self) -> list[nn.Parameter]:
        """Table parameters an outside optimizer must step (none when fused: backward updates them)."""
        return [] if self.sharded else list(self.collection.parameters())


def table_sets(model: nn.Module) -> dict[str, TableSet]:
    """A model's TableSets by module name (the prefix of their tables' names in saved weights)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, TableSet)}


class _Expand(torch.autograd.Function):
    """rows [U, d], inverse maps [n_i] -> rows[inverse_i] [n_i, d] for each. The backward sums each row's
    gradients in lookup order (part after part), serially (kernels/sparse_rows: C, else index_add_, bitwise
    the same): deterministic under several threads (index_put's accumulate is not) and cheaper than
    F.embedding's sorting backward; parts without a gradient add nothing."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, *inverse: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.save_for_backward(*inverse)
        ctx.n_rows = rows.shape[0]
        ctx.set_materialize_grads(False)
        return tuple(rows.index_select(0, inv) for inv in inverse)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):
        out = None
        for inv, grad in zip(ctx.saved_tensors, grads):
            if grad is None:
                continue
            grad = grad.contiguous()
            if out is None:
                out = grad.new_zeros(ctx.n_rows, grad.shape[-1])
            (rows_cpu if rows_cpu.supports(out, grad) else rows_reference).index_add_rows(out, inv, grad)
        return (out, *[None] * len(grads))


def _unique(ids: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted unique ids and the inverse map. A mark-and-cumsum over the table (O(rows + ids), no sort)
    when the table is small next to the batch, as for a history batch over a 10k-item catalogue."""
    if num_rows > 8 * ids.numel():
        return torch.unique(ids, return_inverse=True)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_rows):
        raise IndexError(f"ids outside 0..{num_rows - 1}: min {int(ids.min())}, max {int(ids.max())}")
    seen = torch.zeros(num_rows, dtype=torch.bool)
    seen[ids] = True
    slot = torch.cumsum(seen, 0) - 1
    return torch.nonzero(seen).flatten(), slot[ids]


def topology(world: int, memory_budget: int | None = None):
    """torchrec's Topology of `world` CPU ranks, each with `memory_budget` bytes (default: this host's memory
    over the ranks on it)."""
    from torchrec.distributed.planner.types import HardwareConfig, KernelConfig, TopologyFactory, TrainerConfig

    local = min(int(os.environ.get("LOCAL_WORLD_SIZE", world)), world)
    if memory_budget is None:
        memory_budget = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // local
    return TopologyFactory.create_topology(TrainerConfig(world_size=world, local_world_size=local),
                                           HardwareConfig(ddr_cap_bytes=int(memory_budget)), KernelConfig(compute_device="cpu"))


def _block_seed(seed: int, table: str, block: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{table}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # manual_seed takes a non-negative 63-bit int
