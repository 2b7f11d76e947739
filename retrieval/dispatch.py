"""Backend choice for top-k search: the Triton kernel for CUDA tensors, the fastest exact torch path on CPU."""

from __future__ import annotations

from typing import Sequence

import torch

from retrieval.cpu import topk_chunked


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
    the lower index, slots beyond min(k, length) hold index -1 and score -inf; scores are fp32.

    For picking indices only: the returned scores carry no gradient. Callers that train through the
    kept scores recompute them from the gathered keys.
    """
    if query.is_cuda:
        # Imported here so CPU-only processes never load triton.
        from kernels.topk_attention.triton import topk_triton

        return topk_triton(query, keys, lengths, k, segments)
    # CPU winner in benchmarks/topk_search.py (figures in docs/kernels.md).
    return topk_chunked(query, keys, lengths, k, segments)
