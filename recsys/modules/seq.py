"""Sequence layout helpers shared by the streaming modules."""

from __future__ import annotations

import torch


def chronological(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Most-recent-first padded [B, L, ...] (HistoryBatch layout, column 0 = latest) -> oldest-first,
    left-aligned, padded at the end with zeros: out[b, j] = x[b, lengths[b] - 1 - j] for j < lengths[b]."""
    B, L = x.shape[:2]
    if lengths.shape != (B,):
        raise ValueError(f"lengths must be [B]={B}, got {tuple(lengths.shape)}")
    if bool((lengths < 0).any()) or bool((lengths > L).any()):
        raise ValueError(f"lengths must lie in [0, {L}], got min {int(lengths.min())} max {int(lengths.max())}")
    j = torch.arange(L, device=x.device)
    valid = j[None, :] < lengths[:, None]                                   # [B, L]
    src = (lengths[:, None] - 1 - j[None, :]).clamp(min=0)                  # [B, L]
    idx = src.reshape(B, L, *([1] * (x.dim() - 2))).expand_as(x)
    return torch.gather(x, 1, idx).masked_fill(~valid.reshape(B, L, *([1] * (x.dim() - 2))), 0)


def valid_mask(lengths: torch.Tensor, L: int) -> torch.Tensor:
    """[B] lengths -> [B, L] bool, True for the first lengths[b] (real) positions."""
    return torch.arange(L, device=lengths.device)[None, :] < lengths[:, None]
