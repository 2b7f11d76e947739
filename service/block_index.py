"""Per-user block index of the stored sequence, per model version: what lets a request search only the blocks
that can hold a top-k event (retrieval.block_search has the bound and the search).

Layout (service.keys): `{u:<id>}:ix:<ver>` is a string of fixed-size entries, entry i = block ix0 + i,
each float32: the min, the max and a centroid of the semantic attention keys (item, category rows of the
version's attention tables) of the block's events, and the radius of a ball around the centroid holding
them (retrieval.block_search.summaries); the meta hash holds `ix0:<ver>` (first block kept), `ixrev:<ver>` (the rev the
index is current at: like `srev:` for the state, any apply by another version leaves it stale) and
`ixfmt:<ver>` ("<block> <dim> boxball": an index of another block size, width or summary is stale too).
Block b holds the events of abs index bB .. (b+1)B - 1, where the record at position i of seq ++ seqt has abs
index `n - (M + T) + i` (meta `n` = records ever placed; M + T = records stored): appends keep every abs
index, cutting the sequence back drops the oldest ones, so only an out-of-order merge (which the store
handles by rebuilding the index from the merged sequence, as it does the state) moves events across blocks.

The stream worker (through `StateStore.apply`) widens the open block's summary and adds the new blocks'
for each in-order batch: one SETRANGE of a few hundred bytes. Size: (3 x 2 d_a + 1) x 4 bytes per block =
388 B per 256 events at d_a = 16, i.e. 7.2% of the 21-byte records.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from retrieval.block_search import (BlockPlan, PositionBound, RunningTopK, extend, summaries, needed, plan_blocks, scores,
                                     search_blocks)
from recsys.embeddings import TableSet


@dataclass
class IndexUpdate:
    mode: int           # 1: entries replace the index from block b0 on; 2: entries are the whole index
    b0: int
    entries: bytes
    entry_bytes: int
    fmt: str


class BlockIndexer:
    """The index of one served model version: builds and extends entries from SEQ_DTYPE records, and holds
    what a request needs to bound scores (attention tables, position bound)."""

    def __init__(self, serving, block: int):
        model = serving.model
        (att, prefix), _ = model.role_tables()
        name = (lambda f: f"{prefix}_{f}") if prefix else (lambda f: f)
        w = att.weights() if isinstance(att, TableSet) else att
        self.serving = serving
        self.block = block
        self.item_w, self.cate_w, self.pos_w = w[name("item")], w[name("cate")], w[name("pos")]
        self.d_att = self.item_w.shape[1]
        self.d_sem = 2 * self.d_att
        self.segments = list(model.segments)
        if self.segments != [self.d_sem, self.d_att]:
            raise ValueError(f"block index: segments {self.segments} are not DARE's [semantic, position]")
        self.entry_bytes = (3 * self.d_sem + 1) * 4
        self.fmt = f"{block} {self.d_sem} boxball"
        self._pos: PositionBound | None = None
        cfg = getattr(model, "config", None)
        if getattr(cfg, "pos_exact", None) is not None:
            from recsys.models.dare import position_rows

            self.pos_rows = lambda r: position_rows(r, cfg)
        else:
            self.pos_rows = lambda r: r

    @staticmethod
    def supports(model) -> bool:
        return hasattr(model, "role_tables") and hasattr(model, "segments") and len(model.segments) == 2

    def keys(self, records: np.ndarray) -> torch.Tensor:
        """SEQ_DTYPE records -> semantic attention keys [n, 2 d_a] (item row, category row)."""
        item, _ = self.serving.map_ids(records["item"], "item")
        cate, _ = self.serving.map_ids(records["cate"], "cate")
        with torch.no_grad():
            return torch.cat([self.item_w.index_select(0, item), self.cate_w.index_select(0, cate)], 1)

    def full(self, records: np.ndarray, first_abs: int) -> IndexUpdate:
        b0, e = summaries(self.keys(records), first_abs, self.block)
        return IndexUpdate(2, b0, e.tobytes(), self.entry_bytes, self.fmt)

    def append(self, last: bytes | None, n: int, records: np.ndarray) -> IndexUpdate:
        prev = None if last is None or n % self.block == 0 else self.decode(last)[-1]
        b0, e = extend(prev, n, self.keys(records), self.block)
        return IndexUpdate(1, b0, e.tobytes(), self.entry_bytes, self.fmt)

    def decode(self, data: bytes) -> np.ndarray:
        """Index string -> entries [nb, 3 d_sem + 1] float32 (min, max, centroid, radius)."""
        if len(data) % self.entry_bytes:
            raise ValueError(f"block index of {len(data)} bytes: not whole entries of {self.entry_bytes}")
        return np.frombuffer(data, dtype="<f4").reshape(-1, 3 * self.d_sem + 1)

    def position_bound(self) -> PositionBound:
        """Built once per model (the target's position row is the same for every candidate)."""
        if self._pos is None:
            from retrieval import segment_scale

            scale = segment_scale(self.d_sem + self.d_att, self.segments)[self.d_sem:]
            rows = self.pos_rows(torch.arange(self.serving.max_len + 1))
            with torch.no_grad():
                self._pos = PositionBound(self.pos_w[0].float() * scale, self.pos_w.float(), self.block, rows)
        return self._pos


# ---- the request side -----------------------------------------------------------------------------------


@dataclass
class IndexedSearch:
    """One request's search over one user's indexed sequence, between the two round trips."""

    head: object                 # service.state.IndexHead
    items: torch.Tensor          # [C] table ids
    cates: torch.Tensor
    q: torch.Tensor              # [C, D] fp32, segment scale applied (the reference's query)
    window: int                  # events searched: the newest min(visible, max_len)
    plan: BlockPlan
    running: RunningTopK
    done: np.ndarray             # [nb] blocks whose events are all scored
    seed_abs: int                # abs index of the oldest seed event (scored from the first read)
    ranges: list[tuple[int, int]]   # abs [lo, hi) to read in the second round trip
    scored: list[np.ndarray]     # records scored so far, each with a "col" view kept in cols
    cols: list[np.ndarray]
    blocks_scored: int = 0


def _event_keys(ix: BlockIndexer, records: np.ndarray, cols: np.ndarray) -> torch.Tensor:
    """Full attention keys [m, D] (item, category, position id col + 1) of records at history columns cols."""
    pos = ix.pos_rows(torch.from_numpy(cols + 1))
    with torch.no_grad():
        return torch.cat([ix.keys(records), ix.pos_w.index_select(0, pos)], 1)


def begin_search(ix: BlockIndexer, head, items: torch.Tensor, cates: torch.Tensor, max_len: int, k: int) -> IndexedSearch:
    """After the first read: score the seed (the newest events), bound every block, and list the ranges of
    blocks that can still hold a top-k event."""
    from retrieval import segment_scale

    B = ix.block
    with torch.no_grad():
        q = torch.cat([ix.item_w.index_select(0, items), ix.cate_w.index_select(0, cates),
                       ix.pos_w[0].expand(len(items), -1)], 1).float()
    q = q * segment_scale(q.shape[1], ix.segments)
    n, window = head.n, min(head.visible, max_len)
    running = RunningTopK(len(items), k)
    seed = head.newest[len(head.newest) - min(len(head.newest), window):]
    seed_abs = n - len(seed)
    seed_cols = np.arange(len(seed) - 1, -1, -1, dtype=np.int64)          # oldest seed event = column len - 1
    if len(seed):
        running.add(scores(q, _event_keys(ix, seed, seed_cols)), torch.from_numpy(seed_cols))
    plan = plan_blocks(q, ix.d_sem, head.ix0, ix.decode(head.index), n, window, B, ix.position_bound())
    done = plan.block_ids * B >= seed_abs
    need = needed(plan, running.kth(), done)
    ranges: list[tuple[int, int]] = []
    for b in plan.block_ids[need]:
        lo, hi = max(int(b) * B, plan.start), min((int(b) + 1) * B, seed_abs)
        if ranges and ranges[-1][1] == lo:
            ranges[-1] = (ranges[-1][0], hi)
        else:
            ranges.append((lo, hi))
    return IndexedSearch(head, items, cates, q, window, plan, running, done, seed_abs, ranges, [seed], [seed_cols])


def finish_search(ix: BlockIndexer, s: IndexedSearch, fetched: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """After the second read (the records of s.ranges): score the blocks still needed, best bound first.
    -> (scores [C, k], columns [C, k], the kept records [C, k] (holes: column 0's record))."""
    B, n = ix.block, s.head.n
    by_block: dict[int, tuple[np.ndarray, int]] = {}
    for (lo, hi), recs in zip(s.ranges, fetched):
        for b in range(lo // B, (hi - 1) // B + 1):
            a, z = max(b * B, lo), min((b + 1) * B, hi)
            by_block[b] = (recs[a - lo: z - lo], a)
    first = int(s.plan.block_ids[0]) if len(s.plan.block_ids) else 0

    def keys_of(order):
        recs, cols = [], []
        for i in order:
            got = by_block.get(first + int(i))
            if got is None:
                continue
            r, a = got
            c = np.arange(n - 1 - a, n - 1 - a - len(r), -1, dtype=np.int64)
            recs.append(r)
            cols.append(c)
        if not recs:
            return s.q.new_zeros(0, s.q.shape[1]), torch.zeros(0, dtype=torch.int64)
        r, c = np.concatenate(recs), np.concatenate(cols)
        s.scored.append(r)
        s.cols.append(c)
        return _event_keys(ix, r, c), torch.from_numpy(c)

    s.blocks_scored = search_blocks(s.q, s.plan, s.running, s.done, keys_of)
    top, idx = s.running.result()
    recs, cols = np.concatenate(s.scored), np.concatenate(s.cols)
    order = np.argsort(cols, kind="stable")
    want = idx.clamp(min=0).numpy()
    want = np.where(idx.numpy() < 0, 0, want)
    at = order[np.searchsorted(cols[order], want)]
    return top, idx, recs[at]
