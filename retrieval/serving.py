"""Top-k search for the serving layout on CPU in torch: C candidates against ONE shared history, exact.

`retrieval.topk` runs the fused C kernel (kernels/topk_attention/cpu.c) where it builds; this is the torch
path for the serving layout where it does not (no C compiler), and the bit-exact one (the kernel's scores
equal the reference's to fp32 rounding, these equal them bit for bit).

`topk_shared(query [C, d], keys [L, d], k, segments)` returns what `topk_reference` returns for the same
inputs (same fp32 scores, same tie order: score desc, index asc), faster than `retrieval.cpu`'s paths at
serving sizes (C = 200, L = 10k: ~3.5 ms vs ~10 ms on one thread), because the selection touches far
fewer entries:

- one score matmul for all C rows, the reference's own op (fp32 query x segment scale, then @ keys^T),
  so the scores are bit-identical to it;
- block maxima over *strided* blocks: block b holds the columns {b, b + nb, b + 2 nb, ...} (and one of
  the last L mod G columns), so the maxima are an elementwise max of G contiguous row slices
  (vectorised), where contiguous blocks need a reduction over short runs (10x slower). Any partition
  of the columns works for the pruning argument;
- the k best blocks by their maximum hold the top k entries unless an entry outside them ties the k-th
  kept score: their k maxima are k distinct entries at least as large as any entry elsewhere. Only the
  k x G entries of those blocks are packed (`pack_keys`: ties -> lower index) and ranked;
- the check that makes it exact: the best block left out (the (k+1)-th block maximum) must score
  strictly below the k-th kept entry. A row where it does not (an exact tie across the cut, or NaN) is
  recomputed by `retrieval.cpu.topk_chunked`.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from kernels.topk_attention.reference import EMPTY_KEY, pack_keys, segment_scale, unpack_keys
from retrieval.cpu import topk_chunked

# Columns scored at once: the score block stays a heap allocation that malloc reuses (C = 200: 13 MB);
# one [C, L] block at L = 50k (40 MB) is mmap'd fresh on every call, and its page faults cost more than
# the matmul.
CHUNK = 16_384


@torch.no_grad()
def topk_shared(query: torch.Tensor, keys: torch.Tensor, k: int, segments: Sequence[int] | None = None,
                chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """query [C, d], keys [L, d] (every row a real event) -> scores [C, k] fp32, indices [C, k] (-1 and
    -inf beyond L), exactly as `topk_reference(query, keys, L, k, segments)`."""
    L = keys.shape[0]
    if query.is_cuda:
        from retrieval.dispatch import topk

        return topk(query, keys, L, k, segments)
    n_chunks = max(1, -(-L // chunk))
    width = -(-L // n_chunks)                                                 # equal chunks of <= chunk columns
    if width // max(1, round(math.sqrt(width / k))) <= k:                     # too short to prune (or L = 0): plain path
        return topk_chunked(query, keys, L, k, segments)
    q = query.float() * segment_scale(query.shape[1], segments, query.device)
    parts, unsure = [], torch.zeros(query.shape[0], dtype=torch.bool, device=query.device)
    for l0 in range(0, L, width):
        s = q @ keys[l0 : l0 + width].float().transpose(-1, -2)               # [C, w], the reference's op
        packed, row_unsure = _prune(s, k, l0)
        parts.append(packed)
        unsure |= row_unsure
    packed = torch.cat(parts, 1)
    scores, idx = unpack_keys(torch.topk(packed, k, dim=-1).values if len(parts) > 1 else packed)
    if bool(unsure.any()):
        rows = unsure.nonzero().flatten()
        scores[rows], idx[rows] = topk_chunked(query[rows], keys, L, k, segments)
    return scores, idx


def _prune(s: torch.Tensor, k: int, base: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores [C, w] of history columns base.. base + w (w > k) -> packed top k [C, k] best first, and the
    rows [C] where the pruning cannot vouch for them (an entry outside the kept blocks ties the k-th)."""
    C, w = s.shape
    G = max(1, round(math.sqrt(w / k)))  # entries per block: balances w / G block maxima against k x G candidates
    nb, rem = divmod(w, G)
    # block b: columns b + g nb for g < G, plus column G nb + b (one of the last rem columns) when b < rem
    block_max = s[:, : G * nb].view(C, G, nb).amax(1)                         # [C, nb]
    if rem:
        block_max[:, :rem] = torch.maximum(block_max[:, :rem], s[:, G * nb :])
    best, block = torch.topk(block_max, k + 1, dim=-1)                        # k kept blocks + the best left out
    cols = (torch.arange(G + 1, device=s.device)[None, :, None] * nb + block[:, None, :k]).reshape(C, (G + 1) * k)
    packed = pack_keys(torch.gather(s, 1, cols.clamp(max=w - 1)), cols + base).masked_fill(cols >= w, EMPTY_KEY)
    packed = torch.topk(packed, k, dim=-1).values
    kth, _ = unpack_keys(packed[:, k - 1])
    return packed, ~(best[:, k] < kth)
