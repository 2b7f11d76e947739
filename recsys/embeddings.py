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
"""

from __future__ import annotations

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
        self.collection = _Collection(specs, init_std, torch.device("cpu"))
        if backend == "sparse":
            for emb in self.collection.ec.embeddings.values():
                emb.sparse = True  # torchrec builds plain nn.Embedding tables; ask for row gradients
        self._sharded: nn.Module | None = None
        self._process_group = None

    def shard(self, lr: float, eps: float = 1e-8, process_group=None) -> None:
        """Switch a `fused` set to its DMP-sharded form (call once, before training).

        `process_group`: the gloo group to shard over; a one-process group is created when none exists.
        The current (seeded) weights are copied into the shards, so all backends start identical.
        """
        if self.backend != "fused":
            raise ValueError(f"shard() is for the 'fused' backend, this set is {self.backend!r}")
        import torch.distributed as dist
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from torchrec.distributed import DistributedModelParallel
        from torchrec.distributed.embedding import EmbeddingCollectionSharder
        from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
        from torchrec.distributed.types import ShardingEnv

        if process_group is None:
            if not dist.is_initialized():
                os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
                os.environ.setdefault("MASTER_PORT", str(free_port()))
                dist.init_process_group("gloo", rank=0, world_size=1)
            process_group = dist.group.WORLD
        world = dist.get_world_size(process_group)
        self._process_group = process_group
        weights = {n: e.weight.detach().clone() for n, e in self.collection.ec.embeddings.items()}
        sharder = EmbeddingCollectionSharder(
            fused_params={"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": lr, "eps": eps}
        )
        constraints = {n: ParameterConstraints(sharding_types=["table_wise"], compute_kernels=["fused"]) for n in self.specs}
        planner = EmbeddingShardingPlanner(topology=Topology(world_size=world, compute_device="cpu"), constraints=constraints)
        plan = planner.collective_plan(self.collection, [sharder], process_group)
        self._sharded = DistributedModelParallel(
            self.collection,
            device=torch.device("cpu"),
            plan=plan,
            sharders=[sharder],
            env=ShardingEnv.from_process_group(process_group),
        )
        self.load_weights(weights)

    @property
    def sharded(self) -> bool:
        return self._sharded is not None

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
        """Full tables as plain tensors, keyed by table name (gathered when sharded)."""
        if not self.sharded:
            return {n: e.weight.detach() for n, e in self.collection.ec.embeddings.items()}
        out = {}
        for key, st in self._sharded.state_dict().items():
            name = key.split(".")[-2]
            full = torch.empty(st.size()) if _rank() == 0 else None
            st.gather(dst=0, out=full)
            if full is not None:
                out[name] = full
        return out

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        missing = set(self.specs) - set(weights)
        if missing:
            raise KeyError(f"embedding weights missing tables {sorted(missing)}")
        for n, w in weights.items():
            want = (self.specs[n].num_embeddings, self.specs[n].dim)
            if tuple(w.shape) != want:
                raise ValueError(f"embedding table {n!r}: weight shape {tuple(w.shape)}, expected {want}")
        if not self.sharded:
            with torch.no_grad():
                for n, e in self.collection.ec.embeddings.items():
                    e.weight.copy_(weights[n])
            return
        for key, st in self._sharded.state_dict().items():
            _scatter(st, weights[key.split(".")[-2]])

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        """The fused optimizer's state of a sharded set (row-wise Adagrad's per-row accumulators) as full
        plain tensors keyed `<table>.<state>`, gathered to rank 0 (a collective: call on every rank).

        Each rank's optimizer holds only the tables it owns, so the ranks do not share a list of tensors
        to gather one by one; one gather_object of every rank's local shards does it."""
        import torch.distributed as dist

        state = self._sharded.fused_optimizer.state_dict()["state"]
        local = {key: (tuple(st.size()), [(s.metadata.shard_offsets, s.tensor) for s in st.local_shards()])
                 for per_table in state.values() for key, st in per_table.items()}
        group = self._process_group
        parts = [None] * dist.get_world_size(group) if dist.get_rank(group) == 0 else None
        dist.gather_object(local, parts, dst=dist.get_global_rank(group, 0), group=group)
        out: dict[str, torch.Tensor] = {}
        for part in parts or []:
            for key, (size, shards) in part.items():
                full = out.setdefault(key, torch.zeros(size))
                for offsets, t in shards:
                    full[tuple(slice(o, o + n) for o, n in zip(offsets, t.shape))] = t
        return out

    def load_optimizer_state(self, state: dict[str, torch.Tensor]) -> None:
        """Write `optimizer_state()`'s tensors into this rank's shards of the live fused optimizer state."""
        for per_table in self._sharded.fused_optimizer.state_dict()["state"].values():
            for key, st in per_table.items():
                _scatter(st, state[key])

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


@torch.no_grad()
def _scatter(st, full: torch.Tensor) -> None:
    """Copy the parts of the full tensor `full` that this rank holds into the ShardedTensor `st` (in place)."""
    for shard in st.local_shards():
        m = shard.metadata
        shard.tensor.copy_(full[tuple(slice(o, o + n) for o, n in zip(m.shard_offsets, m.shard_sizes))])


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0
