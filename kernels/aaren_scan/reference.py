"""Aaren prefix scan of (m, u, w), the plain-torch oracle ("Attention as an RNN", Feng et al. 2024).

A fixed query attends over a sequence of scores s_i and values v_i. The attention output after
event t is o_t = sum_{i<=t} softmax(s_{1..t})_i v_i. It is the prefix scan of leaves (s_i, 1, v_i) under

    (mA, uA, wA) (+) (mB, uB, wB) = (m, uA e^(mA-m) + uB e^(mB-m), wA e^(mA-m) + wB e^(mB-m)),
    m = max(mA, mB),   identity (-inf, 0, 0),   output o = w / u  (0 where u = 0: no event yet).

m is a running (per-position) max, so every exponent is <= 0 and nothing overflows. Masked events
(score -inf) are identity leaves: the mask is applied to the score, before any exp.

Layout: s [N, L] (N = batch x heads), v [N, L, D]. Returns o [N, L, D], m [N, L], u [N, L]; the
state after event t is (m_t, u_t, w_t = o_t * u_t).
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def identity(shape: tuple[int, ...], d: int, dtype: torch.dtype, device=None):
    """The identity element (m=-inf, u=0, w=0) for `shape` leading dims and value dim `d`."""
    return (
        torch.full(shape, NEG_INF, dtype=dtype, device=device),
        torch.zeros(shape, dtype=dtype, device=device),
        torch.zeros((*shape, d), dtype=dtype, device=device),
    )


def combine(a, b):
    """(m, u, w) (+) (m, u, w): `a` holds the earlier events. Broadcasts over leading dims."""
    mA, uA, wA = a
    mB, uB, wB = b
    m = torch.maximum(mA, mB)
    # both -inf: nothing seen; e^(-inf - 0) = 0 keeps u = w = 0 without a nan
    m_safe = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    ea = torch.exp(mA - m_safe)
    eb = torch.exp(mB - m_safe)
    return m, uA * ea + uB * eb, wA * ea.unsqueeze(-1) + wB * eb.unsqueeze(-1)


def leaves(s: torch.Tensor, v: torch.Tensor):
    """Leaves (s_i, 1, v_i); events with s_i = -inf become identity leaves."""
    real = ~torch.isneginf(s)
    u = real.to(v.dtype)
    w = torch.where(real.unsqueeze(-1), v, torch.zeros_like(v))
    return s, u, w


def output(u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """o = w / u, and 0 before the first real event."""
    has = u > 0
    return torch.where(has.unsqueeze(-1), w / torch.where(has, u, torch.ones_like(u)).unsqueeze(-1), torch.zeros_like(w))


def aaren_scan_reference(s: torch.Tensor, v: torch.Tensor):
    """Inclusive prefix scan along L (Hillis-Steele: log2(L) vectorised combine steps).

    s [N, L] (-inf = masked), v [N, L, D] -> o [N, L, D], m [N, L], u [N, L].
    """
    if s.dim() != 2 or v.dim() != 3 or v.shape[:2] != s.shape:
        raise ValueError(f"expected s [N, L] and v [N, L, D], got {tuple(s.shape)} and {tuple(v.shape)}")
    m, u, w = leaves(s, v)
    N, L = s.shape
    offset = 1
    while offset < L:
        im, iu, iw = identity((N, offset), v.shape[-1], v.dtype, v.device)
        earlier = (torch.cat([im, m[:, :-offset]], 1), torch.cat([iu, u[:, :-offset]], 1),
                   torch.cat([iw, w[:, :-offset]], 1))
        m, u, w = combine(earlier, (m, u, w))
        offset *= 2
    return output(u, w), m, u


def aaren_reduce_reference(s: torch.Tensor, v: torch.Tensor):
    """Only the final element of the scan: (m, u, w) over all of L. s [N, L], v [N, L, D]."""
    m = s.max(dim=1).values                                               # [N]
    m_safe = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    p = torch.exp(s - m_safe.unsqueeze(1))                                # [N, L], 0 where masked
    return m, p.sum(1), torch.einsum("nl,nld->nd", p, v)
