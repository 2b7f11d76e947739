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
388 B per 256 events at d_a = 16, i.e. 5.2% of the 29-byte records.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from retrieval.block_search import (PositionBound, block_position_bounds, block_ranges, id_ranges, kth_scores, needed,
                                     plan_blocks, prefilter, summaries_many, topk_over, window_blocks, window_cols)
from recsys.embeddings import TableSet
from recsys.models.attention import stage1_from_tables


FULL_GROUP_EVENTS = 1 << 20


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
        self._pos_scores: np.ndarray | None = None   # float64 position term per recency 0..max_len
        self._seed_kth: dict[int, float] = {}         # seed length -> k-th best position term among its recencies
        self._cap: np.ndarray | None = None
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
        return self.full_many([records], [first_abs])[0]

    def full_many(self, records: list[np.ndarray], firsts: list[int]) -> list[IndexUpdate]:
        """Whole indexes of many users' visible sequences (abs index of each one's oldest record), in groups
        of about FULL_GROUP_EVENTS events (a rebuild chunk of long sequences would otherwise embed them all
        at once: 256 users x 1M events x 32 floats)."""
        out: list[IndexUpdate] = []
        i = 0
        while i < len(records):
            j, total = i, 0
            while j < len(records) and (j == i or total + len(records[j]) <= FULL_GROUP_EVENTS):
                total += len(records[j])
                j += 1
            got = summaries_many(self._keys_of(records[i:j]), firsts[i:j], [len(r) for r in records[i:j]], self.block)
            out += [IndexUpdate(2, b0, e.tobytes(), self.entry_bytes, self.fmt) for b0, e in got]
            i = j
        return out

    def append_many(self, lasts: list[bytes | None], ns: list[int], records: list[np.ndarray]) -> list[IndexUpdate]:
        """Updates for many users' in-order batches at once (one embedding lookup and one pass for the
        worker's whole batch): user u's records get abs indices ns[u].., lasts[u] is its index's last entry."""
        prev = [None if last is None or n % self.block == 0 else self.decode(last)[-1] for last, n in zip(lasts, ns)]
        got = summaries_many(self._keys_of(records), ns, [len(r) for r in records], self.block, prev)
        return [IndexUpdate(1, b0, e.tobytes(), self.entry_bytes, self.fmt) for b0, e in got]

    def append(self, last: bytes | None, n: int, records: np.ndarray) -> IndexUpdate:
        return self.append_many([last], [n], [records])[0]

    def _keys_of(self, records: list[np.ndarray]) -> torch.Tensor:
        return self.keys(np.concatenate(records)) if records else torch.zeros(0, self.d_sem)

    def decode(self, data: bytes) -> np.ndarray:
        """Index string -> entries [nb, 3 d_sem + 1] float32 (min, max, centroid, radius)."""
        if len(data) % self.entry_bytes:
            raise ValueError(f"block index of {len(data)} bytes: not whole entries of {self.entry_bytes}")
        return np.frombuffer(data, dtype="<f4").reshape(-1, 3 * self.d_sem + 1)

    def cap(self) -> np.ndarray:
        """One summary [3 d_sem + 1] holding every key any user can have: the box and ball of every item row
        beside every category row (the semantic key is their concatenation), built once per model. It bounds
        a block before its own summary is read (retrieval.block_search.prefilter)."""
        if self._cap is None:
            with torch.no_grad():
                it, ct = self.item_w.double(), self.cate_w.double()
                ci, cc = it.mean(0), ct.mean(0)
                r = float(((it - ci).norm(dim=1).max() ** 2 + (ct - cc).norm(dim=1).max() ** 2).sqrt())
                c = torch.cat([ci, cc]).float()
                # the radius is taken from the fp32 centroid actually stored, and rounded up
                r = max(r, float(((it - c[:self.d_att].double()).norm(dim=1).max() ** 2
                                  + (ct - c[self.d_att:].double()).norm(dim=1).max() ** 2).sqrt()))
                self._cap = np.concatenate([torch.cat([it.min(0).values, ct.min(0).values]).float().numpy(),
                                            torch.cat([it.max(0).values, ct.max(0).values]).float().numpy(),
                                            c.numpy(), np.nextafter(np.float32(r * (1 + 1e-9)), np.float32(np.inf))[None]])
        return self._cap

    def position_bound(self) -> PositionBound:
        """Built once per model (the target's position row is the same for every candidate)."""
        if self._pos is None:
            from retrieval import segment_scale

            scale = segment_scale(self.d_sem + self.d_att, self.segments)[self.d_sem:]
            rows = self.pos_rows(torch.arange(self.serving.max_len + 1))
            with torch.no_grad():
                q_pos = self.pos_w[0].float() * scale
                self._pos = PositionBound(q_pos, self.pos_w.float(), self.block, rows)
                self._pos_scores = (self.pos_w.float().double() @ q_pos.double()).numpy()[rows.numpy()]
        return self._pos

    def seed_kth_position(self, seed: int, k: int) -> float:
        """The k-th largest position term over recencies 1..seed (-inf for fewer than k): no candidate's k-th
        best score among a seed of that many newest events exceeds its semantic cap plus this."""
        if seed not in self._seed_kth:
            self.position_bound()
            s = self._pos_scores[1:seed + 1]
            self._seed_kth[seed] = float(np.partition(s, len(s) - k)[len(s) - k]) if len(s) >= k else float("-inf")
        return self._seed_kth[seed]


