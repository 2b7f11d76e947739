"""The torch forms of `cpu.py`'s kernels: their oracles and the path without a C compiler.

`update_rows` is torch.optim.SparseAdam's elementwise operations in its order
(`torch.optim._functional.sparse_adam`) on rows gathered by index and written back, with one difference: the
square root is correctly rounded (taken in float64, then rounded to float32: that is the correctly rounded
float32 root), as the kernel's sqrtf is. torch's float32 sqrt on CPU goes through MKL's vector math, which
is not correctly rounded (1 ulp off for ~1 in 6 inputs on an AMD EPYC) and may differ by CPU. So this and
the kernel agree bitwise; against SparseAdam the moments agree bitwise and the weights to that rounding of
the update's denominator.
"""

from __future__ import annotations

import torch


def index_add_rows(out: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> None:
    """`cpu.index_add_rows`' contract."""
    out.index_add_(0, index, src)


def update_rows(rows: torch.Tensor, grad: torch.Tensor, param: torch.Tensor, exp_avg: torch.Tensor,
                exp_avg_sq: torch.Tensor, c1: float, c2: float, eps: float, neg_step: float) -> None:
    """`cpu.update_rows`' contract: rows strictly increasing, grad [n, dim]; param and moments in place."""
    old_m, old_v = exp_avg.index_select(0, rows), exp_avg_sq.index_select(0, rows)
    dm = grad.sub(old_m).mul_(c1)
    dv = grad.pow(2).sub_(old_v).mul_(c2)
    exp_avg.index_copy_(0, rows, old_m + dm)
    exp_avg_sq.index_copy_(0, rows, old_v + dv)
    step = dm.add_(old_m).div_(dv.add_(old_v).double().sqrt_().float().add_(eps)).mul_(neg_step)
    param.index_copy_(0, rows, param.index_select(0, rows).add_(step))
