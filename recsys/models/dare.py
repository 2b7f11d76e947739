"""DARE: Decoupled Attention and Representation Embeddings for long-sequence CTR (arXiv 2410.02604).

Two independent table sets: *attention* embeddings (dim d_a per field) only score history events against
the target; *representation* embeddings (dim d_r per field) are what the kept events contribute. Coupling
them (TWIN) makes one vector serve both roles, and the attention gradient dominates it; decoupling lets
d_a be small (cheap search over a lifelong history) while d_r stays expressive.

Per event and for the target, each set embeds (item, category, position); the target's position id is 0,
history column j has position j + 1 (1 = most recent). Stage 1 scores with the split scale of
attention.search (semantic = item+category, 2 d_a dims; position, d_a dims) on embeddings without gradient;
stage 2 embeds only the k kept events again, with gradient (attention.aggregate), so the main head's backward
touches B x k rows, not B x L; the auxiliary head (attention.soft_attention) is what sends gradient to every
history event. The tower is MLP([v_t, h, v_t * h]) with v_t = the target's representation.

Memory branches (optional, DESIGN section 3 "lifelong split of work"): search covers the recent events,
the memories cover every event the user ever had. Their per-event input is position-free,
x_i = [r_item(i), r_cate(i)] (representation tables; "position from the end" would change every earlier
event's input whenever a new one arrives), so the state after event t depends on events 1..t only and
the stream worker folds each new event in. Training runs each user's memory over its chronological
timeline once per batch (`HistoryBatch.timeline()`), and each row reads it just before its target;
serving reads the stored per-user state (`MemoryReads.from_states`). Both join the MLP input:
Aaren's summary, and the Titans memory read with the target's representation v_t as query.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import retrieval
from recsys.config.model import ModelConfig
from recsys.data.batch import HistoryBatch
from recsys.embeddings import TableSet, TableSpec
from kernels.gather_keys.cpu import gather_keys
from recsys.models.attention import (Fields, RowBias, aggregate, folded_kept_attention, gather_ids, kept_weights, search,
                                     soft_attention, stage1_from_tables)
from recsys.models.layers import MLP, by_length_groups, ctr_input, init_weights
from recsys.models.output import ModelOutput

FIELDS = ("item", "cate", "pos")


@dataclass
class MemoryReads:
    """What the memory branches give each query row: Aaren's summary and the Titans memory weights at the
    row's read point. Rows [Q] (one per target), or [1] shared by all targets of one user (serving)."""

    aaren: torch.Tensor | None           # [Q or 1, d_aaren]
    titans: list[torch.Tensor] | None    # per memory layer [Q or 1, d_(j-1), d_j]

    def rows(self, idx: torch.Tensor) -> "MemoryReads":
        return MemoryReads(None if self.aaren is None else self.aaren[idx],
                           None if self.titans is None else [w[idx] for w in self.titans])

    def summaries(self, model: "DARE", v_t: torch.Tensor) -> list[torch.Tensor]:
        """v_t [Q, D] (the targets' representations, the Titans query) -> [Q, d] per branch."""
        out = []
        if self.aaren is not None:
            out.append(self.aaren.expand(v_t.shape[0], -1))
        if self.titans is not None:
            if self.titans[0].shape[0] == v_t.shape[0]:
                out.append(model.titans.read_memory(self.titans, v_t))                 # one memory per row
            else:
                out.append(model.titans.read_memory(self.titans, v_t[None])[0])       # one user's memory, Q queries
        return out

    @staticmethod
    def from_states(model: "DARE", aaren_state, titans_state) -> "MemoryReads":
        """From one user's streamed states (service.model_state): the read `Aaren.read` / `NeuralMemory.read`
        make, split so that the candidates share one memory."""
        a = model.aaren.read(aaren_state) if model.aaren is not None else None
        w = model.titans.read_weights(titans_state) if model.titans is not None else None
        return MemoryReads(a, w)


