"""Backend choice for top-k search. For now: the plain torch path everywhere."""

from __future__ import annotations

from typing import Sequence

import torch

from kernels.topk_attention.reference import topk_reference


def topk(
    query: torch.Tensor,
    keys: torch.Tensor,
    lengths: torch.Tensor | int,
    k: int,
    segments: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """See kernels/topk_attention/reference.py for the layouts and semantics."""
    return topk_reference(query, keys, lengths, k, segments)
