"""Fused top-k attention search: score and select in one pass, never writing the [Q, L] score matrix.

Same semantics as `reference.topk_reference` (split-scaled dot product, masking beyond the length,
ties -> lower index, -1 / -inf for empty slots). Each program owns a block of queries and one slice of
the history; it streams key tiles, scores them in fp32 and keeps a running top-k per query in
registers. A score and its index travel packed in one int64 whose order is (score desc, index asc),
so the selection is a plain max/min of integers and ties need no special case. The few partial
top-k lists per query (one per history slice) are merged and sorted at the end, on packed keys again.

CUDA tensors run compiled; CPU tensors only under Triton's interpreter (slow, for correctness tests).
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from kernels.topk_attention.reference import EMPTY_KEY, segment_scale, unpack_keys

# The packing of `reference.pack_keys`, spelled in Triton.
_EMPTY_C = tl.constexpr(EMPTY_KEY)
_FULL_C = tl.constexpr(-EMPTY_KEY)
_LOW_C = tl.constexpr(2**31 - 1)
MAX_K = 256


@triton.jit
def _topk_kernel(
    q_ptr, k_ptr, scale_ptr, len_ptr, out_ptr,
    n_rows, L, D, n_qblocks,
    s_qg, s_qr, s_qd,
    s_kg, s_kl, s_kd,
    s_len,
    s_og, s_or, s_os,
    K, span,
    K_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
    USE_DOT: tl.constexpr,
):
    # Program (group g, query block qb, history slice sp). A group is a set of queries sharing one
    # history: the serving layout is one group of C queries, the training layout B groups of one.
    pid = tl.program_id(0)
    sp = tl.program_id(1)
    g = pid // n_qblocks
    qb = pid % n_qblocks

    rows = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    dd = tl.arange(0, BLOCK_D)
    rmask = rows < n_rows
    dmask = dd < D
    q = tl.load(q_ptr + g * s_qg + rows[:, None] * s_qr + dd[None, :] * s_qd,
                mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + dd, mask=dmask, other=0.0)
    q = q * scale[None, :]                                                   # [BQ, BD]

    n = tl.minimum(tl.load(len_ptr + g * s_len).to(tl.int32), L)
    start = sp * span
    end = tl.minimum(start + span, n)

    # Running top-K per query, unsorted; slots >= K hold +max so they are never the minimum.
    slot = tl.arange(0, K_PAD)
    top = tl.where(slot[None, :] < K, tl.full([BLOCK_Q, K_PAD], _EMPTY_C, tl.int64), _FULL_C)
    for l0 in range(start, end, BLOCK_L):
        cols = l0 + tl.arange(0, BLOCK_L)
        cmask = cols < end
        kt = tl.load(k_ptr + g * s_kg + cols[:, None] * s_kl + dd[None, :] * s_kd,
                     mask=cmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)  # [BL, BD]
        if USE_DOT:
            s = tl.dot(q, tl.trans(kt), input_precision="ieee")             # [BQ, BL]
        else:
            s = tl.sum(q[:, None, :] * kt[None, :, :], axis=2)              # [BQ, BL]
        s = s + 0.0
        bits = s.to(tl.int32, bitcast=True)
        okey = bits ^ ((bits >> 31) & 0x7FFFFFFF)                           # int order == float order
        low = _LOW_C - cols.to(tl.int64)
        packed = (okey.to(tl.int64) << 32) + low[None, :]                   # [BQ, BL], unique per row
        packed = tl.where(cmask[None, :], packed, _EMPTY_C)
        # Insert tile entries that beat the current k-th best, best first, each replacing the minimum.
        # After the first tiles few entries qualify, so the loop usually runs zero times.
        best = tl.max(packed, axis=1)                                       # [BQ]
        while tl.max((best > tl.min(top, axis=1)).to(tl.int32)) > 0:
            take = best > tl.min(top, axis=1)                               # [BQ]
            victim = tl.argmin(top, axis=1, tie_break_left=True)            # [BQ]
            top = tl.where(take[:, None] & (slot[None, :] == victim[:, None]), best[:, None], top)
            packed = tl.where(packed == best[:, None], _EMPTY_C, packed)
            best = tl.max(packed, axis=1)
    top = tl.where(slot[None, :] < K, top, _EMPTY_C)
    tl.store(out_ptr + g * s_og + rows[:, None] * s_or + sp * s_os + slot[None, :], top,
             mask=rmask[:, None])


def interpreted() -> bool:
    """Whether this module's kernel runs under Triton's interpreter (TRITON_INTERPRET=1 before triton was imported)."""
    return isinstance(_topk_kernel, InterpretedFunction)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def topk_triton(
    query: torch.Tensor,
    keys: torch.Tensor,
    lengths: torch.Tensor | int,
    k: int,
    segments: Sequence[int] | None = None,
    n_split: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Layouts as `topk_reference`. `n_split` history slices per query (default: enough to fill the GPU).
    Returns scores (fp32, no grad) and indices (int64), both [rows, k]."""
    if not 1 <= k <= MAX_K:
        raise ValueError(f"k={k} must be in [1, {MAX_K}]")
    serving = keys.dim() == 2
    if serving:
        if query.dim() != 2 or query.shape[1] != keys.shape[1]:
            raise ValueError(f"serving layout: query {tuple(query.shape)} must be [C, d] with keys [L, d] {tuple(keys.shape)}")
        n_groups, n_rows, (L, D) = 1, query.shape[0], keys.shape
        lens = torch.as_tensor(lengths, device=query.device).reshape(1)
        s_q = (0, query.stride(0), query.stride(1))
        s_k = (0, keys.stride(0), keys.stride(1))
    else:
        if keys.dim() != 3 or query.dim() != 2 or query.shape[0] != keys.shape[0] or query.shape[1] != keys.shape[2]:
            raise ValueError(f"training layout: query {tuple(query.shape)} must be [B, d] with keys [B, L, d] {tuple(keys.shape)}")
        n_groups, n_rows, L, D = keys.shape[0], 1, keys.shape[1], keys.shape[2]
        lens = torch.as_tensor(lengths, device=query.device).reshape(-1)
        if lens.numel() != n_groups:
            raise ValueError(f"lengths has {lens.numel()} entries, expected one per query ({n_groups})")
        s_q = (query.stride(0), 0, query.stride(1))
        s_k = keys.stride()
    lens = lens.to(torch.int32).contiguous()
    scale = segment_scale(D, segments, query.device).float().contiguous()

    k_pad = _next_pow2(k)
    use_dot = n_rows >= 16
    block_q = 16 if use_dot else _next_pow2(n_rows)
    block_d = max(16, _next_pow2(D))
    block_l = 64 if block_d <= 64 else 32
    n_qblocks = triton.cdiv(n_rows, block_q)
    tiles = max(1, triton.cdiv(L, block_l))
    if n_split is None:
        programs = 4 * torch.cuda.get_device_properties(query.device).multi_processor_count if query.is_cuda else 1
        n_split = triton.cdiv(programs, n_groups * n_qblocks)
    n_split = max(1, min(n_split, tiles))
    span = triton.cdiv(tiles, n_split) * block_l
    n_split = max(1, triton.cdiv(L, span))

    out = torch.empty((n_groups, n_rows, n_split, k_pad), dtype=torch.int64, device=query.device)
    if not query.is_cuda and not interpreted():
        raise RuntimeError("topk_triton on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported")
    _topk_kernel[(n_groups * n_qblocks, n_split)](
        query, keys, scale, lens, out,
        n_rows, L, D, n_qblocks,
        *s_q, *s_k, 1 if not serving else 0,
        out.stride(0), out.stride(1), out.stride(2),
        k, span,
        K_PAD=k_pad, BLOCK_Q=block_q, BLOCK_L=block_l, BLOCK_D=block_d, USE_DOT=use_dot,
    )
    packed = out.reshape(n_groups * n_rows, n_split * k_pad)
    # Packed keys of real entries are unique, so topk has no ties to break; EMPTY slots sort last.
    return unpack_keys(torch.topk(packed, k, dim=-1).values)