# ---- the request side -----------------------------------------------------------------------------------


@dataclass
class IndexedSearch:
    """One request's search over one user's indexed sequence, across its reads."""

    head: object                 # service.state.IndexHead
    items: torch.Tensor          # [C] table ids
    cates: torch.Tensor
    query: torch.Tensor          # [C, D] attention query (target rows, position id 0)
    q: torch.Tensor              # the same, segment scale applied (the reference's query)
    window: int                  # events searched: the newest min(visible, max_len)
    seed: np.ndarray             # the newest records of the window (already read), oldest first
    kth: torch.Tensor            # [C] each candidate's k-th score among the seed
    candidates: np.ndarray       # blocks the position bound leaves (before their summaries are read)
    entry_ranges: list[tuple[int, int]]   # those blocks as runs of block ids: the summaries to read
    seed_top: tuple[torch.Tensor, torch.Tensor] = None   # the seed's exact top-k (scores, columns [C, k])
    ranges: list[tuple[int, int]] = None  # abs [lo, hi) of the blocks to read: set by select_blocks
    blocks: int = 0              # blocks read past the seed


def _search(ix: BlockIndexer, query: torch.Tensor, records: np.ndarray, cols: np.ndarray, k: int):
    """The exact top-k over some events (records at reference columns cols, position row of recency col + 1)
    with the whole-sequence search's stage-1 inputs (recsys.models.attention.stage1_from_tables: the same
    numbers) -> (scores, columns)."""
    item, _ = ix.serving.map_ids(records["item"], "item")
    cate, _ = ix.serving.map_ids(records["cate"], "cate")
    pos = ix.pos_rows(torch.from_numpy(cols + 1))
    d = ix.d_att
    with torch.no_grad():
        # the model's cache of the per-row position term: computing it here per call cost ~50 ms at a 1M-row
        # position table, twice a request (seed and blocks), where the search itself takes ~1 ms
        q, x, segs = stage1_from_tables([query[:, :d], query[:, d:2 * d], query[:, 2 * d:]],
                                        [ix.item_w, ix.cate_w, ix.pos_w], [item, cate, pos], ix.segments,
                                        getattr(ix.serving.model, "position_bias", None))
    return topk_over(q, x, cols, k, segs)


