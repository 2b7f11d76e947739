"""Aaren (m, u, w) prefix scan: `aaren_scan(s, v) -> (o, m, u)`.

Triton on CUDA tensors, the plain-torch scan elsewhere. `reference.py` holds the math and the oracle.
"""

from __future__ import annotations

import torch

from kernels.aaren_scan.reference import (
    aaren_reduce_reference,
    aaren_scan_reference,
    combine,
    identity,
    output,
)


def aaren_scan(s: torch.Tensor, v: torch.Tensor):
    """s [N, L] (-inf = masked), v [N, L, D] -> o [N, L, D], m [N, L], u [N, L]."""
    if s.is_cuda:
        # imported here: CPU-only callers never need a GPU-capable triton backend
        from kernels.aaren_scan.triton import aaren_scan_triton

        return aaren_scan_triton(s, v)
    return aaren_scan_reference(s, v)


__all__ = ["aaren_scan", "aaren_scan_reference", "aaren_reduce_reference", "combine", "identity", "output"]
