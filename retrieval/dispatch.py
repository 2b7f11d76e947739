"""Backend choice for top-k search: the Triton kernel for CUDA tensors; on CPU the measured winner per layout.

CPU, from benchmarks/topk_search.py and the training-layout figures in docs/kernels.md:
- one shared history and at least FUSED_MIN_ROWS queries (serving): `kernels/topk_attention/cpu.c`
  (`topk_fused`), 2.2x to 9x faster than the best torch path at C = 200;
- otherwise the exact torch paths: `retrieval.serving.topk_shared` for a shared history with few queries
  (the fused kernel transposes the whole history for them: at C = 1 it loses at d = 64 or L = 100k), and
  `retrieval.cpu.topk_chunked` for the training layout (one history per query: the fused kernel's
  per-row transpose makes it 2x slower at d = 32, L = 2,698), and wherever the kernel cannot be built.
"""

from __future__ import annotations

from typing import Sequence

import torch

from kernels.topk_attention import cpu as fused
from retrieval.cpu import topk_chunked
from retrieval.serving import topk_shared

FUSED_MIN_ROWS = 8


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
    if shared and query.shape[0] >= FUSED_MIN_ROWS and fused.available():
        return fused.topk_fused(query, keys, lengths, k, segments)
    if shared:
        return topk_shared(query, keys[: max(0, min(int(lengths), keys.shape[0]))], k, segments)
    return topk_chunked(query, keys, lengths, k, segments)
