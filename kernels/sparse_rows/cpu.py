"""The sparse table backend's row kernels in C (`cpu.c`), float32 on CPU:

- `index_add_rows`: the gradient of a lookup summed into its table rows (recsys.embeddings' `_Expand`
  backward); torch's index_add_ goes through a sorting scatter-add, ~10x slower on 400k lookups.
- `update_rows`: SparseAdam's row update, each touched row's weight and moments read and written once
  (torch's form gathers and scatters the weight and both moments separately: three gathers and three
  scatters per row, plus the temporaries between them).

`reference.py` holds their torch forms (the path without a C compiler, and the oracle). `index_add_rows`
is bitwise torch's index_add_; `update_rows` does torch.optim.SparseAdam's elementwise operations in its order
with a correctly rounded square root, so it equals its torch form bitwise and SparseAdam bitwise in the
moments and to its square root's rounding in the weights (reference.py says why).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from kernels import cbuild


SOURCE = Path(__file__).with_name("cpu.c")
# no fused multiply-add (it would round differently from torch's separate ops); errno is never read, so
# sqrtf is the vector square root instruction
FLAGS = ["-ffp-contract=off", "-fno-math-errno"]


@functools.cache
def load():
    """The built library, or None (logged once) when it cannot be built here."""
    lib = cbuild.open_library(SOURCE, "sparse_rows", "the torch path", FLAGS)
    if lib is None:
        return None
    p, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    lib.sparse_adam_rows_f32.argtypes = [i64, i64, p, p, p, p, p, f32, f32, f32, f32, ctypes.c_int]
    lib.index_add_rows_f32.argtypes = [i64, i64, p, p, p]
    lib.sparse_adam_rows_f32.restype = lib.index_add_rows_f32.restype = None
    return lib


def supports(*tables: torch.Tensor) -> bool:
    """Whether the kernels run these [rows, dim] tables: CPU float32, contiguous, one dim, and a build."""
    t = tables[0]
    return (t.device.type == "cpu" and t.dtype == torch.float32
            and all(x.dim() == 2 and x.is_contiguous() and x.dtype == t.dtype and x.shape[1] == t.shape[1] for x in tables)
            and load() is not None)


def _threads(rows: int) -> int:
    # waking the OpenMP team costs microseconds: a few thousand rows finish first on one thread
    return max(1, min(torch.get_num_threads(), rows // 16_384 + 1))


def index_add_rows(out: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> None:
    """out [rows, dim] in place: out[index[i]] += src[i] (src [n, dim] contiguous, index [n] in range,
    unchecked: the caller's inverse map)."""
    index = index.contiguous()
    load().index_add_rows_f32(index.numel(), src.shape[1], index.data_ptr(), src.data_ptr(), out.data_ptr())


def update_rows(rows: torch.Tensor, grad: torch.Tensor, param: torch.Tensor, exp_avg: torch.Tensor,
                exp_avg_sq: torch.Tensor, c1: float, c2: float, eps: float, neg_step: float) -> None:
    """In place, for the strictly increasing row ids `rows` [n] with gradients `grad` [n, dim]:
    exp_avg, exp_avg_sq and param rows as SparseAdam updates them (c1 = 1 - beta1, c2 = 1 - beta2,
    neg_step = -lr * sqrt(1 - beta2^t) / (1 - beta1^t))."""
    rows, grad = rows.contiguous(), grad.contiguous()
    load().sparse_adam_rows_f32(rows.numel(), param.shape[1], rows.data_ptr(), grad.data_ptr(), param.data_ptr(),
                                exp_avg.data_ptr(), exp_avg_sq.data_ptr(), c1, c2, eps, neg_step,
                                _threads(rows.numel()))
