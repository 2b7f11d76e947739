"""Backend choice for top-k search: the Triton kernel for CUDA tensors; on CPU the exact path that measured
fastest on the machine the process runs on.

Why measure here: which CPU path wins depends on the CPU (vector width, FMA ports, caches, whether MKL runs
AVX-512) and on the shape. A rule measured on one machine was wrong on another (on an Intel Xeon the fused
kernel took 4.86 ms at L = 10k, C = 200, d = 64 against 2.66 ms for `topk_shared`, yet the AMD-made rule
ran it). So at the first call of a *shape class* the candidate paths are timed on synthetic data of that
class, and the fastest runs from then on; a path never runs where another candidate measured faster.

What is measured: for a class (layout, query rows, history length L, d, k, torch threads; rows, L and k in
power-of-2 / power-of-4 buckets, see `shape_class`) every candidate path of `CANDIDATES[layout]` runs on
standard-normal queries and keys of the class's representative shape (training layout: lengths uniform in
[L/2, L]), warm-up once, then in interleaved rounds (so a burst of load from other processes hits every path
alike) until each has MIN_REPS timings and TUNE_SECONDS have passed, or MAX_REPS rounds. The path with the
lowest median wins. To bound the cost: on a long history a path more than 4x behind the best on 1/8 of it
is not run on all of it, and a path twice as slow as the best at its best drops out of the rounds (its
figure is kept as "left_out_s"). A path whose indices disagree with the torch paths' on the synthetic data
(beyond the fused kernel's near-tie allowance) is never chosen. Paths that write the whole [rows, L] score
matrix are not candidates where it would exceed FULL_MATRIX_BYTES.

Candidates, each exact against `kernels/topk_attention/reference.py`:
- `fused`: `kernels/topk_attention/cpu.c` (`topk_fused`), scores and selects without writing the score
  matrix; on the AMD EPYC Zen 4 VM it won at every serving point but one (2x to 7x the best torch path at
  C = 200) and in the training layout at d = 16 and 32;
- `fused_int8`, `fused_bf16` (serving layout): the same kernel with its pass 1 forced to int8 or bf16 (the same
  result bit for bit), candidates where the build can run that pass and its own rule picks another for the class:
  the rule's thresholds (int8 from 64 queries and 4,096 events where bf16 is there too) were measured on a Zen 4
  VM, and on an Intel Xeon with VNNI int8 measured 1.1-1.5x faster below them (this module's tune, one thread,
  d = 33, the classes' synthetic shapes: C = 192, L = 640 0.44 against 0.49 ms, L = 2,560 0.55 against 0.80; C = 24,
  L = 164k 4.5 against 6.9);
- `shared` (serving layout): `retrieval.serving.topk_shared`, one matmul per history chunk + strided-block
  pruning; the fastest torch path at C = 200 (and the winner on an Intel Xeon at d = 64);
- `blocked` (serving layout): `retrieval.cpu.topk_blocked`, one matmul + block pruning; won for one query
  against a long, wide history (L = 100k, d = 64 on the Zen 4 VM: the kernel transposes all of it for
  one query);
- `chunked` (training layout): `retrieval.cpu.topk_chunked`, one history per query, pruned per chunk; won
  at d = 64.

The choices are cached in a JSON file beside the kernel build (`kernels.cbuild.cache_dir()`),
named by a hash of the CPU (model and flags), the kernel build and the torch version, so later processes on
the same machine read them instead of measuring again; it is rewritten atomically (temp file + rename, under
a file lock, merging what other processes added). Threads: one lock serialises tuning (a tune timed while
another runs would measure the contention); lookups of a tuned class take no lock.

RECSYS_TOPK_AUTOTUNE=0 turns measuring off (tests, reproducible runs): `fixed_choice`, the table of earlier
commits, measured on AMD EPYC VMs (docs/kernels.md), decides instead; it is not right on every CPU, which is
why measuring is the default.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from kernels import cbuild
from kernels.topk_attention import cpu as fused
from retrieval import lend
from retrieval.cpu import topk_blocked, topk_chunked
from retrieval.serving import topk_shared

log = logging.getLogger(__name__)

AUTOTUNE_ENV = "RECSYS_TOPK_AUTOTUNE"
TUNE_SECONDS = 0.4          # per class, beyond each path's warm-up run: the tune is paid once per machine
MIN_REPS, MAX_REPS = 3, 15
FULL_MATRIX_BYTES = 256 << 20
SYNTHETIC_BYTES = 128 << 20   # training layout: keys of the synthetic batch
PROBE_MIN_L = 4096
FUSED_MIN_ROWS = 8          # fixed rule: the fused kernel for >= 8 queries on one shared history,
FUSED_MAX_FEW = 2**18       # ... and for fewer while L * d <= FUSED_MAX_FEW (its transpose is cheap there)


def _serving_length(keys, lengths) -> int:
    """The shared history's events to search: its one length, within [0, L]."""
    return max(0, min(int(torch.as_tensor(lengths)), keys.shape[0]))


