"""The fused CPU top-k search (`cpu.c`): compiled once per machine, called through ctypes.

`topk_fused(query, keys, lengths, k, segments)` has the semantics of `reference.topk_reference`:
indices equal the reference's (ties -> lower index) and scores equal it to fp32 rounding (the kernel
sums the d products in its own fixed order, identical in both layouts; inputs whose every score is exact give
bit-equal scores). Rows with a NaN/inf input, or whose scores could overflow fp32, are recomputed by the
reference (the kernel flags them instead of testing every score).

The C source is built once per machine by `kernels.cbuild` (the system C compiler, -march=native, a
cache folder shared by concurrent processes and workers).
Where the CPU has AVX512_VNNI, pass 1 of a serving call with >= 64 queries and >= 4096 events (>= 32 queries and
any length without AVX512_BF16) scores in int8, else where it has AVX512_BF16 (>= 16 queries) in bf16; with AVX2 and
no AVX-512 (>= 128 queries and >= 16384 events) in int8 with queries within +-63 (vpmaddubsw's int16 pairs must not
saturate). Each has a proven error bound, and pass 2 rescores in fp32, so the result is the fp32 kernel's bit for bit
(`pass1_bits`, cpu.c's header).
`available()` says whether the kernel loaded; `retrieval.dispatch` falls back to torch when it did not. `Team` lets a
second thread join one serving call as it runs (retrieval.lend), without OpenMP.
ctypes releases the GIL for the call, so concurrent requests score in parallel.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import platform
from pathlib import Path
from typing import Sequence

import torch

from kernels import cbuild, team
from kernels.topk_attention.reference import segment_scale, topk_reference

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu.c")
TEAM_HEADER = Path(__file__).parents[1] / "team.h"
MAX_K = 4096  # the kept lists live in the workspace, so any k works; this bounds a mistaken argument


def build(extra_flags: Sequence[str] = ()) -> Path:
    """Compile cpu.c for this machine (or find the cached build, `kernels.cbuild`) -> the shared library's
    path. `extra_flags` narrow the target for tests (`-mno-avx512f` builds the 8-lane variant that CPUs
    without AVX-512 run)."""
    return cbuild.build(SOURCE, "topk", extra_flags, [TEAM_HEADER])


_loaded: dict[tuple[str, ...], Path] = {}


@functools.lru_cache(maxsize=None)
def load(extra_flags: tuple[str, ...] = ()):
    """The kernel built with FLAGS + extra_flags, loaded; None (logged once) when it cannot be built here."""
    try:
        path = build(extra_flags)
        lib = ctypes.CDLL(str(path))
        _loaded[extra_flags] = path
    except Exception as e:  # noqa: BLE001 - any build/load failure means: use the torch path
        log.warning("fused CPU top-k kernel unavailable, using the torch path: %s", e)
        return None
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.topk_search.argtypes = [p, p, i64, i64, i64, p, i32, i32, i32, p, p, p, i32, i32]
    lib.topk_search.restype = i32
    lib.topk_pass1_bits.argtypes = [i32, i32, i64, i64]
    lib.topk_pass1_bits.restype = i32
    lib.topk_pass1_can.argtypes = [i32, i32, i64, i32]
    lib.topk_pass1_can.restype = i32
    lib.topk_int8_amx.argtypes = []
    lib.topk_int8_amx.restype = i32
    lib.topk_search_team.argtypes = [p, p, i64, i64, i64, p, i32, i32, i32, p, p, p, p, i32]
    lib.topk_search_team.restype = i32
    lib.topk_team_join.argtypes = [p]
    lib.topk_team_join.restype = i32
    lib.topk_team_close.argtypes = [p]
    lib.topk_team_close.restype = None
    return lib


def _lib():
    return load()


class Team(team.Team):
    """Two threads on one serving-layout search (`kernels.team`): the thread calling `topk_fused(..., team=team)`
    and the member. Both take pass 1's blocks and pass 2's rows in chunks; the result is the one-thread search's
    bit for bit (the same scoring chain per event; each row's candidates ranked once)."""

    def __init__(self, build: tuple[str, ...] = ()):
        self.build = build
        lib = load(build) if build else _lib()
        if lib is None:
            raise RuntimeError("fused CPU top-k kernel unavailable (see the log)")
        super().__init__(lib.topk_team_join, lib.topk_team_close)


def available() -> bool:
    return _lib() is not None


def build_tag() -> str:
    """The loaded build's name (a hash of source, flags, compiler and CPU), "none" without one: measurements
    of the kernel are valid for this build only."""
    return _loaded[()].stem if available() and () in _loaded else "none"


def pass1_bits(rows: int, d: int, serving: bool = True, length: int = 1 << 20) -> int:
    """8 when the loaded build scores pass 1 of such a call (`length`: the history's events) in int8 (AVX512_VNNI
    targets, where bf16 is there too from 4096 events; AVX2 targets without AVX-512 from 128 rows and 16384 events),
    16 in bf16 (AVX512_BF16 targets), all for the serving layout with enough rows (pass 2 and the result stay fp32),
    else 32."""
    lib = _lib()
    if lib is None:
        raise RuntimeError("fused CPU top-k kernel unavailable (see the log)")
    return int(lib.topk_pass1_bits(rows, d, 0 if serving else 1, length))


def pass1_can(rows: int, d: int, bits: int, serving: bool = True) -> bool:
    """Whether the loaded build can run pass 1 of such a call in `bits` (8, 16 or 32) when `topk_fused(..., bits=...)`
    asks for it, whatever `pass1_bits` would choose (its thresholds were measured on one CPU; retrieval.dispatch
    measures the variants where it runs)."""
    lib = _lib()
    return lib is not None and bool(lib.topk_pass1_can(rows, d, 0 if serving else 1, bits))


def int8_amx(build: tuple[str, ...] = ()) -> bool:
    """Whether that build's int8 pass 1 multiplies on AMX tiles here (AMX-INT8 CPUs, d <= 64; the scores it keeps are
    vpdpbusd's to the bit)."""
    lib = load(build) if build else _lib()
    return lib is not None and bool(lib.topk_int8_amx())


def cpu_model() -> str:
    for line in cbuild.cpu_signature().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=256)
