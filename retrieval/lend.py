"""An idle core lent to a serving request's long kernels: their chunks taken in turn by two threads.

A service scoring on one thread per micro-batch leaves a core idle while fewer batches run than it has
cores (one client; any quiet moment). `CoreLender` knows how many batches run: inside `scoring()`, a
serving-layout search by the fused kernel (`retrieval.dispatch.topk`) and the gather of its keys
(`recsys.models.attention.stage1_from_tables`), each when large enough to pay for the hand-off, borrow one idle
core. The kernel runs on this thread with a lent thread as its team's second member (`kernels.team`): the
search's pass 1 blocks and pass 2 rows, the gather's events, taken in chunks from the same counters. At long
histories these two are most of the forward (L = 100k, C = 200, one thread: the int8 top-k ~7.5 and the gather
~1.2 of a 13 ms forward, Zen 4 VM, README).

Why not the OpenMP team (torch_threads = 2): its threads spin between parallel regions, taking the CPU that
the event loop, Redis and the client need between and beside the forward's many small ops, and a team
member preempted by them holds the others at the kernel's barrier (Zen 3, L = 10k, C = 200: HTTP p50 9.88
ms with two threads against 7.94 with one, README). Here the lent thread sleeps until a search arrives, and
when it is slow or busy elsewhere this thread takes the chunks it has not: a search waits at most for the one
chunk the lent thread is in, never for a core that has not started, and the lent thread spins only while
the other finishes a chunk.

Why not parts (this module until 2026-12: the history cut into parts searched by separate kernel calls and
merged): each part paid the kernel's per-call cost (per-row selection and pass 2), so a 1k-event search took
0.78 ms lent against 0.40 whole, and 100k gained 1.37x (Zen 4, `git show 2846af7:retrieval/lend.py`).

Exact: each event is scored by the same fp32 chain whichever thread scores it, and each row's candidates are
ranked once, so the result is the one-thread search's bit for bit (tests/test_lend.py).
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

import torch

from kernels.gather_keys import cpu as gather
from kernels.team import Team
from kernels.topk_attention import cpu as fused

T = TypeVar("T")

# Where a lent search pays (`python benchmarks/lend_search.py --out results/lend_search_zen4.json`, b7f0890: AMD
# EPYC Zen 4 VM, quiet, one torch thread, d = 33, int8 pass 1 at C = 200; whole / lent): C = 20: 500-4k events
# 0.50-0.77x, 10k 1.02x, 30k 1.35x, 100k 1.68x, 300k 1.79x; C = 200: 500-2k 1.01-1.05x, 4k 1.12x, 10k 1.17x, 30k
# 1.37x, 100k 1.61x, 300k 1.75x. A small search pays the hand-off (the pool's wake-up, the pinning) and two threads'
# chunks of a few blocks each; rows x events x d is what sets the work, and from 2^24 on every measured search
# gained (C = 20 from ~25k events, C = 200 from ~2.5k). With the lent core busy in another process: 1.03-1.33x
# where the rule lends at C = 200, 1.26-1.51x at C = 20. The same on an AMD EPYC Zen 3 VM (AVX2 only; 6ef71a5,
# results/lend_search_zen3_6ef71a5.json): C = 20: 500-4k 0.56-0.84x, 10k 0.93x, 30k 1.22x, 100k 1.49x; C = 200:
# 500-2k 1.00-1.11x, 4k 1.22x, 10k 1.38x, 100k 1.39x, 300k 1.06x (one run each; that VM's run-to-run spread at
# 100k-300k was larger than the ratios' differences): the same crossover, so the same rule. An Intel Xeon VM (AMX;
# 9be7f52, results/lend_search_intel_9be7f52.json): C = 20: 500-4k 0.42-0.80x, 10k 0.98x, 30k 1.36x, 100k 1.66x; C =
# 200: 500 1.05x, 1k 1.11x, 2k 1.20x, 4k 1.28x, 100k 1.57x: the rule leaves 1.1-1.2x (0.04-0.1 ms) at 1k-2k events
# there; kept, one rule for every CPU measured.
LEND_MIN_WORK = 1 << 24   # rows x events x d
# Where a lent key gather pays (`python benchmarks/lend_search.py --gather --out results/lend_gather_zen4.json`,
# 5651add: AMD EPYC Zen 4 VM, quiet, width 33 from a 100k-row item table, caches evicted before each call as in a
# request; whole / lent): 10k 0.48x, 30k 0.78x, 50k 0.99x, 70k 1.13x, 100k 1.23x, 300k 1.33x, 1M 1.18x; with the
# lent core busy in another process 0.58-1.09x below 2^21, 0.90-1.16x from it. A gather is a few random reads per
# event: the hand-off (~0.2 ms: the pool's wake-up, the pinning) pays from ~60k events. Zen 3 VM (6ef71a5,
# results/lend_gather_zen3_6ef71a5.json): 10k 0.65x, 30k 1.02x, 50k 0.99x, 70k 1.15x, 100k 1.28x, 1M 1.34x; busy
# 0.64-1.07x below 2^21, 1.10-1.27x from it: the same crossover. Intel Xeon VM (9be7f52,
# results/lend_gather_intel_9be7f52.json): 10k 0.85x, 30k 0.94x, 50k 1.22x, 70k 1.44x, 100k 1.55x, 1M 1.25x: 50k
# (1.65M words, 0.16 ms) would pay there too; kept.
GATHER_MIN_WORDS = 1 << 21   # events x key width

_current: contextvars.ContextVar[CoreLender | None] = contextvars.ContextVar("core_lender", default=None)


def current() -> CoreLender | None:
    """The lender of the batch this thread is scoring, if any."""
    return _current.get()


@dataclass
class Lent:
    """One kernel's calls that were offered the lent core."""

    calls: int = 0        # calls the lent core was offered to
    joined: int = 0       # of which the lent thread took chunks in
    chunks_lent: int = 0  # chunks the lent thread took
    chunks_here: int = 0  # chunks the batches' own threads took


