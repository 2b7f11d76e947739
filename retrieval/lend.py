"""An idle core lent to a serving search: the history searched in parts by two threads, the results merged.

A service scoring on one thread per micro-batch leaves a core idle while fewer batches run than it has
cores (one client; any quiet moment). `CoreLender` knows how many batches run: inside `scoring()`, a
serving-layout search by the fused kernel (`retrieval.dispatch.topk`) large enough to pay for the hand-off
borrows one idle core. The history is cut into an even number of consecutive parts (4 at 100k events, 16
from 393k on), which this thread and the lent one take in turn; the parts' top-k lists are merged. Nothing else of
the forward is split: the search is most of it at long histories.

Why not the OpenMP team (torch_threads = 2): its threads spin between parallel regions, taking the CPU that
the event loop, Redis and the client need between and beside the forward's many small ops, and a team
member preempted by them holds the others at the kernel's barrier (Zen 3, L = 10k, C = 200: HTTP p50 9.88
ms with two threads against 7.94 with one, README). Here the lent thread sleeps until a search arrives, and
when it is slow or busy elsewhere this thread takes the parts it has not: a search waits at most for the one
part the lent thread is in, never for a core that has not started.

Exact: the fused kernel scores each event by the same fp32 chain wherever it sits in the history, and the k
best of the whole are among the k best of their parts, so the merge by (score desc, index asc) is the
unsplit search's result bit for bit (tests/test_lend.py). Rows that the kernel hands to the reference
(non-finite or near-overflow inputs) in any part are searched again whole by the reference, as the unsplit
call does.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import torch

from kernels.topk_attention import cpu as fused
from kernels.topk_attention.reference import topk_reference

# Where a lent search pays (benchmarks/lend_search.py --part-events 16384 32768 at 8f14fca, `git show
# eb76296:results/lend_search_zen3.json`: Zen 3 VM, quiet, one torch thread, d = 33; whole / lent search):
# C = 200: 1k-4k 0.56-0.77x, 10k 0.95-1.15x, 30k 1.06-1.15x, 100k 0.99x with 16,384-event parts and 1.22x with
# 32,768 (lent core busy with another process: 0.93x and 1.27x); C = 20: 0.25-0.98x everywhere. Each part pays
# the kernel's per-call cost (per-row selection and pass 2: a whole search of 1k events at C = 200 takes ~0.5 ms,
# yet a 2k part 1.1-1.4 ms beside the other), and on this VM two threads of one process slow each other (~1.2-1.4x
# a part); the hand-off itself is ~75 us (p50). So: at least two parts of PART_EVENTS, and enough work per part.
SPLIT_MIN_WORK = 1 << 27   # rows x events x d (C = 200, d = 33: 20k events)
MAX_PARTS = 16             # a slow lent thread holds up a search by at most one part
ALIGN = 64                 # parts start on the kernel's block boundaries: no block is cut in two
# A part's events: each part costs a kernel call and its own pass 2 (~k sub-blocks a row), and from 16,384 events on
# a part runs the int8 pass 1 (its shortest history on AVX2, 4,096 with AVX-512; cpu.c INT8_MIN_LEN). An even
# number of parts, so that two threads end together: at 100k events, C = 200, whole / lent 1.41x with 4 parts of
# 25k, 1.20-1.22x with 3 of 33k, 1.08-1.31x with 6 of 16.7k (two runs of 20 each, Zen 3 VM, quiet).
PART_EVENTS = 24576
SPLIT_MIN_EVENTS = 2 * PART_EVENTS

_current: contextvars.ContextVar[CoreLender | None] = contextvars.ContextVar("core_lender", default=None)


def current() -> CoreLender | None:
    """The lender of the batch this thread is scoring, if any."""
    return _current.get()


class CoreLender:
    """Cores the process may use, `cores`, of which each batch in `scoring()` takes `threads_per_batch`;
    while at least one more is free, one search at a time may borrow it."""

    def __init__(self, cores: int, threads_per_batch: int = 1, on_split: Callable[[int, int], None] | None = None):
        self.cores, self.threads_per_batch = cores, threads_per_batch
        self._on_split = on_split   # after each split search: (parts the lent thread searched, parts searched here)
        self._lock = threading.Lock()
        self._batches = 0
        self._lent = False
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="lent-core")
        self._lent_tid = self._pool.submit(threading.get_native_id).result()
        self._cpus = os.sched_getaffinity(0)
        self.splits = 0      # searches that ran in parts
        self.parts_lent = 0  # parts the lent thread searched
        self.parts_here = 0  # parts the batches' own threads searched

    @contextlib.contextmanager
    def scoring(self) -> Iterator[None]:
        """A batch scoring in this thread: it occupies its threads, and its searches may borrow an idle core."""
        with self._lock:
            self._batches += 1
        token = _current.set(self)
        try:
            yield
        finally:
            _current.reset(token)
            with self._lock:
                self._batches -= 1

    def _borrow(self) -> bool:
        with self._lock:
            if self._lent or self._batches * self.threads_per_batch + 1 > self.cores:
                return False
            self._lent = True
            return True

    def _give_back(self) -> None:
        with self._lock:
            self._lent = False

    def search(self, query: torch.Tensor, keys: torch.Tensor, n: int, k: int,
               segments) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The fused kernel's serving-layout top-k (query [C, d], keys [L, d], length n) with an idle core helping,
        or None when no core is free or the search is too small to split (the caller then runs it whole). The
        history is cut into `parts(n)` consecutive parts that this thread and the lent one take in turn, oldest
        first: if the lent core is slow or busy elsewhere, this thread searches the rest, and waits at most for
        the one part the lent thread is in."""
        if not worth_splitting(query.shape[0], n, query.shape[1]):
            return None
        bounds = parts(n)
        if len(bounds) < 3 or not self._borrow():
            return None
        m = len(bounds) - 1
        found: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * m
        bad = torch.zeros(m, query.shape[0], dtype=torch.bool)
        taken = itertools.count()   # next() is atomic under the GIL: each part goes to one thread

        def work() -> int:
            done = 0
            while (i := next(taken)) < m:
                a, b = bounds[i], bounds[i + 1]
                found[i] = fused.topk_fused(query, keys[a:b], b - a, k, segments, bad_rows=bad[i])
                done += 1
            return done

        inference = torch.is_inference_mode_enabled()   # thread-local: the lent thread takes the caller's

        def lent_work() -> int:
            try:
                with torch.inference_mode(inference):
                    return work()
            finally:
                self._give_back()

        self._elsewhere()
        try:
            lent = self._pool.submit(lent_work)
        except BaseException:
            self._give_back()
            raise
        here = work()
        if lent.cancel():   # never started (the lent core is busy elsewhere): this thread searched every part
            self._give_back()
            there = 0
        else:
            there = lent.result()
        with self._lock:
            self.splits += 1
            self.parts_lent += there
            self.parts_here += here
        if self._on_split is not None:
            self._on_split(there, here)
        return merge(found, bounds, bad.any(0), query, keys[:n], n, k, segments)

    def _elsewhere(self) -> None:
        """Keep the lent thread off this thread's CPU. Woken by this thread, the scheduler would queue it on this
        CPU (wake-affine), behind this thread's own part, until a balance moved it: two threads of one process
        searching at once took 3.0 and 4.0 ms a part where pinned apart they took 2.7 and 2.8 (Zen 3 VM; two
        processes were not affected)."""
        cpu = _sched_getcpu()
        if cpu in self._cpus and len(self._cpus) > 1:
            try:
                os.sched_setaffinity(self._lent_tid, self._cpus - {cpu})
            except OSError:   # a CPU set changed under us (cgroup): leave the placement to the scheduler
                pass

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _load_sched_getcpu() -> Callable[[], int]:
    try:
        fn = ctypes.CDLL(None, use_errno=True).sched_getcpu
        fn.restype = ctypes.c_int
        return fn
    except (OSError, AttributeError):   # not glibc / not Linux: no placement
        return lambda: -1


