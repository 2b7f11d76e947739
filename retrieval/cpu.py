"""CPU top-k search paths, all exact against `topk_reference` (same scores, same tie order).

Every path computes the scores with the reference's own arithmetic (fp32 query * segment scale, then
one matmul) and selects on `pack_keys` integers, which are unique per row, so torch.topk cannot break a
tie differently from the reference's stable sort.

- `topk_packed`: full score matrix, pack every score, one torch.topk.
- `topk_blocked`: full score matrix, then prune by block maxima: the k best blocks (by their best
  entry) hold the top k entries, because an entry outside them is beaten by the best entry of each
  of k chosen blocks. Only k * block entries are packed and ranked.
- `topk_chunked`: the same pruning per cache-sized chunk of the history, merging the per-chunk top-k,
  so the score matrix is never written whole to memory.
benchmarks/topk_search.py measures them; docs/kernels.md has the figures and names the winner.
"""

from __future__ import annotations

import math

import torch

from kernels.topk_attention.reference import EMPTY_KEY, pack_keys, segment_scale, unpack_keys


def _prepare(query, keys, lengths, segments):
    """-> scaled query [R, 1, d] (training) or [R, d] (serving), keys, lengths [R, 1] or [1, 1], serving."""
    serving = keys.dim() == 2
    d = query.shape[-1]
    if serving:
        if query.dim() != 2 or keys.shape[1] != d:
            raise ValueError(f"serving layout: query {tuple(query.shape)} must be [C, d] with keys [L, d] {tuple(keys.shape)}")
        n = torch.as_tensor(lengths, device=query.device).reshape(1, 1)
    else:
        if keys.dim() != 3 or query.dim() != 2 or keys.shape[0] != query.shape[0] or keys.shape[2] != d:
            raise ValueError(f"training layout: query {tuple(query.shape)} must be [B, d] with keys [B, L, d] {tuple(keys.shape)}")
        n = torch.as_tensor(lengths, device=query.device).reshape(-1, 1)
        if n.shape[0] != query.shape[0]:
            raise ValueError(f"lengths has {n.shape[0]} entries, expected one per query ({query.shape[0]})")
    q = query.float() * segment_scale(d, segments, query.device)
    return (q if serving else q.unsqueeze(1)), keys, n, serving


def _scores(q: torch.Tensor, keys: torch.Tensor, serving: bool) -> torch.Tensor:
    """Scaled query x keys -> [R, L] fp32, the reference's arithmetic."""
    s = q @ keys.float().transpose(-1, -2)
    return s if serving else s.squeeze(1)


def _mask(s: torch.Tensor, n: torch.Tensor, base: int = 0) -> torch.Tensor:
    """-inf beyond each row's length; column j of `s` is history index base + j."""
    L = s.shape[1]
    if n.shape[0] == 1:
        cut = max(0, min(int(n), base + L) - base)
        if cut < L:
            s[:, cut:] = float("-inf")
        return s
    valid = torch.arange(base, base + L, device=s.device)[None, :] < n
    return s.masked_fill(~valid, float("-inf"))


def _select_packed(s: torch.Tensor, k: int, base: int = 0) -> torch.Tensor:
    """[R, L] scores -> packed top-min(k, L) [R, <=k], sorted best first."""
    L = s.shape[1]
    keys = pack_keys(s, torch.arange(base, base + L, device=s.device))
    return torch.topk(keys, min(k, L), dim=-1).values


def block_size(L: int, k: int) -> int:
    """Balances the two costs of pruning: L / block block maxima against k * block candidates."""
    return max(8, 1 << int(math.log2(max(1.0, math.sqrt(L / k)))))


def _select_blocked(s: torch.Tensor, k: int, block: int, base: int = 0) -> torch.Tensor:
    """[R, L] scores -> packed top-min(k, L) [R, <=k], ranking only the entries of the k best blocks."""
    R, L = s.shape
    nb = L // block
    if nb <= 2 * k:
        return _select_packed(s, k, base)
    bmax = s[:, : nb * block].unflatten(1, (nb, block)).amax(-1)              # [R, nb]
    if nb * block < L:
        bmax = torch.cat([bmax, s[:, nb * block :].amax(-1, keepdim=True)], 1)
    blocks = torch.arange(bmax.shape[1], device=s.device)
    best = torch.topk(pack_keys(bmax, blocks), k, dim=-1).values             # ties -> lower block
    _, chosen = unpack_keys(best)                                             # [R, k]
    cand = (chosen * block)[:, :, None] + torch.arange(block, device=s.device)  # [R, k, block]
    cand = cand.flatten(1)
    inside = cand < L
    cs = torch.gather(s, 1, cand.clamp(max=L - 1))
    keys = pack_keys(cs, cand + base).masked_fill(~inside, EMPTY_KEY)
    return torch.topk(keys, k, dim=-1).values


def _finish(packed: torch.Tensor, n: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed top entries [R, m] -> scores, indices [R, k]; entries beyond the length -> -inf, -1."""
    if packed.shape[1] < k:
        pad = torch.full((packed.shape[0], k - packed.shape[1]), EMPTY_KEY, dtype=torch.int64, device=packed.device)
        packed = torch.cat([packed, pad], 1)
    scores, idx = unpack_keys(packed)
    beyond = idx >= n
    return scores.masked_fill(beyond, float("-inf")), idx.masked_fill(beyond, -1)


def topk_packed(query, keys, lengths, k, segments=None):
    q, keys, n, serving = _prepare(query, keys, lengths, segments)
    s = _mask(_scores(q, keys, serving), n)
    return _finish(_select_packed(s, k), n, k)


def topk_blocked(query, keys, lengths, k, segments=None):
    q, keys, n, serving = _prepare(query, keys, lengths, segments)
    s = _mask(_scores(q, keys, serving), n)
    return _finish(_select_blocked(s, k, block_size(s.shape[1], k)), n, k)


def topk_chunked(query, keys, lengths, k, segments=None, chunk: int = 8192):
    q, keys, n, serving = _prepare(query, keys, lengths, segments)
    L = keys.shape[-2]
    if L <= chunk:
        s = _mask(_scores(q, keys, serving), n)
        return _finish(_select_blocked(s, k, block_size(L, k)), n, k)
    parts = []
    for l0 in range(0, L, chunk):
        kc = keys[l0 : l0 + chunk] if serving else keys[:, l0 : l0 + chunk]
        s = _mask(_scores(q, kc, serving), n, base=l0)
        parts.append(_select_blocked(s, k, block_size(s.shape[1], k), base=l0))
    packed = torch.cat(parts, 1)
    return _finish(torch.topk(packed, min(k, packed.shape[1]), dim=-1).values, n, k)


PATHS = {"packed": topk_packed, "blocked": topk_blocked, "chunked": topk_chunked}
