"""Top-k attention search, the obvious way: score every history event, sort, keep k.

Score of query q against key x, both split into segments of dims (d_1, ..., d_S):
    s(q, x) = sum_s <q_s, x_s> / sqrt(d_s)
(DARE: a semantic segment and a position segment, each scaled by its own sqrt(dim)).
Events at index >= length are masked. Ties: the lower index wins. Slots beyond min(k, length)
hold index -1 and score -inf.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


def segment_scale(d: int, segments: Sequence[int] | None, device=None) -> torch.Tensor:
    """Per-dimension factor 1/sqrt(d_s) so that the split-scaled score is one dot product."""
    segs = [d] if segments is None else list(segments)
    if sum(segs) != d or any(s <= 0 for s in segs):
        raise ValueError(f"segments {segs} must be positive and sum to the feature dim {d}")
    return torch.cat([torch.full((s,), 1.0 / math.sqrt(s)) for s in segs]).to(device)


def scaled_scores(query: torch.Tensor, keys: torch.Tensor, segments: Sequence[int] | None = None) -> torch.Tensor:
    """query [..., Q, d] x keys [..., L, d] -> scores [..., Q, L] in fp32."""
    scale = segment_scale(query.shape[-1], segments, query.device)
    q = query.float() * scale
    return q @ keys.float().transpose(-1, -2)


def topk_reference(
    query: torch.Tensor,
    keys: torch.Tensor,
    lengths: torch.Tensor | int,
    k: int,
    segments: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training layout: query [B, d], keys [B, L, d], lengths [B] -> scores, indices [B, k].
    Serving layout:  query [C, d], keys [L, d], lengths int     -> scores, indices [C, k]."""
    serving = keys.dim() == 2
    if serving:
        s = scaled_scores(query, keys, segments)                       # [C, L]
        L = keys.shape[0]
        n = torch.as_tensor(lengths, device=query.device).reshape(1, 1)
    else:
        s = scaled_scores(query.unsqueeze(1), keys, segments).squeeze(1)  # [B, L]
        L = keys.shape[1]
        n = torch.as_tensor(lengths, device=query.device).reshape(-1, 1)
    valid = torch.arange(L, device=query.device)[None, :] < n          # [*, L]
    s = s.masked_fill(~valid, float("-inf"))
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices[:, :k]
    scores = torch.gather(s, -1, order)
    keep = torch.gather(valid.expand_as(s), -1, order)
    pad = k - order.shape[-1]
    if pad > 0:  # k > L
        order = torch.nn.functional.pad(order, (0, pad), value=-1)
        scores = torch.nn.functional.pad(scores, (0, pad), value=float("-inf"))
        keep = torch.nn.functional.pad(keep, (0, pad), value=False)
    return scores.masked_fill(~keep, float("-inf")), order.masked_fill(~keep, -1)


# The tie rule as one integer order: a score and its index packed into an int64 that sorts by
# (score desc, index asc). Fast paths select on packed keys, which are unique per row, so any
# top-k routine returns the reference's order without breaking ties itself.
EMPTY_KEY = -(2**63) + 1  # below every packed score (also -inf): an empty slot
_LOW = 2**31 - 1          # low half of a packed key = _LOW - index


def pack_keys(scores: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """fp32 scores and int indices (broadcastable, index < 2**31) -> int64 keys ordered as the reference ranks."""
    bits = (scores.float() + 0.0).view(torch.int32)  # + 0.0 maps -0.0 to +0.0: equal scores, equal keys
    okey = bits ^ ((bits >> 31) & 0x7FFFFFFF)        # signed-int order == float order
    return (okey.to(torch.int64) << 32) + (_LOW - index.to(torch.int64))


def unpack_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `pack_keys`: -> scores (fp32), indices (int64); EMPTY_KEY -> -inf, -1."""
    empty = keys == EMPTY_KEY
    okey = (keys >> 32).to(torch.int32)
    bits = okey ^ ((okey >> 31) & 0x7FFFFFFF)
    scores = bits.view(torch.float32).masked_fill(empty, float("-inf"))
    return scores, (_LOW - (keys & 0xFFFFFFFF)).masked_fill(empty, -1)
