"""Backend choice for top-k search: the Triton kernel for CUDA tensors; on CPU the measured winner per layout.

CPU, from benchmarks/topk_search.py (figures in docs/kernels.md):
- one shared history and at least FUSED_MIN_ROWS queries (serving): `kernels/topk_attention/cpu.c`
  (`topk_fused`), 2.8x to 6x faster than the best exact torch path at C = 200;
- one shared history and fewer queries: the fused kernel while the history is small (L * d <=
  FUSED_MAX_FEW: its transpose of the whole history is cheap; at C = 1 it beats every exact torch path at
  L = 1k and at L = 10k, d = 16), else `retrieval.cpu.topk_blocked` (one matmul, block pruning: the
  fastest exact torch path at L = 100k, and within 1.4x of the best at L = 10k, d = 64);
- one history per query (training): `retrieval.cpu.topk_chunked` (the fused kernel transposes each
  row's history for one query: 1.7x slower at d = 32, L = 2,698; at d = 16 the two are within 10%);
- `retrieval.serving.topk_shared` for a shared history wherever the kernel cannot be built.
"""

from __future__ import annotations

from typing import Sequence

import torch

from kernels.topk_attention import cpu as fused
from retrieval.cpu import topk_blocked, topk_chunked
from retrieval.serving import topk_shared

FUSED_MIN_ROWS = 8
FUSED_MAX_FEW = 2**18   # L * d up to which the fused kernel also serves fewer than FUSED_MIN_ROWS queries


@torch.no_grad()
def topk(
    query: torch.Tensor,
    keys: torch.Tensor,
    lengths: torch.Tensor | int,
    k: int,
    segments: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k history events per query by split-scaled dot product.

    Training layout: query [B, d], keys [B, L, d], lengths [B] -> scores, indices [B, k].
    Serving layout:  query [C, d], keys [L, d],    lengths int -> scores, indices [C, k].
    Semantics of kernels/topk_attention/reference.py: events at index >= length are masked, ties go to
    the lower index, slots beyond min(k, length) hold index -1 and score -inf; scores are fp32. The
    indices are the reference's; the scores equal it bit for bit on the torch paths and to fp32 rounding
    on the fused kernels (they sum the d products in their own order).

    For picking indices only: the returned scores carry no gradient. Callers that train through the
    kept scores recompute them from the gathered keys.
    """
    if query.is_cuda:
        # Imported here so CPU-only processes never load triton.
        from kernels.topk_attention.triton import topk_triton

        return topk_triton(query, keys, lengths, k, segments)
    shared = keys.dim() == 2 and query.dim() == 2 and torch.as_tensor(lengths).numel() == 1
    if not shared:
        return topk_chunked(query, keys, lengths, k, segments)
    many = query.shape[0] >= FUSED_MIN_ROWS
    if fused.available() and (many or keys.shape[0] * keys.shape[1] <= FUSED_MAX_FEW):
        return fused.topk_fused(query, keys, lengths, k, segments)
    if fused.available():
        return topk_blocked(query, keys, int(torch.as_tensor(lengths)), k, segments)
    return topk_shared(query, keys[: max(0, min(int(lengths), keys.shape[0]))], k, segments)
