"""Backend choice for top-k search: the Triton kernel for CUDA tensors, the fused C kernel on CPU.

CPU order of preference, from benchmarks/topk_search.py (figures in docs/kernels.md):
1. `kernels/topk_attention/cpu.c` (`topk_fused`): scores and selects in one pass, both layouts;
2. where it cannot be built (no C compiler): the exact torch paths, `retrieval.serving.topk_shared`
   for one shared history, `retrieval.cpu.topk_chunked` for the training layout.
"""

from __future__ import annotations

from typing import Sequence

import torch

from kernels.topk_attention import cpu as fused
from retrieval.cpu import topk_chunked
from retrieval.serving import topk_shared


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
    indices are the reference's; the scores equal it to fp32 rounding (the fused kernels sum the d
    products in their own order, the same in both layouts).

    For picking indices only: the returned scores carry no gradient. Callers that train through the
    kept scores recompute them from the gathered keys.
    """
    if query.is_cuda:
        # Imported here so CPU-only processes never load triton.
        from kernels.topk_attention.triton import topk_triton

        return topk_triton(query, keys, lengths, k, segments)
    if fused.available():
        return fused.topk_fused(query, keys, lengths, k, segments)
    if keys.dim() == 2 and query.dim() == 2 and torch.as_tensor(lengths).numel() == 1:
        return topk_shared(query, keys[: max(0, min(int(lengths), keys.shape[0]))], k, segments)
    return topk_chunked(query, keys, lengths, k, segments)
