"""An idle core lent to a serving search: the fused kernel run on two threads while a core sits idle, when that
measured faster than one.

A service scoring on one thread per micro-batch leaves a core idle while fewer batches run than it has cores
(one client; any quiet moment). `CoreLender` knows how many batches run: inside `scoring()`, a serving-layout
search by the fused kernel (`retrieval.dispatch.topk`) large enough to share may borrow the idle cores and run
the kernel's own threads over them (the kernel splits pass 1's blocks and pass 2's rows into chunks its threads
take in turn: kernels/topk_attention/cpu.c, run_part). The result is the one-thread kernel's bit for bit.

Only the search is shared (most of a long history's forward): not torch's OpenMP team for every op
(torch_threads = 2), whose threads spin between the forward's many small parallel regions, taking the CPU the
event loop, Redis and the client need (Zen 3, L = 10k: HTTP p50 9.88 ms with two threads against 7.94 with one).

Whether to share is measured, not assumed: the lender counts batches, not other processes, and a kernel
team waits for a member that another process keeps off its core (two threads, C = 200, d = 33 on the Zen 3 VM,
the other core idle / taken by a spinning process: 10k 1.24 / 5.03 ms against 1.97 / 2.14 on one thread; 100k
8.33 / 15.1 against 13.7 / 13.8). So each search that finds a core free runs on the team or alone, whichever
took less time per unit of work (rows x events x d) in recent searches that found a core free (exponential
averages), trying the other way every EXPLORE-th time so that a change (a neighbour starting or stopping) is
seen.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import time
from typing import Callable, Iterator

import torch

from kernels.topk_attention import cpu as fused

SPLIT_MIN_WORK = 1 << 24   # rows x events x d below which the team's start costs more than it saves (C = 200,
                           # d = 33: 2.5k events; the kernel itself asks ~2M multiply-adds per thread)
EXPLORE = 16               # every EXPLORE-th search that finds a core free runs the way that looked slower
WEIGHT = 0.2               # of the newest timing in each average

_current: contextvars.ContextVar[CoreLender | None] = contextvars.ContextVar("core_lender", default=None)


def current() -> CoreLender | None:
    """The lender of the batch this thread is scoring, if any."""
    return _current.get()


class CoreLender:
    """Cores the process may use, `cores`, of which each batch in `scoring()` takes `threads_per_batch`; one search
    at a time may borrow the rest. `on_search(team)`: after each search that found a core free, whether it ran on
    the team."""

    def __init__(self, cores: int, threads_per_batch: int = 1, on_search: Callable[[bool], None] | None = None):
        self.cores, self.threads_per_batch = cores, threads_per_batch
        self._on_search = on_search
        self._lock = threading.Lock()
        self._batches = 0
        self._lent = False
        self.rate: dict[bool, float | None] = {True: None, False: None}   # seconds per unit of work: team, alone
        self.searches = {True: 0, False: 0}                               # searches run each way
        self._seen = 0

    @contextlib.contextmanager
    def scoring(self) -> Iterator[None]:
        """A batch scoring in this thread: it occupies its threads, and its searches may borrow the idle cores."""
        with self._lock:
            self._batches += 1
        token = _current.set(self)
        try:
            yield
        finally:
            _current.reset(token)
            with self._lock:
                self._batches -= 1

    def _borrow(self) -> int:
        """Cores lent to this search (0: none free, or lent already)."""
        with self._lock:
            free = self.cores - self._batches * self.threads_per_batch
            if self._lent or free < 1:
                return 0
            self._lent = True
            return free

    def _give_back(self) -> None:
        with self._lock:
            self._lent = False

    def _team_next(self) -> bool:
        """Whether the next search with a core free runs on the team: each way once first, then the one with the
        lower average, but the other every EXPLORE-th time."""
        with self._lock:
            self._seen += 1
            team, alone = self.rate[True], self.rate[False]
            if team is None or alone is None:
                return team is None
            faster = team <= alone
            return (not faster) if self._seen % EXPLORE == 0 else faster

    def search(self, query: torch.Tensor, keys: torch.Tensor, n: int, k: int,
               segments) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The fused kernel's serving-layout top-k (query [C, d], keys [L, d], length n), on the kernel's threads
        over the free cores or alone as measured best; None when no core is free or the search is too small to
        share (the caller then runs it as it would have)."""
        rows, d = query.shape
        work = rows * n * d
        if work < SPLIT_MIN_WORK:
            return None
        free = self._borrow()
        if not free:
            return None
        try:
            team = self._team_next()
            started = time.perf_counter()
            out = fused.topk_fused(query, keys, n, k, segments, threads=1 + free if team else 1)
            rate = (time.perf_counter() - started) / work
        finally:
            self._give_back()
        with self._lock:
            old = self.rate[team]
            self.rate[team] = rate if old is None else old + WEIGHT * (rate - old)
            self.searches[team] += 1
        if self._on_search is not None:
            self._on_search(team)
        return out
