"""SparseAdam's row update in C (`cpu.c`): for each touched row, the moments and the weight in one pass
(torch's form gathers and scatters the weight and both moments separately: three gathers and three scatters
per row, plus the temporaries between them). float32, CPU, contiguous [rows, dim] tables.

`reference.update_rows` is the same update in torch (the path without a C compiler, and the kernel's oracle):
both do torch.optim.SparseAdam's elementwise operations in its order with a correctly rounded square root,
so they agree bitwise, and with SparseAdam bitwise in the moments and to its square root's rounding in the
weights (reference.py says why).
"""

from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path

import torch

from kernels import cbuild

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu.c")
# no fused multiply-add (it would round differently from torch's separate ops); errno is never read, so
# sqrtf is the vector square root instruction
FLAGS = ["-ffp-contract=off", "-fno-math-errno"]


@functools.cache
def load():
    """The built library, or None (logged once) when it cannot be built here."""
    try:
        lib = ctypes.CDLL(str(cbuild.build(SOURCE, "sparse_adam", FLAGS)))
    except Exception as e:  # noqa: BLE001 - any build/load failure means: use the torch path
        log.warning("SparseAdam C kernel unavailable, using the torch path: %s", e)
        return None
    p, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    lib.sparse_adam_rows_f32.argtypes = [i64, i64, p, p, p, p, p, f32, f32, f32, f32, ctypes.c_int]
    lib.sparse_adam_rows_f32.restype = None
    return lib


def supports(param: torch.Tensor, *state: torch.Tensor) -> bool:
    """Whether the kernel runs this table: CPU float32 [rows, dim], weight and moments contiguous, and a build."""
    return (param.device.type == "cpu" and param.dtype == torch.float32 and param.dim() == 2
            and all(t.is_contiguous() and t.dtype == param.dtype and t.shape == param.shape for t in (param, *state))
            and load() is not None)


def _threads(rows: int) -> int:
    # waking the OpenMP team costs microseconds: a few thousand rows finish first on one thread
    return max(1, min(torch.get_num_threads(), rows // 16_384 + 1))


def update_rows(rows: torch.Tensor, grad: torch.Tensor, param: torch.Tensor, exp_avg: torch.Tensor,
                exp_avg_sq: torch.Tensor, c1: float, c2: float, eps: float, neg_step: float) -> None:
    """In place, for the strictly increasing row ids `rows` [n] with gradients `grad` [n, dim]:
    exp_avg, exp_avg_sq and param rows as SparseAdam updates them (c1 = 1 - beta1, c2 = 1 - beta2,
    neg_step = -lr * sqrt(1 - beta2^t) / (1 - beta1^t))."""
    rows, grad = rows.contiguous(), grad.contiguous()
    load().sparse_adam_rows_f32(rows.numel(), param.shape[1], rows.data_ptr(), grad.data_ptr(), param.data_ptr(),
                                exp_avg.data_ptr(), exp_avg_sq.data_ptr(), c1, c2, eps, neg_step,
                                _threads(rows.numel()))