def _serving_shared(query, keys, lengths, k, segments=None):
    return topk_shared(query, keys[: _serving_length(keys, lengths)], k, segments)


def _serving_blocked(query, keys, lengths, k, segments=None):
    return topk_blocked(query, keys, int(torch.as_tensor(lengths)), k, segments)


def _fused(query, keys, lengths, k, segments=None):
    return fused.topk_fused(query, keys, lengths, k, segments)


PathFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def _fused_in(bits: int) -> PathFn:
    def run(query, keys, lengths, k, segments=None):
        return fused.topk_fused(query, keys, lengths, k, segments, bits=bits)
    return run


FUSED_BITS = {"fused_int8": 8, "fused_bf16": 16}   # the fused kernel's pass-1 variants (Candidates, above)
# Timed in this order: the usual winner first, so the others can be left out after a probe (see `measure`).
CANDIDATES: dict[str, dict[str, PathFn]] = {
    "serving": {"fused": _fused, **{name: _fused_in(bits) for name, bits in FUSED_BITS.items()},
                "shared": _serving_shared, "blocked": _serving_blocked},
    "training": {"fused": _fused, "chunked": topk_chunked},
}


def autotune_enabled() -> bool:
    return cbuild.switch_on(AUTOTUNE_ENV)


def _bucket(x: int, base: int) -> int:
    """Smallest power of `base` >= x (1 for x <= 1): the class's upper edge."""
    return 1 if x <= 1 else base ** math.ceil(math.log(x, base) - 1e-9)


def shape_class(serving: bool, rows: int, L: int, d: int, k: int, threads: int | None = None) -> str:
    """The key a choice is cached under. Rows and k in powers of 2, L in powers of 4 (cost is about linear
    in L within a class), d exact (the kernel's vector loop depends on it), the torch thread count."""
    threads = torch.get_num_threads() if threads is None else threads
    return "|".join(map(str, ("serving" if serving else "training", _bucket(rows, 2), _bucket(L, 4), d,
                              _bucket(k, 2), threads)))