def begin_search(ix: BlockIndexer, head, items: torch.Tensor, cates: torch.Tensor, max_len: int, k: int) -> IndexedSearch:
    """After the first read (meta, the newest records): the seed's exact top-k gives each candidate a k-th
    score; the blocks whose position bound, with the model-wide semantic bound, reaches it are the ones
    whose summaries to read."""
    from retrieval import segment_scale

    B = ix.block
    with torch.no_grad():
        query = torch.cat([ix.item_w.index_select(0, items), ix.cate_w.index_select(0, cates),
                           ix.pos_w[0].expand(len(items), -1)], 1)
    q = query.float() * segment_scale(query.shape[1], ix.segments)
    n, window = head.n, min(head.visible, max_len)
    seed = head.newest[len(head.newest) - min(len(head.newest), window):]
    seed_cols = np.arange(len(seed), dtype=np.int64)                          # newest = column 0
    seed_top = _search(ix, query, seed[::-1], seed_cols, k)
    kth = kth_scores(seed_top[0], k)
    ids = window_blocks(n, window, B)
    if len(ids):
        ids = ids[prefilter(q, ix.d_sem, ix.cap(), n, window, B, ix.position_bound(), kth, n - len(seed))]
    if len(ids) and ids[0] < head.ix0:
        raise ValueError(f"block index starts at block {head.ix0}, the window at {ids[0]}")
    return IndexedSearch(head, items, cates, query, q, window, seed, kth, ids, id_ranges(ids), seed_top)


def surely_kept(ix: BlockIndexer, head, max_len: int, k: int) -> int:
    """How many blocks `begin_search` leaves at least, whatever the candidates, from the position term alone,
    before any embedding or search: the prefilter keeps a block whose position bound reaches tau = min over
    candidates of (k-th seed score - margin - semantic cap), and a k-th seed score is at most the semantic cap
    plus the k-th best position term among the seed's recencies, so every block whose bound reaches that term
    is kept (the margin covers the fp32 rounding of the seed scores). With a position term that does not
    prefer recent events (an untrained model, or one that learned none) that is nearly every block, and the
    whole-sequence path answers without the seed search (service.scoring)."""
    B = ix.block
    window = min(head.visible, max_len)
    seed = min(len(head.newest), window)
    ids = window_blocks(head.n, window, B)
    ids = ids[ids * B < head.n - seed]
    if not len(ids):
        return 0
    return int((block_position_bounds(ids, head.n, B, ix.position_bound(), head.n - seed)
                >= ix.seed_kth_position(seed, k)).sum())


def select_blocks(ix: BlockIndexer, s: IndexedSearch, entries: list[bytes]) -> None:
    """After the second read (the summaries of s.entry_ranges): the blocks whose own bound reaches some
    candidate's k-th score -> s.ranges (abs index runs to read)."""
    got = ix.decode(b"".join(entries))
    plan = plan_blocks(s.q, ix.d_sem, s.candidates, got, s.head.n, s.window, ix.block, ix.position_bound(),
                       s.head.n - len(s.seed))
    need = needed(plan, s.kth, np.zeros(len(s.candidates), bool))
    s.ranges = block_ranges(plan, need, ix.block, s.head.n - len(s.seed))
    s.blocks = int(need.sum())


def finish_search(ix: BlockIndexer, s: IndexedSearch, fetched: list[np.ndarray], k: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """After the third read (the records of s.ranges): one exact top-k over the seed and the blocks read,
    in column order. -> (scores [C, k], columns [C, k], the kept records [C, k] (holes: column 0's)). With no
    block read past the seed, the seed's top-k is the answer: the same search on the same events, not run again."""
    n = s.head.n
    if not s.ranges:
        top, idx = s.seed_top
        recs = s.seed[::-1]                                                     # newest first: column j = row j
        return top, idx, recs[idx.clamp(min=0).numpy()]
    recs = np.concatenate([s.seed[::-1]] + [r[::-1] for r in reversed(fetched)])       # newest first
    cols = np.concatenate([np.arange(len(s.seed), dtype=np.int64)]
                          + [window_cols(n, lo, hi)[::-1] for lo, hi in reversed(s.ranges)])
    top, idx = _search(ix, s.query, recs, cols, k)
    at = np.searchsorted(cols, idx.clamp(min=0).numpy())
    return top, idx, recs[at]
