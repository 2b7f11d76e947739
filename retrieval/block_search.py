"""Exact top-k over a long shared history that reads only the blocks that can hold a top-k event.

The history (one user's events, abs index a = 0.. n-1 oldest first) is cut into fixed-size blocks aligned on
the abs index (block b = events bB .. (b+1)B - 1), so appending events only ever touches the last (open)
block and the blocks after it. Per block the summary bounds the events'
*semantic* attention keys (item + category) two ways, and the bound is the smaller: the per-dimension
min/max box (max over the box of <q, k> is `sum_j max(q_j lo_j, q_j hi_j) = q+ . hi + q- . lo`) and a ball
(centroid c, radius r: <q, k> <= <q, c> + |q| r). On isotropic keys in 32 dims the ball is the tighter
(measured: the box 12.7, the ball 7.5 score spreads above the mean, the true block maximum 2.8); the box
wins on keys spread along few axes. Both can be widened when events are added (`extend`), so the stream
worker folds events in without reading the block back.

The position part of DARE's score depends on the event's recency (position id p = n - a, 1 = most recent),
which changes with every append: it is not stored but bounded at request time by the maximum of
`s_pos[p] = <q_pos, P[p]>` over the block's current recency range (`PositionBound`: a sliding-window
maximum over the static position table; every target has position id 0, so q_pos, and the bound, are
shared by all candidates).

The search (`pruned_topk`; service.block_index runs the same steps around its Redis reads): the seed (the
newest events: one block here by default, `state.index_seed` in the service) is searched exactly, which gives
each candidate a k-th score; every older block whose bound reaches some candidate's k-th score is read; one
exact top-k (`retrieval.topk`, the whole-sequence path's search) runs over the seed and those blocks, in column
order, so its ties to the lower position are ties to the lower column (with no block read, the seed's top-k is
the answer). Exactness: a skipped block's bound plus a rounding margin is strictly below a k-th score
of real events, so every event in it scores strictly below the final k-th score and can neither enter the
top k nor tie with it. The margin (1e-4 of sum_j |q_j| max|k_j|) covers the fp32 rounding of the search's
dot products and of the bound (~d * 2^-24 of that sum each, ~40x less). The result equals the whole-window
search's indices; its scores equal it to fp32 rounding (a kernel may sum the d products in another order
for another shape).

Column j of the reference (0 = most recent) is the event of abs index n - 1 - j.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch


# Relative to sum_j |q_j| max|k_j|: fp32 dot products of <= 64 terms round by at most ~64 * 6e-8 = 4e-6.
MARGIN = 1e-4


def _round_up(x: np.ndarray) -> np.ndarray:
    """float64 -> the float32 at or above it (a stored radius must not shrink)."""
    f = x.astype(np.float32)
    return np.where(f.astype(np.float64) < x, np.nextafter(f, np.float32(np.inf)), f)


def summaries_many(keys: np.ndarray | torch.Tensor, firsts: Sequence[int], counts: Sequence[int], block: int,
                   lasts: Sequence[np.ndarray | None] | None = None) -> list[tuple[int, np.ndarray]]:
    """Block summaries of many users' events at once (the stream worker's batch: one pass, not one per user).

    keys [N, D]: semantic keys of every user's events, user after user, oldest first; user u has counts[u]
    events with abs indices firsts[u].. -> per user (first block id, entries [nb, 3D + 1] float32: min [D],
    max [D], centroid [D], radius of each block's events). With lasts[u] (the entry of block
    (firsts[u] - 1) // B, when firsts[u] is inside that block) the first entry also covers the block's earlier
    events, without reading them: the box widens; the centroid moves to the running mean c' and the radius
    becomes max(r + |c - c'|, the new events' distances to c') (triangle inequality)."""
    k = torch.as_tensor(keys, dtype=torch.float32)
    D = k.shape[1]
    firsts, counts = np.asarray(firsts, np.int64), np.asarray(counts, np.int64)
    U, N = len(counts), int(counts.sum())
    b0 = firsts // block
    nseg = np.where(counts > 0, (firsts + counts - 1) // block - b0 + 1, 0)
    seg_off = np.cumsum(nseg) - nseg
    S = int(nseg.sum())
    user = np.repeat(np.arange(U), counts)
    start = np.cumsum(counts) - counts
    seg = seg_off[user] + (firsts[user] + np.arange(N) - start[user]) // block - b0[user]
    st = torch.from_numpy(seg)
    idx = st[:, None].expand(-1, D)
    lo = torch.full((S, D), float("inf")).scatter_reduce_(0, idx, k, "amin")
    hi = torch.full((S, D), float("-inf")).scatter_reduce_(0, idx, k, "amax")
    cnt = torch.from_numpy(np.bincount(seg, minlength=S).astype(np.float64))
    sums = torch.zeros(S, D, dtype=torch.float64).index_add_(0, st, k.double())
    merge = [u for u in range(U) if lasts is not None and lasts[u] is not None and counts[u] and firsts[u] % block]
    if merge:
        m = torch.from_numpy(seg_off[merge])
        old = torch.from_numpy(np.stack([lasts[u] for u in merge]).astype(np.float32))
        m_old = torch.from_numpy((firsts[merge] % block).astype(np.float64))
        lo[m] = torch.minimum(lo[m], old[:, :D])
        hi[m] = torch.maximum(hi[m], old[:, D:2 * D])
        sums[m] += old[:, 2 * D:3 * D].double() * m_old[:, None]
        cnt[m] += m_old
    c = (sums / cnt.clamp(min=1)[:, None]).float()
    dist = (k.double() - c.double()[st]).norm(dim=1)
    r = torch.zeros(S, dtype=torch.float64).scatter_reduce_(0, st, dist, "amax")
    if merge:
        moved = (c[m].double() - old[:, 2 * D:3 * D].double()).norm(dim=1)
        r[m] = torch.maximum(r[m], old[:, 3 * D].double() + moved)
    out = np.empty((S, 3 * D + 1), np.float32)
    out[:, :D], out[:, D:2 * D], out[:, 2 * D:3 * D] = lo.numpy(), hi.numpy(), c.numpy()
    out[:, 3 * D] = _round_up(r.numpy() * (1 + 1e-12))
    return [(int(b0[u]), out[seg_off[u]:seg_off[u] + nseg[u]]) for u in range(U)]


def summaries(keys: np.ndarray | torch.Tensor, first_abs: int, block: int) -> tuple[int, np.ndarray]:
    """One user's events with abs indices first_abs.. -> (first block id, entries): `summaries_many`."""
    return summaries_many(keys, [first_abs], [len(keys)], block)[0]


def extend(last: np.ndarray | None, n: int, keys: np.ndarray | torch.Tensor, block: int) -> tuple[int, np.ndarray]:
    """Append events with abs indices n.. to an index whose last entry `last` is block (n-1)//B (None when n
    is a block boundary or the index is empty) -> (first block id written, entries that replace the index
    from that block on): `summaries_many`."""
    return summaries_many(keys, [n], [len(keys)], block, [last])[0]


class PositionBound:
    """Per model: the position part of the score of every position id (recency), and its maximum over any
    range of at most `block` ids (sliding window), in float64. q_pos is the target's position row (id 0),
    scaled; `rows` [max_len + 1] maps each recency to its table row where rows are shared (log-distance
    buckets, recsys.models.dare.position_rows), else recency r reads row r."""

    def __init__(self, q_pos_scaled: torch.Tensor, pos_table: torch.Tensor, block: int, rows: torch.Tensor | None = None):
        s = (pos_table.double() @ q_pos_scaled.double()).numpy()              # per table row
        if rows is not None:
            s = s[rows.numpy()]                                               # per recency 0..max_len
        self.max_pos = len(s) - 1
        w = np.concatenate([s, np.full(block, -np.inf)])
        width = 1
        while width < block:                                                  # doubling: max over [p, p + 2 width)
            step = min(width, block - width)
            w = np.maximum(w, np.concatenate([w[step:], np.full(step, -np.inf)]))
            width += step
        self.window_max = w[: len(s)]
        self.block = block
        self.abs_sum = float(pos_table.abs().amax(0).double() @ q_pos_scaled.abs().double())

    def over(self, first_pos: np.ndarray) -> np.ndarray:
        """Ranges [first_pos, first_pos + block) (clipped at the table's end) -> max s_pos over each."""
        return self.window_max[np.minimum(first_pos, self.max_pos)]


@dataclass
class BlockPlan:
    """One candidate set against one history window: which blocks to read and in which order."""

    n: int                    # abs index one past the newest event
    start: int                # abs index of the oldest event in the search window
    block_ids: np.ndarray     # [nb] blocks overlapping the window, oldest first
    upper: torch.Tensor       # [nb, C] fp32 bound of any event's score in each block, before the margin
    margin: torch.Tensor      # [C] float64: rounding margin to add to upper


def window_blocks(n: int, window: int, block: int) -> np.ndarray:
    """Ids of the blocks overlapping the newest `window` of n events, oldest first."""
    if window <= 0:
        return np.zeros(0, np.int64)
    return np.arange((n - window) // block, (n - 1) // block + 1)


def block_position_bounds(ids: np.ndarray, n: int, block: int, pos: PositionBound, end: int | None = None) -> np.ndarray:
    """Max position term over each block's current recency range (its newest event has the smallest id), taken
    over its events before abs index `end` (default n): from `end` on they are the seed's, searched already.
    Bounded by its newest event, the block the seed starts in reached every k-th seed score where the position
    term prefers recent events, so each such request read it and searched again."""
    end = n if end is None else end
    return pos.over(n - (np.minimum((ids + 1) * block, end) - 1))


def prefilter(q_scaled: torch.Tensor, d_sem: int, cap: np.ndarray, n: int, window: int, block: int,
              pos: PositionBound, kth: torch.Tensor, end: int | None = None) -> np.ndarray:
    """Before reading any block summary: the blocks of the window that can hold a top-k event by the
    position bound alone, with one summary `cap` [3D + 1] that bounds every key the user can have (the
    model's: every item row with every category row, `BlockIndexer.cap`). -> bool [nb] over
    window_blocks(n, window, block). With a position term that prefers recent events this leaves the newest
    blocks, so a request reads those blocks' summaries only, not all of them. `end`: as block_position_bounds;
    a block with no event before it (wholly in the seed, searched already) is not kept."""
    ids = window_blocks(n, window, block)
    q = q_scaled[:, :d_sem].double()
    e = torch.from_numpy(cap.astype(np.float64))
    D = d_sem
    box = q.clamp(max=0) @ e[:D] + q.clamp(min=0) @ e[D:2 * D]
    ball = q @ e[2 * D:3 * D] + q.norm(dim=1) * e[3 * D]
    p = block_position_bounds(ids, n, block, pos, end)
    kabs = float(e[:2 * D].abs().max())
    margin = MARGIN * (q.abs().sum(1) * kabs + pos.abs_sum + (float(np.abs(p).max()) if len(p) else 0.0)) + 1e-30
    tau = float((kth - margin - torch.minimum(box, ball)).min())
    return (p >= tau) & (ids * block < (n if end is None else end))


def plan_blocks(q_scaled: torch.Tensor, d_sem: int, ids: np.ndarray, entries: np.ndarray, n: int, window: int,
                block: int, pos: PositionBound, end: int | None = None) -> BlockPlan:
    """q_scaled [C, D] (segment scale applied, fp32: the reference's query), the summaries `entries` [m, 3D + 1]
    of blocks `ids` (ascending, inside the window = the newest `window` of n events) -> their bounds over their
    events before abs index `end` (default n; block_position_bounds).

    Two fp32 matmuls with the block's position bound folded in (at 1M events, C = 200: 3,907 blocks, where
    separate [C, nb] additions in float64 cost more than the products). Their rounding
    (<= ~1e-5 of sum_j |q_j| max|k_j|, the ball's |q| r and the position term included) is inside MARGIN."""
    start = n - window
    C = q_scaled.shape[0]
    if not len(ids):
        return BlockPlan(n, start, ids, q_scaled.new_zeros(0, C), torch.zeros(C, dtype=torch.float64))
    if len(entries) != len(ids):
        raise ValueError(f"{len(entries)} block summaries for {len(ids)} blocks")
    e = torch.from_numpy(np.asarray(entries, dtype=np.float32).copy())                       # [nb, 3D + 1]
    D = d_sem
    q = q_scaled[:, :d_sem]
    p = torch.from_numpy(block_position_bounds(ids, n, block, pos, end).astype(np.float32))[:, None]    # [nb, 1]
    # entries are [lo, hi, c, r]: the box is [q-, q+] . [lo, hi], the ball [q, |q|] . [c, r]; p rides along
    # as addmm's broadcast input; [nb, C], so "does some candidate need block b" reduces along contiguous memory
    box = torch.addmm(p, e[:, :2 * D], torch.cat([q.clamp(max=0), q.clamp(min=0)], 1).T)
    ball = torch.addmm(p, e[:, 2 * D:], torch.cat([q, q.norm(dim=1, keepdim=True)], 1).T)
    kabs = float(e[:, :2 * D].abs().amax())
    margin = MARGIN * (q.abs().sum(1, dtype=torch.float64) * kabs + pos.abs_sum + float(p.abs().max())) + 1e-30
    return BlockPlan(n, start, ids, torch.minimum(box, ball), margin)


def id_ranges(ids: np.ndarray) -> list[tuple[int, int]]:
    """Ascending block ids -> runs [first, last + 1) (one read each)."""
    if not len(ids):
        return []
    cut = np.flatnonzero(np.diff(ids) != 1) + 1
    return [(int(r[0]), int(r[-1]) + 1) for r in np.split(ids, cut)]


def kth_scores(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k scores [C, k'] (best first, -inf holes) -> [C] float64: the k-th best so far, -inf while
    fewer than k events were scored (every block is then needed)."""
    if scores.shape[1] < k:
        return torch.full((scores.shape[0],), float("-inf"), dtype=torch.float64)
    return scores[:, k - 1].double()


def needed(plan: BlockPlan, kth: torch.Tensor, done: np.ndarray) -> np.ndarray:
    """Blocks not yet scored whose bound reaches some candidate's k-th score. -> bool [nb]."""
    # upper + margin >= kth  <=  upper >= (kth - margin) rounded down to fp32
    t = (kth - plan.margin).float()
    t = torch.where(t.double() > kth - plan.margin, torch.nextafter(t, torch.tensor(float("-inf"))), t)
    return (plan.upper >= t[None, :]).any(1).numpy() & ~done


def block_ranges(plan: BlockPlan, need: np.ndarray, block: int, below: int) -> list[tuple[int, int]]:
    """The needed blocks as abs index ranges [lo, hi), clipped to the window and to abs indices < `below`
    (the seed's oldest: already scored), adjacent blocks merged (one read each)."""
    ranges: list[tuple[int, int]] = []
    for b in plan.block_ids[need]:
        lo, hi = max(int(b) * block, plan.start), min((int(b) + 1) * block, below)
        if hi <= lo:
            continue
        if ranges and ranges[-1][1] == lo:
            ranges[-1] = (ranges[-1][0], hi)
        else:
            ranges.append((lo, hi))
    return ranges


def window_cols(n: int, lo_abs: int, hi_abs: int) -> np.ndarray:
    """Reference columns of abs indices lo_abs.. hi_abs - 1 (in that order: newest last)."""
    return np.arange(n - 1 - lo_abs, n - 1 - hi_abs, -1, dtype=np.int64)


def topk_over(query: torch.Tensor, keys: torch.Tensor, cols: np.ndarray, k: int, segments: Sequence[int],
              search=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact top-k over a subset of the history: keys [m, D] of the events at reference columns cols [m]
    (ascending: the subset in reference order, so the search's ties to the lower position are ties to the
    lower column) -> (scores [C, k], columns [C, k], -1 holes). `search` is `retrieval.topk` (the serving
    path's kernels) unless given: the same search the whole-sequence path runs, on fewer events."""
    if search is None:
        from retrieval import topk as search
    s, i = search(query, keys, keys.shape[0], k, segments)
    if not len(cols):
        return s, i
    c = torch.from_numpy(cols)[i.clamp(min=0)]
    return s, c.masked_fill(i < 0, -1)


def pruned_topk(query: torch.Tensor, keys: torch.Tensor, k: int, segments: Sequence[int], block: int,
                pos: PositionBound, d_sem: int, seed: int | None = None, search=None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """In memory (tests, offline evaluation): query [C, D] against keys [L, D] in reference order (row j =
    the (j+1)-th most recent event, its position row being P[j + 1]); the index is built here over abs
    indices 0.. L-1; the steps are the service's (service.block_index). -> (scores [C, k], indices [C, k],
    blocks read past the seed), equal to topk_reference."""
    from kernels.topk_attention.reference import segment_scale

    L = keys.shape[0]
    q = query.float() * segment_scale(query.shape[1], segments)
    chrono = keys.flip(0)                                                     # abs index order
    ix0, entries = summaries(chrono[:, :d_sem], 0, block)
    n_seed = min(block if seed is None else seed, L)
    seed_cols = np.arange(n_seed, dtype=np.int64)
    s_seed, _ = topk_over(query, keys[:n_seed], seed_cols, k, segments, search)
    kth = kth_scores(s_seed, k)
    ids = window_blocks(L, L, block)
    cap = summaries(chrono[:, :d_sem], 0, max(L, 1))[1]                   # every key of the history in one
    if len(ids):
        ids = ids[prefilter(q, d_sem, cap[0], L, L, block, pos, kth, L - n_seed)]
    plan = plan_blocks(q, d_sem, ids, entries[ids - ix0], L, L, block, pos, L - n_seed)
    need = needed(plan, kth, np.zeros(len(ids), bool))
    ranges = block_ranges(plan, need, block, L - n_seed)
    cols = np.concatenate([seed_cols] + [window_cols(L, lo, hi)[::-1] for lo, hi in reversed(ranges)])
    s, i = topk_over(query, keys[torch.from_numpy(cols)], cols, k, segments, search)
    return s, i, int(need.sum())