def _representative(cls: str) -> tuple[str, int, int, int, int]:
    """A class's synthetic shape: the geometric middle of its rows and L buckets, the top of its k bucket."""
    layout, rows, L, d, k, _ = cls.split("|")
    rows, L = int(rows), int(L)
    return layout, max(1, rows * 3 // 4), max(1, L * 5 // 8), int(d), int(k)


def _inputs(layout: str, rows: int, L: int, d: int):
    gen = torch.Generator().manual_seed(rows * 1_000_003 + L * 31 + d)
    q = torch.randn(rows, d, generator=gen)
    if layout == "serving":
        return q, torch.randn(L, d, generator=gen), L
    return q, torch.randn(rows, L, d, generator=gen), torch.randint(L // 2, L + 1, (rows,), generator=gen)


def runnable(name: str, rows: int, L: int, d: int) -> bool:
    """Whether path `name` can run a call of this shape here (what a cached choice is checked against per call)."""
    if name.startswith("fused"):
        return fused.available() and (name not in FUSED_BITS or fused.pass1_can(rows, d, FUSED_BITS[name]))
    # blocked writes the whole score matrix: slower there anyway, and the memory is real
    return not (name == "blocked" and rows * L * 4 > FULL_MATRIX_BYTES)


def candidates(layout: str, rows: int, L: int, d: int) -> dict[str, PathFn]:
    """The paths a class's tune times: those that can run, less a pass-1 variant that is the kernel's own rule there."""
    return {name: fn for name, fn in CANDIDATES[layout].items() if runnable(name, rows, L, d)
            and not (name in FUSED_BITS and fused.pass1_bits(rows, d, length=L) == FUSED_BITS[name])}


def fixed_choice(serving: bool, rows: int, L: int, d: int) -> str:
    """The rule when measuring is off (docs/kernels.md has the figures it comes from)."""
    if not serving:
        return "chunked"
    if not fused.available():
        return "shared"
    return "fused" if rows >= FUSED_MIN_ROWS or L * d <= FUSED_MAX_FEW else "blocked"


def _time(fn: PathFn, args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def _agrees(got: torch.Tensor, want: torch.Tensor) -> bool:
    """The fused kernel sums in its own order: a near-tie may swap (tests/test_topk_cpu_fused.py allows
    2 + 2% of the entries); a wrong path differs nearly everywhere."""
    return int((got != want).sum()) <= 2 + want.numel() // 50


def measure(cls: str) -> dict:
    """Time every candidate path on synthetic data of class `cls` -> {"path": winner, "median_s": {...}}."""
    started = time.perf_counter()
    layout, rows, L, d, k = _representative(cls)
    if layout == "training":   # rows are independent there: fewer of them rank the paths alike
        rows = max(1, min(rows, SYNTHETIC_BYTES // (4 * L * d)))
    q, keys, lengths = _inputs(layout, rows, L, d)
    args = (q, keys, lengths, k)
    paths = candidates(layout, rows, L, d)
    times: dict[str, list[float]] = {}
    out: dict[str, float] = {}   # paths left out: their (estimated) seconds
    results, best = {}, math.inf
    for name, fn in paths.items():
        if L >= 8 * PROBE_MIN_L:   # a long history: a path far behind on 1/8 of it is not run on all of it
            cut = L // 8
            part = (q, keys[:cut], cut, k) if layout == "serving" else (q, keys[:, :cut], lengths.clamp(max=cut), k)
            fn(*part)
            estimate = 8 * _time(fn, part)
            if estimate > 4 * best:
                out[name] = estimate
                continue
        t0 = time.perf_counter()   # warm-up (first-touch allocations, the kernel's workspace)
        results[name] = fn(*args)[1]
        best = min(best, time.perf_counter() - t0)
        times[name] = []
    exact = next((idx for name, idx in results.items() if not name.startswith("fused")), None)   # torch: the reference's
    for name, idx in results.items():
        if exact is not None and not _agrees(idx, exact):
            log.warning("top-k path %s disagrees with the torch paths on class %s: not a candidate", name, cls)
            del times[name]
    t0 = time.perf_counter()
    for rnd in range(MAX_REPS):
        for name in times:
            times[name].append(_time(paths[name], args))
        elapsed = time.perf_counter() - t0
        if (rnd + 1 >= MIN_REPS and elapsed > TUNE_SECONDS) or elapsed > 3 * TUNE_SECONDS:
            break
        if rnd >= 1:   # a path twice as slow as the best at its best is out: no load burst reverses that
            best = min(min(t) for t in times.values())
            out.update({n: statistics.median(t) for n, t in times.items() if min(t) > 2 * best})
            times = {n: t for n, t in times.items() if n not in out}
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {"path": min(medians, key=medians.get), "median_s": medians, "left_out_s": out,
            "rows": rows, "L": L, "k": k, "reps": {name: len(t) for name, t in times.items()},
            "tune_s": time.perf_counter() - started}


class _Cache:
    """Choices per class: in memory, and in a JSON file shared by the processes of this machine.

    Deferred mode (a server: `defer_tuning`): a class not yet measured is answered with `fixed_choice` at
    once and measured on a background thread, so no request waits the 0.02-0.8 s of a tune (a first
    request of a new class at L = 100k waited ~0.8 s); later requests run the measured path."""

    def __init__(self):
        self.lock = threading.Lock()
        self.choices: dict[str, dict] = {}
        self.loaded_from: Path | None = None
        self.defer = False
        self.queue: list[str] = []               # classes waiting for the background thread, oldest first
        self.queued: set[str] = set()
        self.wake = threading.Condition()
        self.worker: threading.Thread | None = None

    def choose_now(self, cls: str) -> str | None:
        """Deferred mode: the measured path, or None (the caller runs the fixed rule) while `cls` waits."""
        hit = self.choices.get(cls)
        if hit is not None:
            return hit["path"]
        if self.lock.acquire(blocking=False):   # busy: the worker is measuring, and will merge the file
            try:
                self._load(self.path())
            finally:
                self.lock.release()
            hit = self.choices.get(cls)
            if hit is not None:
                return hit["path"]
        self.later(cls)
        return None

    def _load(self, path: Path) -> None:
        """Merge the machine's cache file once per path (another process may have measured). Under self.lock."""
        if self.loaded_from != path:
            self.choices.update(self._read(path))
            self.loaded_from = path

    def later(self, cls: str) -> None:
        with self.wake:
            if cls in self.queued or cls in self.choices:
                return
            self.queued.add(cls)
            self.queue.append(cls)
            if self.worker is None or not self.worker.is_alive():
                self.worker = threading.Thread(target=self._drain, name="topk-dispatch-tune", daemon=True)
                self.worker.start()

    def _drain(self) -> None:
        while True:
            with self.wake:
                if not self.queue:
                    self.worker = None
                    return
                cls = self.queue.pop(0)
            try:
                self.choose(cls)
            except Exception:  # noqa: BLE001 - a failed tune leaves the fixed rule in place for that class
                log.exception("top-k dispatch: tuning %s failed; the fixed rule stays", cls)
            finally:
                with self.wake:
                    self.queued.discard(cls)
                    self.wake.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Until the background thread has measured every queued class (tests, benchmarks' warm-up)."""
        with self.wake:
            return self.wake.wait_for(lambda: not self.queue and not self.queued, timeout)

    def path(self) -> Path:
        key = f"{cbuild.cpu_signature()}\n{fused.build_tag()}\n{torch.__version__}"
        tag = hashlib.sha256(key.encode()).hexdigest()[:16]
        return cbuild.cache_dir() / f"topk_dispatch_{tag}.json"

    def _read(self, path: Path) -> dict:
        try:
            return json.loads(path.read_text()).get("choices", {})
        except (OSError, ValueError, AttributeError):
            return {}

    def choose(self, cls: str) -> str:
        hit = self.choices.get(cls)
        if hit is not None:
            return hit["path"]
        with self.lock:
            path = self.path()
            self._load(path)
            if cls not in self.choices:
                result = measure(cls)
                log.info("top-k dispatch %s -> %s (%s)", cls, result["path"], ", ".join(
                    f"{n} {s * 1e3:.3f} ms" for n, s in {**result["left_out_s"], **result["median_s"]}.items()))
                self.choices[cls] = result
                self._write(path, cls, result)
            return self.choices[cls]["path"]

    def _write(self, path: Path, cls: str, result: dict) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path.with_suffix(".lock"), "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)   # read-merge-write: another process's classes are kept
                merged = {**self._read(path), cls: result}
                body = {"cpu": fused.cpu_model(), "kernel_build": fused.build_tag(), "torch": torch.__version__,
                        "choices": merged}
                with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as tmp:
                    json.dump(body, tmp, indent=1, sort_keys=True)
                os.replace(tmp.name, path)   # readers see the old file or the new one, never a part
                self.choices.update(merged)
        except OSError as e:   # a read-only cache folder: keep the choice for this process only
            log.warning("top-k dispatch cache %s not written: %s", path, e)

    def clear(self) -> None:
        with self.lock:
            self.choices.clear()
            self.loaded_from = None


_cache = _Cache()


def defer_tuning(on: bool = True) -> None:
    """Servers: never measure inside a call; unmeasured classes run the fixed rule and are measured on a
    background thread (`_Cache`)."""
    _cache.defer = on


def wait_tuned(timeout: float = 60.0) -> bool:
    """Until the background thread is idle -> False on timeout."""
    return _cache.wait_idle(timeout)


def tune(serving: bool, rows: int, L: int, d: int, k: int) -> str:
    """Measure (or read) the class of this shape now, e.g. at a server's start, so that no request pays for
    it -> the path chosen."""
    if not autotune_enabled() or rows == 0 or L == 0:
        return fixed_choice(serving, rows, L, d)
    return _cache.choose(shape_class(serving, rows, L, d, k))


def choose(query: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor | int, k: int) -> str:
    """The CPU path `topk` runs for these inputs: a key of `CANDIDATES[layout]`."""
    serving = keys.dim() == 2
    rows, L, d = query.shape[0], keys.shape[-2], query.shape[-1]
    if not autotune_enabled() or rows == 0 or L == 0:
        return fixed_choice(serving, rows, L, d)
    cls = shape_class(serving, rows, L, d, k)
    name = _cache.choose_now(cls) if _cache.defer else _cache.choose(cls)
    if name is None:
        return fixed_choice(serving, rows, L, d)
    layout = "serving" if serving else "training"
    return name if name in CANDIDATES[layout] and runnable(name, rows, L, d) else fixed_choice(serving, rows, L, d)


@torch.no_grad()
def topk(
    query: torch.Tensor,
    keys: torch.Tensor,
    lengths: torch.Tensor | int,
    k: int,
    segments: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k history events per query by split-scaled dot product.

    Training layout: query [B, d], keys [B, L, d], lengths [B] -> scores, indices [B, k].
    Serving layout:  query [C, d], keys [L, d],    lengths int -> scores, indices [C, k].
    Semantics of kernels/topk_attention/reference.py: events at index >= length are masked, ties go to
    the lower index, slots beyond min(k, length) hold index -1 and score -inf; scores are fp32. The
    indices are the reference's; the scores equal it bit for bit on the torch paths and to fp32 rounding
    on the fused kernels (they sum the d products in their own order).

    For picking indices only: the returned scores carry no gradient. Callers that train through the
    kept scores recompute them from the gathered keys.
    """
    if query.is_cuda:
        # Imported here so CPU-only processes never load triton.
        from kernels.topk_attention.triton import topk_triton

        return topk_triton(query, keys, lengths, k, segments)
    shared = keys.dim() == 2 and query.dim() == 2 and torch.as_tensor(lengths).numel() == 1
    if not shared:
        if keys.dim() != 3 or query.dim() != 2:   # let the torch path name the bad shape
            return topk_chunked(query, keys, lengths, k, segments)
        if torch.as_tensor(lengths).numel() != query.shape[0]:
            return topk_chunked(query, keys, lengths, k, segments)
    layout = "serving" if shared else "training"
    name = choose(query, keys, lengths, k)
    lender = lend.current()
    if lender is not None and shared and name.startswith("fused"):   # a service batch with a core to spare (retrieval.lend)
        found = lender.search(query, keys, _serving_length(keys, lengths), k, segments, FUSED_BITS.get(name, 0))
        if found is not None:
            return found
    return CANDIDATES[layout][name](query, keys, lengths, k, segments)
