"""Stage 2's attention over the kept events in C (`cpu.c`), float32 on CPU: each kept event's rows read once,
scored, weighted and summed into its target's output, where the torch form (`reference.py`) gathers the
keys and the representation rows into [C, k, .] copies first.

`attend` runs the kernel where `supports` says it can, else the reference. Not the reference's bits (another
summation order, libm's exp): within float32 rounding of it (tests/test_kept_attention.py), and the same bits
on every call of one build, so the served paths that end here (whole history, block index) agree exactly.
RECSYS_KEPT_ATTENTION_KERNEL=0 in the environment (read per call) keeps every call on the reference.

Ids are checked against their tables in the kernel, before any row is read: an id out of range raises
IndexError naming the table and the kept slot.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from kernels import cbuild
from kernels.kept_attention import reference

SOURCE = Path(__file__).with_name("cpu.c")
SWITCH_ENV = "RECSYS_KEPT_ATTENTION_KERNEL"
# Kept events ahead whose rows are prefetched, as the key gather's (kernels/gather_keys: AHEAD).
AHEAD = 16


@functools.cache
def load():
    """The built library, or None (logged once) when it cannot be built here."""
    lib = cbuild.open_library(SOURCE, "kept_attention", "the torch path")
    if lib is None:
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.kept_attention_f32.argtypes = [i64, i64, i64, p, p, p, p, p, p, p, p, p, p, i64, p]
    lib.kept_attention_f32.restype = i64
    return lib


def enabled() -> bool:
    return cbuild.switch_on(SWITCH_ENV)


def supports(query: torch.Tensor, att: list[torch.Tensor], rep: list[torch.Tensor], ids: list[torch.Tensor],
             valid: torch.Tensor) -> bool:
    """Whether the kernel runs these inputs: CPU float32 contiguous tables and query, int64 ids of C k events,
    a bool valid [C, k], nothing for autograd to record, the switch on and a build. (Per request: plain loops,
    ~4 us, where generator checks took ~17.)"""
    if valid.dim() != 2 or not len(att) == len(rep) == len(ids) or not enabled() or load() is None:
        return False
    n = valid.shape[0] * valid.shape[1]
    grad = torch.is_grad_enabled()
    width = 0
    for t in (query, *att, *rep):
        if not (t.is_cpu and t.dtype == torch.float32 and t.is_contiguous()) or (grad and t.requires_grad):
            return False
    for t in att:
        if t.dim() == 1:
            width += 1
        elif t.dim() == 2:
            width += t.shape[1]
        else:
            return False
    for t in rep:
        if t.dim() not in (1, 2):
            return False
    for i in ids:
        if not (i.is_cpu and i.dtype == torch.int64 and i.dim() == 1 and i.shape[0] == n):
            return False
    return (valid.dtype == torch.bool and valid.is_cpu and query.dim() == 2 and query.shape[0] == valid.shape[0]
            and query.shape[1] == width)


def attend(query: torch.Tensor, att: list[torch.Tensor], rep: list[torch.Tensor], ids: list[torch.Tensor],
           valid: torch.Tensor, ahead: int = AHEAD) -> torch.Tensor:
    """`reference.attend`'s contract: -> [C, sum d_r], per target the representation rows of its kept events
    summed with the softmax of their attention scores over its valid slots."""
    if not supports(query, att, rep, ids, valid):
        return reference.attend(query, att, rep, ids, valid)
    C, k = valid.shape
    valid, ids = valid.contiguous(), [i.contiguous() for i in ids]   # the tables and query are (supports)
    fields = len(att)
    dims = lambda ts: [1 if t.dim() == 1 else t.shape[1] for t in ts]  # noqa: E731
    out = torch.empty(C, sum(dims(rep)), dtype=torch.float32)
    arr = lambda ctype, xs: (ctype * fields)(*xs)  # noqa: E731
    bad = ctypes.c_int64(-1)
    f = load().kept_attention_f32(
        C, k, fields, arr(ctypes.c_void_p, [t.data_ptr() for t in att]), arr(ctypes.c_int64, [t.shape[0] for t in att]),
        arr(ctypes.c_int64, dims(att)), arr(ctypes.c_void_p, [t.data_ptr() for t in rep]),
        arr(ctypes.c_int64, [t.shape[0] for t in rep]), arr(ctypes.c_int64, dims(rep)),
        arr(ctypes.c_void_p, [i.data_ptr() for i in ids]), valid.data_ptr(), query.data_ptr(), out.data_ptr(),
        max(1, ahead), ctypes.byref(bad))
    if f >= 0:
        e = bad.value
        table, field = ("attention", f) if f < fields else ("representation", f - fields)
        tables = att if f < fields else rep
        raise IndexError(f"kept_attention: ids[{field}][{e}] = {int(ids[field][e])} (target {e // k}, slot {e % k}) is "
                         f"out of range for field {field}'s {table} table of {tables[field].shape[0]} rows")
    return out