class CoreLender:
    """Cores the process may use, `cores`, of which each batch in `scoring()` takes `threads_per_batch`;
    while at least one more is free, one call at a time (a search, a key gather) may borrow it. `on_call`: after
    each lent call, (kernel, chunks the lent thread took, chunks taken here), kernel "search" or "gather"."""

    def __init__(self, cores: int, threads_per_batch: int = 1,
                 on_call: Callable[[str, int, int], None] | None = None):
        self.cores, self.threads_per_batch = cores, threads_per_batch
        self._on_call = on_call
        self._lock = threading.Lock()
        self._batches = 0
        self._lent = False
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="lent-core")
        self._lent_tid = self._pool.submit(threading.get_native_id).result()
        self._cpus = os.sched_getaffinity(0)
        self.lent = {"search": Lent(), "gather": Lent()}

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
               segments, bits: int = 0) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The fused kernel's serving-layout top-k (query [C, d], keys [L, d], length n; pass 1 in `bits`, 0: the
        build's rule) with an idle core helping, or None when no core is free or the search is too small to pay for
        the hand-off (the caller then runs it alone). If the lent core is slow or busy elsewhere, this thread takes
        the chunks it has not."""
        if not worth_lending(query.shape[0], n, query.shape[1]):
            return None
        # its own team per search: a lent thread still finishing the last one joins nothing here
        return self._lend("search", fused.Team,
                          lambda team: fused.topk_fused(query, keys, n, k, segments, team=team, bits=bits))

    def gather(self, tables: list[torch.Tensor], ids: list[torch.Tensor]) -> torch.Tensor | None:
        """The search's keys gathered (`kernels.gather_keys`: [L, sum of widths]) with an idle core taking chunks
        of the events, or None when no core is free, the gather is too small to pay for the hand-off or the C
        gather does not run these tensors (the caller then gathers alone)."""
        width = sum(1 if t.dim() == 1 else t.shape[1] for t in tables)
        if not (worth_lending_gather(ids[0].shape[0], width) and gather.supports(tables, ids)):
            return None
        return self._lend("gather", gather.Team, lambda team: gather.gather_keys(tables, ids, team=team))

    def _lend(self, kernel: str, make_team: Callable[[], Team], run: Callable[[Team], T]) -> T | None:
        """run(team) on this thread with the lent core as the team's member; None when no core is free."""
        if not self._borrow():
            return None
        try:
            team = make_team()
            self._elsewhere()
            job = self._pool.submit(team.join)
        except BaseException:
            self._give_back()
            raise
        try:
            found = run(team)
        finally:
            # Once the team is closed the lent thread cannot join, and if it did it has left: no waiting for it to
            # return (a thread woken late would add its wake-up, ~50 us, to the call; the next call's work queues
            # behind it for the microseconds it needs). A raise before the kernel ran leaves the team open:
            # closing it sends a waiting thread back.
            team.close()
            job.cancel()   # never started (the lent core is busy elsewhere): it never will
            self._give_back()
        here, there = team.chunks
        with self._lock:
            lent = self.lent[kernel]
            lent.calls += 1
            lent.joined += there > 0
            lent.chunks_lent += there
            lent.chunks_here += here
        if self._on_call is not None:
            self._on_call(kernel, there, here)
        return found

    def _elsewhere(self) -> None:
        """Keep the lent thread off this thread's CPU. Woken by this thread, the scheduler would queue it on this
        CPU (wake-affine), behind this thread's own work, until a balance moved it: two threads of one process
        searching at once took 3.0 and 4.0 ms a 25k-event search where pinned apart they took 2.7 and 2.8 (Zen 3 VM; two
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


def worth_lending(rows: int, n: int, d: int) -> bool:
    """Whether a search of `rows` queries over n events of d dims pays for a lent core (see LEND_MIN_WORK)."""
    return rows * n * d >= LEND_MIN_WORK


def worth_lending_gather(n: int, width: int) -> bool:
    """Whether gathering n events' keys of `width` words pays for a lent core (see GATHER_MIN_WORDS)."""
    return n * width >= GATHER_MIN_WORDS
