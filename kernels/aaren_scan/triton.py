"""Aaren prefix scan as Triton kernels: blockwise scan with a carried (m, u, w) state.

Same layout and semantics as `reference.aaren_scan_reference`. One program per row n (batch x head)
walks L in blocks of BLOCK_L:

forward, per block: running max m_t = max(m_carry, max_{i<=t in block} s_i) per position (a causal
[BLOCK_L, BLOCK_L] max), P[t, i] = e^(s_i - m_t) for i <= t, then
u_t = u_carry e^(m_carry - m_t) + sum_i P[t, i] and w_t = w_carry e^(m_carry - m_t) + (P @ V)_t;
the carry becomes the block's last position.

backward, blocks in reverse: with lse_t = m_t + log u_t and p_{t,i} = e^(s_i - lse_t) (the softmax
weight of event i in output t),
    dv_i = sum_{t>=i} p_{t,i} do_t,     ds_i = v_i . dv_i - sum_{t>=i} p_{t,i} (do_t . o_t).
lse_t never decreases in t, so the sum over later blocks is carried as C = sum_t e^(ref - lse_t) do_t
with ref = the smallest finite lse seen so far: every exponent is <= 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# larger than any finite lse, small enough that e^(x - BIG) stays 0 instead of nan
_BIG = 1.0e30


# Reductions are tl.reduce with the standard library's own combine functions, not tl.max / tl.sum:
# those wrappers are @jit functions fixed as compiled or interpreted when triton is first imported, so
# the interpreter tests would depend on import order; the interpreter recognises these combine
# functions (numpy fast path) and the compiler inlines them, whichever mode triton was imported in.
_add = tl.standard._sum_combine
_max = tl.standard._elementwise_max
_min = tl.standard._elementwise_min


@triton.jit
def _scan_fwd(s_ptr, v_ptr, o_ptr, m_ptr, u_ptr, L, D,
              BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    n = tl.program_id(0)
    rows = tl.arange(0, BLOCK_L)
    cols = tl.arange(0, BLOCK_D)
    causal = rows[:, None] >= rows[None, :]                                   # [t, i]
    m_c = tl.full((1,), float("-inf"), tl.float32)
    u_c = tl.full((1,), 0.0, tl.float32)
    w_c = tl.full((1, BLOCK_D), 0.0, tl.float32)
    for start in range(0, L, BLOCK_L):
        pos = start + rows
        in_l = pos < L
        s = tl.load(s_ptr + n * L + pos, mask=in_l, other=float("-inf")).to(tl.float32)
        vmask = in_l[:, None] & (cols[None, :] < D)
        v = tl.load(v_ptr + (n * L + pos)[:, None] * D + cols[None, :], mask=vmask, other=0.0).to(tl.float32)
        real = s > float("-inf")
        s_ti = tl.where(causal, s[None, :], float("-inf"))                    # [t, i]
        m = tl.maximum(tl.reduce(s_ti, 1, _max), m_c)                              # [t]
        m_safe = tl.where(m > float("-inf"), m, 0.0)
        p = tl.where(causal & real[None, :], tl.exp(s_ti - m_safe[:, None]), 0.0)
        carry = tl.exp(m_c - m_safe)                                           # 0 while m_c = -inf
        u = u_c * carry + tl.reduce(p, 1, _add)
        w = w_c * carry[:, None] + tl.dot(p, v, input_precision="ieee")
        o = tl.where(u[:, None] > 0, w / tl.where(u > 0, u, 1.0)[:, None], 0.0)
        tl.store(o_ptr + (n * L + pos)[:, None] * D + cols[None, :], o, mask=vmask)
        tl.store(m_ptr + n * L + pos, m, mask=in_l)
        tl.store(u_ptr + n * L + pos, u, mask=in_l)
        last = (rows == BLOCK_L - 1)
        m_c = tl.reduce(tl.where(last, m, float("-inf")), 0, _max, keep_dims=True)
        u_c = tl.reduce(tl.where(last, u, 0.0), 0, _add, keep_dims=True)
        w_c = tl.reduce(tl.where(last[:, None], w, 0.0), 0, _add, keep_dims=True)


@triton.jit
def _scan_bwd(s_ptr, v_ptr, o_ptr, m_ptr, u_ptr, do_ptr, ds_ptr, dv_ptr, L, D,
              BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BIG: tl.constexpr):
    n = tl.program_id(0)
    rows = tl.arange(0, BLOCK_L)
    cols = tl.arange(0, BLOCK_D)
    causal = rows[:, None] >= rows[None, :]                                   # [t, i]
    ref = tl.full((1,), BIG, tl.float32)
    c_do = tl.full((1, BLOCK_D), 0.0, tl.float32)   # sum over later t of e^(ref - lse_t) do_t
    c_d = tl.full((1,), 0.0, tl.float32)            # sum over later t of e^(ref - lse_t) (do_t . o_t)
    n_blocks = (L + BLOCK_L - 1) // BLOCK_L
    for b in range(0, n_blocks):
        start = (n_blocks - 1 - b) * BLOCK_L
        pos = start + rows
        in_l = pos < L
        vmask = in_l[:, None] & (cols[None, :] < D)
        offs = (n * L + pos)[:, None] * D + cols[None, :]
        s = tl.load(s_ptr + n * L + pos, mask=in_l, other=float("-inf")).to(tl.float32)
        m = tl.load(m_ptr + n * L + pos, mask=in_l, other=float("-inf")).to(tl.float32)
        u = tl.load(u_ptr + n * L + pos, mask=in_l, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=vmask, other=0.0).to(tl.float32)
        o = tl.load(o_ptr + offs, mask=vmask, other=0.0).to(tl.float32)
        do = tl.load(do_ptr + offs, mask=vmask, other=0.0).to(tl.float32)
        real = s > float("-inf")
        seen = u > 0                                         # lse_t finite
        lse = tl.where(seen, m + tl.log(tl.where(seen, u, 1.0)), BIG)
        dd = tl.reduce(o * do, 1, _add)                                            # [t]
        # mask before exp: for i > t the exponent may be huge
        p = tl.exp(tl.where(causal & real[None, :] & seen[:, None], s[None, :] - lse[:, None], float("-inf")))
        later = tl.where(real, tl.exp(s - ref), 0.0)                           # [i]
        dv = tl.dot(tl.trans(p), do, input_precision="ieee") + later[:, None] * c_do
        dsum = tl.reduce(p * dd[:, None], 0, _add) + later * c_d
        ds = tl.where(real, tl.reduce(v * dv, 1, _add) - dsum, 0.0)
        tl.store(dv_ptr + offs, dv, mask=vmask)
        tl.store(ds_ptr + n * L + pos, ds, mask=in_l)
        new_ref = tl.minimum(ref, tl.reduce(lse, 0, _min, keep_dims=True))
        scale = tl.exp(new_ref - ref)
        e = tl.where(seen, tl.exp(new_ref - lse), 0.0)                         # [t]
        c_do = c_do * scale[:, None] + tl.reduce(e[:, None] * do, 0, _add, keep_dims=True)
        c_d = c_d * scale + tl.reduce(e * dd, 0, _add, keep_dims=True)
        ref = new_ref


def _blocks(L: int, D: int) -> tuple[int, int]:
    # tl.dot needs every dim >= 16
    return max(16, min(64, triton.next_power_of_2(L))), max(16, triton.next_power_of_2(D))


class AarenScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s: torch.Tensor, v: torch.Tensor):
        s32, v32 = s.float().contiguous(), v.float().contiguous()
        N, L = s32.shape
        D = v32.shape[-1]
        o = torch.empty_like(v32)
        m = torch.empty_like(s32)
        u = torch.empty_like(s32)
        bl, bd = _blocks(L, D)
        if N * L > 0:
            _scan_fwd[(N,)](s32, v32, o, m, u, L, D, BLOCK_L=bl, BLOCK_D=bd)
        ctx.save_for_backward(s32, v32, o, m, u)
        ctx.dtypes = (s.dtype, v.dtype)
        ctx.mark_non_differentiable(m, u)
        return o.to(v.dtype), m, u

    @staticmethod
    def backward(ctx, do: torch.Tensor, _dm, _du):
        s, v, o, m, u = ctx.saved_tensors
        N, L = s.shape
        D = v.shape[-1]
        ds = torch.empty_like(s)
        dv = torch.empty_like(v)
        bl, bd = _blocks(L, D)
        if N * L > 0:
            _scan_bwd[(N,)](s, v, o, m, u, do.float().contiguous(), ds, dv, L, D,
                            BLOCK_L=bl, BLOCK_D=bd, BIG=_BIG)
        return ds.to(ctx.dtypes[0]), dv.to(ctx.dtypes[1])


def aaren_scan_triton(s: torch.Tensor, v: torch.Tensor):
    """s [N, L] (-inf = masked), v [N, L, D] -> o [N, L, D], m [N, L], u [N, L]; differentiable in s, v."""
    if s.dim() != 2 or v.dim() != 3 or v.shape[:2] != s.shape:
        raise ValueError(f"expected s [N, L] and v [N, L, D], got {tuple(s.shape)} and {tuple(v.shape)}")
    return AarenScan.apply(s, v)
