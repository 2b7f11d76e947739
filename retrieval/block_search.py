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

Exactness (the result equals `topk_reference` on the whole window: same indices, same scores, ties to the
lower index): a block is skipped only when its bound plus a rounding margin is strictly below the
candidate's k-th best *exact* score among events already scored. Every event in it then scores strictly
below the final k-th score, so it can neither enter the top k nor tie with it. The margin covers the fp32
rounding of the reference's dot product and of the bound itself (both ~d * 2^-24 relative to sum |q_j k_j|;
the margin is 1e-4 of that sum, ~40x more).

Column j of the reference (0 = most recent) is the event of abs index n - 1 - j.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from kernels.topk_attention.reference import EMPTY_KEY, pack_keys, segment_scale, unpack_keys

# Relative to sum_j |q_j| max|k_j|: fp32 dot products of <= 64 terms round by at most ~64 * 6e-8 = 4e-6.
MARGIN = 1e-4


def _round_up(x: np.ndarray) -> np.ndarray:
    """float64 -> the float32 at or above it (a stored radius must not shrink)."""
    f = x.astype(np.float32)
    return np.where(f.astype(np.float64) < x, np.nextafter(f, np.float32(np.inf)), f)


def summaries(keys: np.ndarray | torch.Tensor, first_abs: int, block: int) -> tuple[int, np.ndarray]:
    """Semantic keys [n, D] of events with abs indices first_abs.. (oldest first) -> (first block id,
    entries [nb, 3D + 1] float32 of each block's events present: min [D], max [D], centroid [D], radius)."""
    k = torch.as_tensor(keys, dtype=torch.float32)
    n, D = k.shape
    b0 = first_abs // block
    if n == 0:
        return b0, np.zeros((0, 3 * D + 1), np.float32)
    pad_front = first_abs - b0 * block
    nb = -(-(pad_front + n) // block)
    block_of = torch.arange(pad_front, pad_front + n) // block                # [n]
    lo = torch.full((nb * block, D), float("inf"))
    hi = torch.full((nb * block, D), float("-inf"))
    lo[pad_front:pad_front + n] = k
    hi[pad_front:pad_front + n] = k
    count = torch.bincount(block_of, minlength=nb).double()
    c = torch.zeros(nb, D, dtype=torch.float64).index_add_(0, block_of, k.double()) / count[:, None]
    c = c.float()
    dist = (k.double() - c.double()[block_of]).norm(dim=1)
    r = torch.zeros(nb, dtype=torch.float64).scatter_reduce_(0, block_of, dist, "amax")
    out = np.empty((nb, 3 * D + 1), np.float32)
    out[:, :D] = lo.view(nb, block, D).amin(1).numpy()
    out[:, D:2 * D] = hi.view(nb, block, D).amax(1).numpy()
    out[:, 2 * D:3 * D] = c.numpy()
    out[:, 3 * D] = _round_up(r.numpy() * (1 + 1e-12))
    return b0, out


def extend(last: np.ndarray | None, n: int, keys: np.ndarray | torch.Tensor, block: int) -> tuple[int, np.ndarray]:
    """Append events with abs indices n.. to an index whose last entry `last` [3D + 1] is block (n-1)//B
    (None when n == 0 or n is a block boundary) -> (first block id written, entries [m, 3D + 1]) that
    replace the index from that block on. The open block keeps a valid summary of all its events without
    reading them back: the box widens; the centroid moves to the running mean c' and the radius becomes
    max(r + |c - c'|, the new events' distances to c') (triangle inequality)."""
    b0, new = summaries(keys, n, block)
    if last is None or n % block == 0 or not len(new):
        return b0, new
    D = (len(last) - 1) // 3
    k = torch.as_tensor(keys, dtype=torch.float32)
    m_new = min(len(k), block - n % block)                                    # new events in the open block
    m_old = n % block
    head = k[:m_new].double()
    c_old = torch.from_numpy(last[2 * D:3 * D].astype(np.float64))
    c = ((c_old * m_old + head.sum(0)) / (m_old + m_new)).float()
    moved = float((c.double() - c_old).norm())
    r = max(float(last[3 * D]) + moved, float((head - c.double()).norm(dim=1).max()))
    e = new[0].copy()
    e[:D] = np.minimum(e[:D], last[:D])
    e[D:2 * D] = np.maximum(e[D:2 * D], last[D:2 * D])
    e[2 * D:3 * D] = c.numpy()
    e[3 * D] = _round_up(np.array([r * (1 + 1e-12)]))[0]
    new = new.copy()
    new[0] = e
    return b0, new


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
    upper: torch.Tensor       # [C, nb] bound (margin included) of any event's score in each block


def plan_blocks(q_scaled: torch.Tensor, d_sem: int, ix0: int, entries: np.ndarray, n: int, window: int,
                block: int, pos: PositionBound) -> BlockPlan:
    """q_scaled [C, D] (segment scale applied, fp32: the reference's query), the user's index (entry i =
    block ix0 + i), the window = the newest `window` of n events -> the bound of every block in the window."""
    start = n - window
    b_first, b_last = start // block, (n - 1) // block
    ids = np.arange(b_first, b_last + 1)
    if window <= 0:
        return BlockPlan(n, start, ids[:0], q_scaled.new_zeros(q_scaled.shape[0], 0))
    if b_first < ix0 or b_last - ix0 >= len(entries):
        raise ValueError(f"index covers blocks {ix0}..{ix0 + len(entries) - 1}, window needs {b_first}..{b_last}")
    e = torch.from_numpy(np.array(entries[b_first - ix0: b_last - ix0 + 1]))                  # [nb, 3D + 1]
    D = d_sem
    q = q_scaled[:, :d_sem]
    box = (q.clamp(min=0).double() @ e[:, D:2 * D].double().T + q.clamp(max=0).double() @ e[:, :D].double().T)
    ball = q.double() @ e[:, 2 * D:3 * D].double().T + q.double().norm(dim=1)[:, None] * e[:, 3 * D].double()[None, :]
    sem = torch.minimum(box, ball)                                                            # [C, nb]
    newest_abs = np.minimum((ids + 1) * block, n) - 1                                        # per block
    p = pos.over(n - newest_abs)                                                              # [nb]
    kabs = float(e[:, :2 * D].abs().amax()) if len(e) else 0.0
    margin = MARGIN * (q.abs().sum(1, dtype=torch.float64) * kabs + pos.abs_sum) + 1e-30     # [C]
    upper = sem + torch.from_numpy(p)[None, :] + margin[:, None]
    return BlockPlan(n, start, ids, upper)


class RunningTopK:
    """Per candidate the k best (score desc, index asc) of the events scored so far, as packed keys."""

    def __init__(self, C: int, k: int):
        self.k = k
        self.keys = torch.full((C, k), EMPTY_KEY, dtype=torch.int64)

    def add(self, scores: torch.Tensor, cols: torch.Tensor) -> None:
        """scores [C, m] fp32 of history columns cols [m] (reference numbering: 0 = most recent)."""
        packed = pack_keys(scores, cols[None, :].expand_as(scores))
        both = torch.cat([self.keys, packed], 1)
        self.keys = torch.topk(both, self.k, dim=1).values

    def kth(self) -> torch.Tensor:
        """[C] float64: the k-th best score so far (-inf while fewer than k)."""
        s, _ = unpack_keys(self.keys[:, -1])
        return s.double()

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        return unpack_keys(self.keys)


def scores(q_scaled: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The reference's score (`scaled_scores`: the fp32 query with the scale applied, dot the keys) accumulated
    in float64 and rounded once to fp32. An fp32 matmul rounds differently per shape (a few ulp between
    the reference's one [C, L] product and the blocks scored here), which reorders exact ties (equal keys);
    products of fp32 numbers are exact in float64, so the rounded sum is the same for equal keys in any
    block and within the reference's own rounding of the true score."""
    return (q_scaled.double() @ keys.double().transpose(-1, -2)).float()


def needed(plan: BlockPlan, kth: torch.Tensor, done: np.ndarray) -> np.ndarray:
    """Blocks not yet scored whose bound reaches some candidate's current k-th score. -> bool [nb]."""
    return ((plan.upper >= kth[:, None]).any(0).numpy()) & ~done


def search_blocks(q_scaled: torch.Tensor, plan: BlockPlan, running: RunningTopK, done: np.ndarray,
                  keys_of: Callable[[Sequence[int]], tuple[torch.Tensor, torch.Tensor]], group: int = 16) -> int:
    """Score the blocks still needed, highest bound over the current thresholds first, `group` blocks at a
    time, re-checking the thresholds before each group. keys_of(block positions in the plan) -> (keys [m, D],
    columns [m]). -> blocks scored."""
    scored = 0
    while True:
        need = needed(plan, running.kth(), done)
        if not need.any():
            return scored
        slack = (plan.upper - running.kth()[:, None]).amax(0).numpy()
        order = np.flatnonzero(need)
        order = order[np.argsort(-slack[order], kind="stable")][:group]
        keys, cols = keys_of(order)
        if len(cols):
            running.add(scores(q_scaled, keys), cols)
        done[order] = True
        scored += len(order)


def window_cols(n: int, lo_abs: int, hi_abs: int) -> torch.Tensor:
    """Reference columns of abs indices lo_abs.. hi_abs - 1 (in that order)."""
    return torch.arange(n - 1 - lo_abs, n - 1 - hi_abs, -1)


def pruned_topk(query: torch.Tensor, keys: torch.Tensor, k: int, segments: Sequence[int], block: int,
                pos: PositionBound, d_sem: int, seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """In memory (tests, offline evaluation): query [C, D] against keys [L, D] in reference order (row j =
    the (j+1)-th most recent event, its position row being P[j + 1]); the index is built here over abs
    indices 0.. L-1. -> (scores [C, k], indices [C, k], blocks scored), equal to topk_reference."""
    L = keys.shape[0]
    q = query.float() * segment_scale(query.shape[1], segments)
    chrono = keys.flip(0)                                                     # abs index order
    ix0, entries = summaries(chrono[:, :d_sem], 0, block)
    running = RunningTopK(query.shape[0], k)
    seed = block if seed is None else seed
    n_seed = min(seed, L)
    if n_seed:
        running.add(scores(q, keys[:n_seed]), torch.arange(n_seed))
    plan = plan_blocks(q, d_sem, ix0, entries, L, L, block, pos)
    done = np.zeros(len(plan.block_ids), bool)
    # blocks wholly inside the seed are done; a block partly in it is scored again only for its other events
    seed_abs = L - n_seed
    done |= plan.block_ids * block >= seed_abs

    def keys_of(order):
        ks, cs = [], []
        for i in order:
            b = int(plan.block_ids[i])
            lo, hi = b * block, min((b + 1) * block, seed_abs)
            if hi > lo:
                ks.append(chrono[lo:hi])
                cs.append(window_cols(L, lo, hi))
        if not ks:
            return keys.new_zeros(0, keys.shape[1]), torch.zeros(0, dtype=torch.int64)
        return torch.cat(ks), torch.cat(cs)

    n = search_blocks(q, plan, running, done, keys_of)
    s, i = running.result()
    return s, i, n