class DARE(nn.Module):
    def __init__(self, config: ModelConfig, n_items: int, n_cates: int) -> None:
        super().__init__()
        self.config = config
        self.k = config.top_k
        self.rows = {"item": n_items, "cate": n_cates, "pos": int(position_rows(torch.tensor([config.max_len]), config)) + 1}
        self.build_tables(config)
        self.position_bias = RowBias()                     # per model: a reload builds a new model, so starts empty
        d_r = len(FIELDS) * config.dim_rep
        self.mlp = MLP(3 * d_r + self.build_branches(d_r), list(config.mlp))
        self.aux_mlp = MLP(3 * d_r, list(config.mlp)) if config.aux_loss else None
        for tower in (self.mlp, self.aux_mlp):
            if tower is not None:  # the branches keep their own initialisation
                init_weights(tower, config.init_std)

    def build_branches(self, d_r: int) -> int:
        """Optional lifelong summaries joining the MLP input (module doc): Aaren's streaming attention
        summary and the Titans memory read with the target as query. -> their total width."""
        from recsys.modules.aaren import Aaren
        from recsys.modules.titans import NeuralMemory

        d_x = 2 * self.config.dim_rep                                            # memory_features: item, category
        self.aaren = Aaren(d_in=d_x) if self.config.aaren else None
        self.titans = (
            NeuralMemory(d_in=d_x, d_query=d_r, chunk_size=self.config.titans_chunk_size, max_lr=self.config.titans_max_lr,
                         max_grad_norm=self.config.titans_max_grad_norm, backprop_clip=self.config.titans_backprop_clip)
            if self.config.titans else None
        )
        return sum(m.d_out for m in (self.aaren, self.titans) if m is not None)

    @property
    def has_memory(self) -> bool:
        return self.aaren is not None or self.titans is not None

    def memory_features(self, item: torch.Tensor, cate: torch.Tensor, grad: bool = True) -> torch.Tensor:
        """The memories' per-event input, position-free: item, cate [...] -> [r_item, r_cate] [..., 2 d_r].
        Without gradient the rows are read straight from the weights (the stream worker's path), unless sharded."""
        (_, _), (tables, prefix) = self.role_tables()
        name = (lambda f: f"{prefix}_{f}") if prefix else (lambda f: f)
        if item.numel() == 0:  # no event to read (a cold user): the table set cannot look up nothing
            return torch.zeros(*item.shape, 2 * self.config.dim_rep)
        if not (grad and torch.is_grad_enabled()) and not tables.sharded:  # a sharded set has no full tables
            w = tables.weights()
            return torch.cat([w[name("item")][item], w[name("cate")][cate]], dim=-1)
        # the set looks up every table it holds: the position table gets one padding id
        emb = tables({name("item"): item.reshape(-1), name("cate"): cate.reshape(-1),
                      name("pos"): item.new_zeros(1)})
        return torch.cat([emb[name("item")], emb[name("cate")]], dim=-1).reshape(*item.shape, -1)

    def memory_reads(self, batch: HistoryBatch) -> MemoryReads:
        """Training and offline scoring: each user's memory over its timeline once, read per row just before
        its target (`Timeline`'s read rule)."""
        tl = batch.timeline()
        x = self.memory_features(tl.item, tl.cate)                               # [N, 2 d_r], CSR by user
        aaren = titans = None
        if self.aaren is not None:
            aaren = self.aaren.prefix_reads(x, tl.offsets, tl.row_user, tl.row_prefix)
        if self.titans is not None:
            titans = self.titans.prefix_weights(x, tl.offsets, tl.row_user, tl.row_prefix)
        return MemoryReads(aaren, titans)

    def build_tables(self, config: ModelConfig) -> None:
        self.att_tables = self._tables("att", config.dim_att, config)
        self.rep_tables = self._tables("rep", config.dim_rep, config)
        # split scale: semantic part (item + category) and position part, each over its own sqrt(dim)
        self.segments = [2 * config.dim_att, config.dim_att]

    def _tables(self, prefix: str, dim: int, config: ModelConfig) -> TableSet:
        specs = [TableSpec(f"{prefix}_{f}" if prefix else f, self.rows[f], dim) for f in FIELDS]
        return TableSet(specs, config.embedding_backend, config.init_std)

    # --- embeddings ---

    def _fields(self, tables: TableSet, prefix: str, target: dict[str, torch.Tensor], events: dict[str, torch.Tensor], grad: bool) -> Fields:
        """target ids [Q] per field, event ids [..., n] per field -> per-field embeddings (one lookup per table)."""
        name = (lambda f: f"{prefix}_{f}") if prefix else (lambda f: f)
        ids = {f: (target[f].reshape(-1), events[f]) for f in FIELDS}
        ids["pos"] = tuple(position_rows(p, self.config) for p in ids["pos"])
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            emb = tables({name(f): ids[f] for f in FIELDS})
        return Fields(
            [emb[name(f)][0] for f in FIELDS],                                             # [Q, d] each
            [emb[name(f)][1] for f in FIELDS],                                             # [..., n, d] each
        )

    def embed(self, target: dict[str, torch.Tensor], events: dict[str, torch.Tensor], grad: bool, rep: bool = True) -> tuple[Fields, Fields | None]:
        """-> (attention fields, representation fields or None when `rep` is False)."""
        att = self._fields(self.att_tables, "att", target, events, grad)
        return att, (self._fields(self.rep_tables, "rep", target, events, grad) if rep else None)

    # --- the model ---

    def features(self, target: dict[str, torch.Tensor], events: dict[str, torch.Tensor], lengths: torch.Tensor | int,
                 memory: MemoryReads | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Everything that reads the history (per row) -> (MLP input [B, D_in], auxiliary MLP input
        [B, 3 d_r] or None, retrieved columns [B, k]). `memory`: the rows' memory reads (memory branches)."""
        # the whole history needs gradient (and representations) only for the auxiliary head
        whole = self.aux_mlp is not None
        att, rep = self.embed(target, events, grad=whole, rep=whole)
        idx = search(att, lengths, self.k, self.segments)                        # [B, k] stage 1
        kept = {f: gather_ids(events[f], idx) for f in FIELDS}                   # [B, k] ids
        att_k, rep_k = self.embed(target, kept, grad=True)
        return self.stage2(att, rep, att_k, rep_k, idx, lengths, memory)

    def stage2(self, att: Fields, rep: Fields | None, att_k: Fields, rep_k: Fields, idx: torch.Tensor,
               lengths: torch.Tensor | int, memory: MemoryReads | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """From the kept events (att_k, rep_k), the whole history (att, rep; rep None when the auxiliary
        head does not read it) and the memory reads -> features()' (MLP input, auxiliary MLP input, idx)."""
        h = aggregate(att_k, rep_k, idx, self.segments)                          # [B, 3 d_r] stage 2
        v_t = rep_k.target_vec()                                                 # [B, 3 d_r]
        if self.has_memory and memory is None:
            raise ValueError("a model with memory branches needs the rows' memory reads")
        extra = memory.summaries(self, v_t) if self.has_memory else []
        x = torch.cat([ctr_input(v_t, h)] + extra, dim=-1)                       # [B, D_in]
        x_aux = ctr_input(v_t, soft_attention(att, rep, lengths, self.segments)) if self.aux_mlp is not None else None
        return x, x_aux, idx

    def towers(self, x: torch.Tensor, x_aux: torch.Tensor | None, idx: torch.Tensor) -> ModelOutput:
        aux = self.aux_mlp(x_aux).squeeze(-1) if x_aux is not None else None     # [B]
        return ModelOutput(self.mlp(x).squeeze(-1), aux, idx)

    def heads(self, target: dict[str, torch.Tensor], events: dict[str, torch.Tensor], lengths: torch.Tensor | int,
              memory: MemoryReads | None = None) -> ModelOutput:
        return self.towers(*self.features(target, events, lengths, memory))

    def forward(self, batch: HistoryBatch) -> ModelOutput:
        memory = self.memory_reads(batch) if self.has_memory else None

        def group(rows: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
            target = {"item": batch.target_item[rows], "cate": batch.target_cate[rows], "pos": torch.zeros_like(rows)}
            events = {"item": batch.hist_item[rows, :width], "cate": batch.hist_cate[rows, :width], "pos": batch.hist_pos[rows, :width]}
            return self.features(target, events, batch.hist_len[rows], None if memory is None else memory.rows(rows))

        return self.towers(*by_length_groups(batch.hist_len, self.config.group_rows, group))

    @torch.no_grad()
    def attention_weights(self, batch: HistoryBatch) -> torch.Tensor:
        """Explanations: stage 2's weight of each retrieved event, [B, k] in retrieval order (0 = empty slot)."""
        target = {"item": batch.target_item, "cate": batch.target_cate, "pos": torch.zeros_like(batch.target_item)}
        events = {"item": batch.hist_item, "cate": batch.hist_cate, "pos": batch.hist_pos}
        att, _ = self.embed(target, events, grad=False, rep=False)
        idx = search(att, batch.hist_len, self.k, self.segments)
        att_k, _ = self.embed(target, {f: gather_ids(events[f], idx) for f in FIELDS}, grad=False, rep=False)
        return kept_weights(att_k, idx, self.segments)

    @torch.no_grad()
    def score_candidates(self, hist_item: torch.Tensor, hist_cate: torch.Tensor, cand_item: torch.Tensor, cand_cate: torch.Tensor,
                         memory: MemoryReads | None = None) -> ModelOutput:
        """Serving: C candidates of ONE user sharing one history (retrieval's serving layout).

        hist_item, hist_cate [L]: the user's last L <= max_len events, most recent first, no padding;
        cand_item, cand_cate [C]; memory: the user's memory reads (`MemoryReads.from_states`), for a model
        with memory branches. -> logit [C], aux_logit [C] or None, indices [C, k]. Equals the batch
        forward on the same rows in eval mode.
        """
        L = hist_item.shape[0]
        if L > self.config.max_len:
            raise ValueError(f"history of {L} events exceeds max_len={self.config.max_len}; pass the most recent {self.config.max_len}")
        if hist_cate.shape != hist_item.shape or cand_cate.shape != cand_item.shape:
            raise ValueError("hist_item/hist_cate and cand_item/cand_cate must have matching shapes")
        target = {"item": cand_item, "cate": cand_cate, "pos": torch.zeros_like(cand_item)}
        events = {"item": hist_item, "cate": hist_cate, "pos": torch.arange(1, L + 1, device=hist_item.device)}
        return self.shared_history_heads(target, events, L, memory)         # targets [C], one history [L]

    @torch.no_grad()
    def kept_heads(self, cand_item: torch.Tensor, cand_cate: torch.Tensor, kept_item: torch.Tensor, kept_cate: torch.Tensor,
                   idx: torch.Tensor, L: int, memory: MemoryReads | None = None) -> ModelOutput:
        """Serving, stage 2 only: C candidates of one user whose stage-1 top-k was found elsewhere (the block
        index search, service.block_index). kept_item, kept_cate [C, k]: ids of the kept events (holes, idx
        -1, carry column 0's ids, as in shared_history_heads); idx [C, k]: their history columns (0 = most
        recent, position id idx + 1); L: the history length searched. Equals score_candidates on the whole
        history when idx is its search's result (the kept rows are the same table rows)."""
        if self.aux_mlp is not None:
            raise ValueError("kept_heads: the auxiliary head reads the whole history (serving drops it)")
        target = {"item": cand_item, "cate": cand_cate, "pos": position_rows(torch.zeros_like(cand_item), self.config)}
        kept = {"item": kept_item.reshape(-1), "cate": kept_cate.reshape(-1),
                "pos": position_rows(idx.clamp(min=0).reshape(-1) + 1, self.config)}
        return self.served_stage2(target, kept, idx, L, memory)

    def role_tables(self) -> tuple[tuple[TableSet, str], tuple[TableSet, str]]:
        """(table set, name prefix) of the attention role and of the representation role."""
        return (self.att_tables, "att"), (self.rep_tables, "rep")

    @torch.no_grad()
    def shared_history_heads(self, target: dict[str, torch.Tensor], events: dict[str, torch.Tensor], L: int,
                             memory: MemoryReads | None = None) -> ModelOutput:
        """heads() for C targets sharing ONE history ([C] target ids, [L] event ids), computed the serving
        way, with heads()' numbers (tests/test_models.py compares it with the batch forward):
        - table rows read straight from the weights: no id dedup or KJT, as nothing sends gradient back;
        - the shared-history top-k (retrieval.topk's serving layout: all C targets against one history);
        - served (no auxiliary head: serving drops it, and only it reads the whole history's embeddings):
          the search's keys gathered straight into place (`stage1_from_tables`: no per-field [L, d] copies,
          the position field as one score per table row; at L = 1M, 190 -> 80 ms), and the attention and
          representation rows of the kept events looked up alone (C x k rows instead of L).
        """
        (att_set, att_prefix), (rep_set, rep_prefix) = self.role_tables()
        target = {**target, "pos": position_rows(target["pos"], self.config)}
        events = {**events, "pos": position_rows(events["pos"], self.config)}
        if self.aux_mlp is not None:                                             # the batch forward's layout
            att = _lookup(att_set, att_prefix, target, events)
            rep = att if rep_set is att_set else _lookup(rep_set, rep_prefix, target, events)
            idx = search(att, L, self.k, self.segments)                          # [C, k] stage 1
            safe = idx.clamp(min=0).flatten()                                    # holes read column 0, weight 0
            kept = lambda e: e.index_select(0, safe).view(*idx.shape, -1)      # noqa: E731 - [C, k, d]
            att_k = Fields(att.target, [kept(e) for e in att.events])
            rep_k = Fields(rep.target, [kept(e) for e in rep.events])
            return self.towers(*self.stage2(att, rep, att_k, rep_k, idx, L, memory))
        w = att_set.weights()
        tables = [w[f"{att_prefix}_{f}" if att_prefix else f] for f in FIELDS]
        att_t = [t.index_select(0, target[f]) for t, f in zip(tables, FIELDS)]
        query, keys, segs = stage1_from_tables(att_t, tables, [events[f] for f in FIELDS], self.segments,
                                               self.position_bias)
        _, idx = retrieval.topk(query, keys, L, self.k, segs)                    # [C, k] stage 1
        safe = idx.clamp(min=0).flatten()                                        # holes read column 0, weight 0
        return self.served_stage2(target, {f: events[f].index_select(0, safe) for f in FIELDS}, idx, L, memory)

    @torch.no_grad()
    def served_stage2(self, target: dict[str, torch.Tensor], kept: dict[str, torch.Tensor], idx: torch.Tensor, L: int,
                      memory: MemoryReads | None = None) -> ModelOutput:
        """Stage 2 and the tower, served: where the whole-history search (shared_history_heads) and the block
        index's (kept_heads) both end, so the two paths give the same bits. target: table rows [C] per field
        (position rows); kept: table rows [C k] per field of the kept events (holes: column 0's, weight 0);
        idx [C, k]. stage2()'s function (tests/test_models.py compares the served and batch logits) in fewer
        operations: each kept event's attention key read in the search's folded layout (item and category
        rows, then its one position number, as stage1_from_tables builds the keys), scored, and its
        representation rows summed with the softmax weights, in one pass over the kept rows
        (`folded_kept_attention`), where stage2() takes per field lookups, scores and sums."""
        (att_set, att_prefix), (rep_set, rep_prefix) = self.role_tables()
        named = lambda tables, prefix: [tables.weights()[f"{prefix}_{f}" if prefix else f] for f in FIELDS]  # noqa: E731
        att, rep = named(att_set, att_prefix), named(rep_set, rep_prefix)
        att_t = [t.index_select(0, target[f]) for t, f in zip(att, FIELDS)]                # [C, d] per field
        h = folded_kept_attention(att_t, att, rep, [kept[f] for f in FIELDS], idx, self.segments,
                                  self.position_bias)                                     # [C, D_r]
        v_t = gather_keys(rep, [target[f] for f in FIELDS])                               # [C, D_r]
        if self.has_memory and memory is None:
            raise ValueError("a model with memory branches needs the rows' memory reads")
        extra = memory.summaries(self, v_t) if self.has_memory else []
        return self.towers(torch.cat([ctr_input(v_t, h)] + extra, dim=-1), None, idx)


def position_rows(recency: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """Position ids (recency, 1 = most recent; 0 = target or padding) -> position table rows: the id itself up
    to config.pos_exact, beyond it a log-distance bucket (ModelConfig.pos_exact). The one mapping training,
    serving and the block index's position bound all use."""
    e = config.pos_exact
    if e is None or e >= config.max_len:
        return recency
    r = recency.to(torch.float64).clamp(min=1)
    bucket = e + 1 + torch.floor(config.pos_buckets_per_octave * torch.log2(r / e)).to(recency.dtype)
    return torch.where(recency <= e, recency, bucket)


def _lookup(tables: TableSet, prefix: str, target: dict[str, torch.Tensor], events: dict[str, torch.Tensor]) -> Fields:
    """DARE._fields without gradient: the same rows, read from the weights (a served model is never sharded:
    on a sharded set weights() gathers the full tables, correct but slow)."""
    names = {f: f"{prefix}_{f}" if prefix else f for f in FIELDS}
    w = tables.weights()
    return Fields([w[names[f]].index_select(0, target[f]) for f in FIELDS],
                  [w[names[f]].index_select(0, events[f]) for f in FIELDS])
