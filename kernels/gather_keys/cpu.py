"""The stage-1 key gather in C (`cpu.c`), float32 on CPU: every event's output row written once from its
fields' table rows, the rows a few events ahead prefetched. torch's form (`reference.py`) gathers field by
field into strided column slices, ~21 ns per random 64-byte row on a Zen 4 VM.

`gather_keys` runs the kernel where `supports` says it can, else the reference; the result is the same bits
either way (a gather is a copy). RECSYS_GATHER_KEYS_KERNEL=0 in the environment (read per call) keeps
every call on the reference: the switch that tests and A/B runs use.

Ids are checked against their tables in the kernel, before any row is read: an id out of range raises
IndexError (torch's type for it) naming the field and the event. Callers pass vocabulary rows and
position rows, always in range; the check costs one compare per id.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from kernels import cbuild, team
from kernels.gather_keys import reference


SOURCE = Path(__file__).with_name("cpu.c")
TEAM_HEADER = Path(__file__).parents[1] / "team.h"
SWITCH_ENV = "RECSYS_GATHER_KEYS_KERNEL"
# Events ahead whose rows are prefetched (benchmarks/gather_keys.py measures the distance): see docs/kernels.md.
AHEAD = 16


@functools.cache
def load():
    """The built library, or None (logged once) when it cannot be built here."""
    lib = cbuild.open_library(SOURCE, "gather_keys", "the torch path", includes=[TEAM_HEADER])
    if lib is None:
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.gather_keys_f32.argtypes = [i64, i64, p, p, p, p, p, i64, i64, p]
    lib.gather_keys_f32.restype = i64
    lib.gather_keys_team.argtypes = [i64, i64, p, p, p, p, p, i64, i64, p, p]
    lib.gather_keys_team.restype = i64
    lib.gather_team_join.argtypes = [p]
    lib.gather_team_join.restype = ctypes.c_int
    lib.gather_team_close.argtypes = [p]
    lib.gather_team_close.restype = None
    return lib


class Team(team.Team):
    """Two threads on one gather (`kernels.team`): the thread calling `gather_keys(..., team=team)` and the
    member, taking chunks of events in turn. The same bits as one thread (a gather is a copy)."""

    def __init__(self):
        lib = load()
        if lib is None:
            raise RuntimeError("C key gather unavailable (see the log)")
        super().__init__(lib.gather_team_join, lib.gather_team_close)


def enabled() -> bool:
    return cbuild.switch_on(SWITCH_ENV)


def supports(tables: list[torch.Tensor], ids: list[torch.Tensor]) -> bool:
    """Whether the kernel runs these fields: CPU float32 contiguous tables ([rows, d] or [rows]), int64 ids
    of one length, nothing for autograd to record, the switch on and a build."""
    n = ids[0].shape[0]
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tables)
    return (not grad and len(tables) == len(ids) and enabled()
            and all(t.device.type == "cpu" and t.dtype == torch.float32 and t.dim() in (1, 2) and t.is_contiguous()
                    for t in tables)
            and all(i.device.type == "cpu" and i.dtype == torch.int64 and i.dim() == 1 and i.shape[0] == n
                    for i in ids)
            and load() is not None)


def gather_keys(tables: list[torch.Tensor], ids: list[torch.Tensor], ahead: int = AHEAD,
                out: torch.Tensor | None = None, team: Team | None = None) -> torch.Tensor:
    """`reference.gather_keys`' contract: field f's table rows at ids[f] side by side, [L, sum d]; into
    `out` (contiguous, that shape) when given (the benchmark's gather without the allocation's page faults).
    `team`: the team's member takes chunks of the events too (retrieval.lend); the kernel closes it when it
    returns, and the caller closes it again whatever happened."""
    if not supports(tables, ids):
        return reference.gather_keys(tables, ids, out)
    ids = [i.contiguous() for i in ids]
    fields = len(tables)
    dims = [1 if t.dim() == 1 else t.shape[1] for t in tables]
    if out is None:
        out = torch.empty(ids[0].shape[0], sum(dims), dtype=torch.float32)
    elif not (out.is_contiguous() and out.dtype == torch.float32 and out.shape == (ids[0].shape[0], sum(dims))):
        raise ValueError(f"gather_keys: out must be contiguous float32 [{ids[0].shape[0]}, {sum(dims)}]")
    arr = lambda ctype, xs: (ctype * fields)(*xs)  # noqa: E731
    bad = ctypes.c_int64(-1)
    args = (out.shape[0], fields, arr(ctypes.c_void_p, [t.data_ptr() for t in tables]),
            arr(ctypes.c_int64, [t.shape[0] for t in tables]), arr(ctypes.c_int64, dims),
            arr(ctypes.c_void_p, [i.data_ptr() for i in ids]), out.data_ptr(), out.shape[1], max(0, ahead),
            ctypes.byref(bad))
    f = load().gather_keys_f32(*args) if team is None else load().gather_keys_team(*args, team.ref)
    if f >= 0:
        j = bad.value
        raise IndexError(f"gather_keys: ids[{f}][{j}] = {int(ids[f][j])} is out of range for field {f}'s "
                         f"table of {tables[f].shape[0]} rows")
    return out