_sched_getcpu = _load_sched_getcpu()


def worth_splitting(rows: int, n: int, d: int) -> bool:
    """Whether a search of `rows` queries over n events of d dims pays for a lent core (see SPLIT_MIN_WORK)."""
    return n >= SPLIT_MIN_EVENTS and rows * n * d >= SPLIT_MIN_WORK


def parts(n: int) -> list[int]:
    """Bounds of the parts a lent search cuts a history of n events into: n // PART_EVENTS of them rounded down to
    an even number, at least 2 and at most MAX_PARTS, on the kernel's block boundaries; [0, n] where two
    block-aligned parts do not fit."""
    m = max(2, min(MAX_PARTS, n // PART_EVENTS) // 2 * 2)
    bounds = sorted({min(n, round(i * n / m / ALIGN) * ALIGN) for i in range(m)} | {n})
    return bounds if len(bounds) >= 3 and bounds[1] > 0 else [0, n]


def merge(found: list[tuple[torch.Tensor, torch.Tensor]], bounds: list[int], bad: torch.Tensor, query: torch.Tensor,
          keys: torch.Tensor, n: int, k: int, segments) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused kernel's top-k of each part [bounds[i], bounds[i + 1]) (indices relative to the part) -> its top-k
    of [0, n): all kept sorted by score, stably, so that equal scores keep the order of the parts (lower indices
    first), each part's already index-ascending; empty slots (index -1, score -inf) sort after every kept score,
    which is finite in a row the kernel searched. Rows any part handed to the reference (`bad` [C]: the kernel
    flags a row by its query and the largest and non-finite keys, so the whole history flags exactly the rows
    some part does) are searched again whole by the reference, as the kernel does."""
    s = torch.cat([f[0] for f in found], 1)                                                 # [C, parts k]
    idx = torch.cat([torch.where(f[1] >= 0, f[1] + a, f[1]) for f, a in zip(found, bounds)], 1)
    order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
    scores, idx = s.gather(1, order), idx.gather(1, order)
    if bool(bad.any()):
        rows = bad.nonzero().flatten()
        scores[rows], idx[rows] = topk_reference(query[rows], keys, n, k, segments)
    return scores, idx