def _scale(d: int, segments: tuple[int, ...] | None) -> torch.Tensor:
    return segment_scale(d, segments)


def _threads(rows: int, work: int) -> int:
    # Waking the OpenMP team costs microseconds: below ~2M multiply-adds one thread finishes first.
    return max(1, min(torch.get_num_threads(), rows, work // 2_000_000 + 1))


@torch.no_grad()
def topk_fused(
    query: torch.Tensor,
    keys: torch.Tensor,
    lengths: torch.Tensor | int,
    k: int,
    segments: Sequence[int] | None = None,
    *,
    build: tuple[str, ...] = (),
    team: Team | None = None,
    bits: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training layout: query [B, d], keys [B, L, d], lengths [B] -> scores, indices [B, k].
    Serving layout:  query [C, d], keys [L, d],    lengths int -> scores, indices [C, k].
    `build`: extra flags of the build to run (`load`), e.g. ("-mno-avx512vnni",) for the bf16 pass 1 where the
    default build runs int8: benchmarks compare them (the results are the same bit for bit). `team`: a
    serving-layout search on this thread and the team's member (`Team`, of the same build; retrieval.lend), else
    on torch's threads. The kernel closes the team when it returns; the caller closes it again whatever happened
    (an error raised here before the kernel leaves it open). `bits`: pass 1 in 8 (int8), 16 (bf16) or 32 bits where
    the build can (`pass1_can`; the result is the same bit for bit), 0: the build's rule (`pass1_bits`)."""
    if team is not None and team.build != build:
        raise ValueError(f"the team runs build {team.build}, the search {build}")
    lib = load(build) if build else _lib()
    if lib is None:
        raise RuntimeError("fused CPU top-k kernel unavailable (see the log); use retrieval.topk")
    if query.device.type != "cpu" or keys.device.type != "cpu":
        raise ValueError("topk_fused takes CPU tensors")
    if not 0 < k <= MAX_K:
        raise ValueError(f"k must be in 1..{MAX_K}, got {k}")
    serving = keys.dim() == 2
    d = query.shape[-1]
    if query.dim() != 2 or keys.shape[-1] != d or (not serving and (keys.dim() != 3 or keys.shape[0] != query.shape[0])):
        raise ValueError(f"query {tuple(query.shape)} must be [rows, d] with keys [L, d] or [rows, L, d], got keys {tuple(keys.shape)}")
    R, L = query.shape[0], keys.shape[-2]
    if serving:  # one history, one length: the kernel reads one
        if not isinstance(lengths, int):
            lens = torch.as_tensor(lengths).reshape(-1)
            if lens.numel() == 0 or not bool((lens == lens[0]).all()):
                raise ValueError("serving layout (keys [L, d]) takes one length for the shared history")
            lengths = int(lens[0])
        n = torch.tensor([min(max(lengths, 0), L)], dtype=torch.int64)
    else:
        n = torch.as_tensor(lengths).reshape(-1).to(torch.int64)
        if n.numel() != R:
            raise ValueError(f"lengths has {n.numel()} entries, expected {R}")
        n = n.clamp(0, L).contiguous()
    q = (query.float() * _scale(d, None if segments is None else tuple(segments))).contiguous()  # the reference's
    x = keys if keys.dtype == torch.float32 else keys.float()
    if not serving and x.stride(0) == 0:
        x = x.contiguous()
    scores = torch.empty(R, k, dtype=torch.float32)
    idx = torch.empty(R, k, dtype=torch.int64)
    bad = torch.empty(R, dtype=torch.uint8)  # every row's flag is written
    n_bad = 0
    if R:
        args = (q.data_ptr(), x.data_ptr(), 0 if serving else x.stride(0), x.stride(-2), x.stride(-1),
                n.data_ptr(), R, d, k, scores.data_ptr(), idx.data_ptr(), bad.data_ptr())
        if team is not None:
            n_bad = lib.topk_search_team(*args, team.ref, bits)
        else:
            n_bad = lib.topk_search(*args, _threads(R, R * L * d), bits)
        if n_bad == -2:
            raise ValueError(f"topk_fused takes histories shorter than 2^31 - 128 events, got {int(n.max())}")
        if n_bad == -3:
            raise ValueError(f"this kernel build cannot run pass 1 in {bits} bits for {R} rows of width {d} "
                             f"({'serving' if serving else 'training'} layout): see pass1_can")
        if n_bad < 0:
            raise MemoryError("topk_search: out of memory")
    if n_bad:  # non-finite inputs (rare): the reference's stable sort decides where they go
        rows = bad.nonzero().flatten()
        sub_keys = keys if serving else keys[rows]
        sub_len = int(n[0]) if serving else n[rows]
        scores[rows], idx[rows] = topk_reference(query[rows], sub_keys, sub_len, k, segments)
    return scores, idx
