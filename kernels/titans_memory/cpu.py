"""The Titans memory's chunk loop in C (`cpu.c`, `update.inc`): forward and written-out backward of
`recsys.modules.titans`' chunk update for a 2-layer memory, float32 and float64, over a whole timeline
layout at once (`TimelineBlocks`: chunk i updates the first active[i] users of boundary i).

The torch form in recsys/modules/titans.py is the reference (and the path for other depths, CUDA, or a
machine without a C compiler); tests/test_titans.py compares the two in float64. In float32 they agree
to rounding: each sums in its own order.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path
from typing import Sequence

import torch

from kernels import cbuild


SOURCE = Path(__file__).with_name("cpu.c")
INCLUDES = [Path(__file__).with_name("update.inc")]
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
# errno is never read: without it the compiler may call the vector exp of libmvec
FLAGS = ["-fno-math-errno"]


@functools.lru_cache(maxsize=None)
def load():
    """The built library, or None (logged once) when it cannot be built here."""
    lib = cbuild.open_library(SOURCE, "titans", "the torch path", FLAGS, INCLUDES)
    if lib is None:
        return None
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for suf, real in (("f32", ctypes.c_float), ("f64", ctypes.c_double)):
        fwd, bwd = getattr(lib, f"titans_loop_fwd_{suf}"), getattr(lib, f"titans_loop_bwd_{suf}")
        fwd.argtypes = [i64, i64, p, i64, i64, i64, real] + [p] * 12 + [i32]
        bwd.argtypes = [i64, i64, p, i64, i64, i64, real, real] + [p] * 24 + [i32]
        fwd.restype = bwd.restype = i32
    return lib


# update.inc's MAX_BD and MAX_DD: its per-user scratch is on the stack
MAX_BD, MAX_DD = 2048, 4096


def supports(tensors: Sequence[torch.Tensor], n_layers: int) -> bool:
    """Whether the kernel runs this case: a 2-layer memory, CPU float32/float64 tensors within the scratch
    bounds (tensors: the chunk fields, k [P, b, d_key] first, then the state, W1 [U, d_key, d_hidden] first),
    and a build."""
    t = tensors[0]
    if n_layers != 2 or t.dim() != 3 or t.device.type != "cpu" or t.dtype not in _SUFFIX:
        return False
    b, dk, dh = t.shape[1], t.shape[2], tensors[8].shape[-1]
    return (b * max(dk, dh) <= MAX_BD and dk * dh <= MAX_DD and all(x.dtype == t.dtype for x in tensors)
            and load() is not None)


def _threads(work: int) -> int:
    # waking the OpenMP team costs microseconds: small chunks finish first on one thread
    return max(1, min(torch.get_num_threads(), work // 1_000_000 + 1))


def loop_forward(G: float, active: Sequence[int], fields: Sequence[torch.Tensor], state: list[torch.Tensor]) -> None:
    """fields: the chunk fields k, v [P, b, dk], theta, to_m, to_s [P, b], s0_to_m, keep_all, e_all [P];
    state: W1, W2, S1, S2 [U + P, ...] with the initial state in rows :U; the boundaries are written into
    the rows after."""
    k = fields[0]
    P, b, dk = k.shape
    dh = state[0].shape[-1]
    act = torch.tensor(list(active), dtype=torch.int64)
    U = state[0].shape[0] - P
    fn = getattr(load(), f"titans_loop_fwd_{_SUFFIX[k.dtype]}")
    rc = fn(U, len(active), act.data_ptr(), b, dk, dh, G, *(f.data_ptr() for f in fields),
            *(s.data_ptr() for s in state), _threads(P * b * dk * dh * 8))
    if rc != 0:
        raise ValueError(f"Titans C kernel: chunk of {b} events x {dk}/{dh} dims is beyond its scratch bound")


def loop_backward(G: float, A: float, active: Sequence[int], fields: Sequence[torch.Tensor], state: list[torch.Tensor],
                  g_state: list[torch.Tensor]) -> list[torch.Tensor]:
    """The gradients of `loop_forward`, each boundary's clipped to norm <= A per user before it flows back
    (`recsys.modules.titans._clip_adjoint`): g_state [U + P, ...] (the outputs' gradients, rows U:) is
    completed in place (rows :U then hold the initial state's); -> the fields' gradients."""
    k = fields[0]
    P, b, dk = k.shape
    dh = state[0].shape[-1]
    act = torch.tensor(list(active), dtype=torch.int64)
    U = state[0].shape[0] - P
    g_fields = [torch.empty_like(f) for f in fields]
    fn = getattr(load(), f"titans_loop_bwd_{_SUFFIX[k.dtype]}")
    rc = fn(U, len(active), act.data_ptr(), b, dk, dh, G, A, *(f.data_ptr() for f in fields),
            *(s.data_ptr() for s in state), *(g.data_ptr() for g in g_state), *(g.data_ptr() for g in g_fields),
            _threads(P * b * dk * dh * 24))
    if rc != 0:
        raise ValueError(f"Titans C kernel: chunk of {b} events x {dk}/{dh} dims is beyond its scratch bound")
    return g_fields
