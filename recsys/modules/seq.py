"""Sequence layout helpers shared by the streaming modules."""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass
class TimelineBlocks:
    """The full blocks of `block` events of every user of a CSR timeline (user u's events at
    offsets[u]:offsets[u+1]), laid out for one loop over block index with all users at once; and where
    each row (a user and a prefix length) finds its boundary and its partial block.

    Users are ranked by full-block count, most first, so the users with a block c are a prefix of that
    order (`active[c]` of them), and the boundary after c blocks stacks `active[c - 1]` users (boundary 0:
    all U). Pairs are block-major, so block c is one contiguous slice of a gather by `src`."""

    active: list[int]        # [n] users with more than c full blocks
    src: torch.Tensor        # [P, block] event index of every (block, user) pair, block-major
    rank: torch.Tensor       # [U] a user's row within a boundary
    at: torch.Tensor         # [n + 2] where boundary c starts in the boundaries stacked in order

    @staticmethod
    def of(offsets: torch.Tensor, block: int) -> "TimelineBlocks":
        dev = offsets.device
        full = torch.div(offsets[1:] - offsets[:-1], block, rounding_mode="floor")   # [U] full blocks
        order = torch.argsort(full, descending=True, stable=True)
        n = int(full.max()) if len(full) else 0
        active = [int((full > c).sum()) for c in range(n)]
        c = torch.repeat_interleave(torch.arange(n, device=dev), torch.tensor(active, dtype=torch.int64, device=dev))
        users = order[torch.cat([torch.arange(a, device=dev) for a in active])] if n else c
        src = (offsets[users] + c * block)[:, None] + torch.arange(block, device=dev)[None, :]
        at = torch.zeros(n + 2, dtype=torch.int64, device=dev)
        at[1:] = torch.cumsum(torch.tensor([len(full)] + active, dtype=torch.int64, device=dev), 0)
        return TimelineBlocks(active, src, torch.argsort(order), at)

    def rows(self, offsets: torch.Tensor, row_user: torch.Tensor, row_prefix: torch.Tensor, block: int):
        """Rows reading after their first row_prefix[b] events -> (index of each row's boundary in the
        stacked boundaries [B], event index of its partial block [B, block] (clamped into range), which of
        those are real [B, block])."""
        if bool((row_prefix > (offsets[1:] - offsets[:-1])[row_user]).any()):
            raise ValueError("row_prefix exceeds its user's timeline length")
        c = torch.div(row_prefix, block, rounding_mode="floor")
        j = torch.arange(block, device=offsets.device)
        real = j[None, :] < (row_prefix - c * block)[:, None]
        src = ((offsets[row_user] + c * block)[:, None] + j[None, :]).clamp(max=max(int(offsets[-1]) - 1, 0))
        return self.at[c] + self.rank[row_user], src, real
