"""An idle core lent to a serving search: the history's two halves searched at once, the results merged.

A service scoring on one thread per micro-batch leaves a core idle while fewer batches run than it has
cores (one client; any quiet moment). `CoreLender` knows how many batches run: inside `scoring()`, a
serving-layout search by the fused kernel (`retrieval.dispatch.topk`) large enough to pay for the hand-off
borrows one idle core, searches the newer half of the history there and the older half here, and merges the
two top-k lists. Nothing else of the forward is split: the search is most of it at long histories.

Why not the OpenMP team (torch_threads = 2): its threads spin between parallel regions, taking the CPU that
the event loop, Redis and the client need between and beside the forward's many small ops, and a team
member preempted by them holds the others at the kernel's barrier (Zen 3, L = 10k, C = 200: HTTP p50 9.88
ms with two threads against 7.94 with one, README). Here the lent thread sleeps until a half arrives, and a
half it has not started when this thread finishes its own is taken back and searched here: the search never
waits for a core that is busy elsewhere, only for a half already running.

Exact: the fused kernel scores each event by the same fp32 chain wherever it sits in the history, and the k
best of the whole are among the k best of its half, so the merge by (score desc, index asc) is the unsplit
search's result bit for bit (tests/test_lend.py). Rows that the kernel hands to the reference (non-finite or
near-overflow inputs) in either half are searched again whole by the reference, as the unsplit call does.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import torch

from kernels.topk_attention import cpu as fused
from kernels.topk_attention.reference import topk_reference

SPLIT_MIN_WORK = 1 << 24   # rows x events x d below which one thread finishes first (hand-off ~0.1 ms)
ALIGN = 64                 # the split point on the kernel's block boundary: no block is cut in two

_current: contextvars.ContextVar[CoreLender | None] = contextvars.ContextVar("core_lender", default=None)


def current() -> CoreLender | None:
    """The lender of the batch this thread is scoring, if any."""
    return _current.get()


class CoreLender:
    """Cores the process may use, `cores`, of which each batch in `scoring()` takes `threads_per_batch`;
    while at least one more is free, one search at a time may borrow it."""

    def __init__(self, cores: int, threads_per_batch: int = 1, on_split: Callable[[bool], None] | None = None):
        self.cores, self.threads_per_batch = cores, threads_per_batch
        self._on_split = on_split   # called after each split search: True when its second half was taken back
        self._lock = threading.Lock()
        self._batches = 0
        self._lent = False
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="lent-core")
        self.splits = 0      # searches that ran split (both halves at once or taken back)
        self.taken_back = 0  # of those, searches whose second half this thread searched itself

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
        """The fused kernel's serving-layout top-k (query [C, d], keys [L, d], length n) over the two halves of
        the history at once, or None when no core is free or the search is too small to split (the caller
        then runs it whole)."""
        half = n // 2 // ALIGN * ALIGN
        if half == 0 or query.shape[0] * n * query.shape[1] < SPLIT_MIN_WORK or not self._borrow():
            return None
        bad = torch.empty(2, query.shape[0], dtype=torch.bool)
        inference = torch.is_inference_mode_enabled()   # thread-local: the lent thread takes the caller's

        def newer():
            try:
                with torch.inference_mode(inference):
                    return fused.topk_fused(query, keys[half:n], n - half, k, segments, bad_rows=bad[1])
            finally:
                self._give_back()

        try:
            lent = self._pool.submit(newer)
        except BaseException:
            self._give_back()
            raise
        older = fused.topk_fused(query, keys[:half], half, k, segments, bad_rows=bad[0])
        taken_back = lent.cancel()   # not started: the lent core is busy elsewhere, so search that half here
        if taken_back:
            self._give_back()
            second = fused.topk_fused(query, keys[half:n], n - half, k, segments, bad_rows=bad[1])
        else:
            second = lent.result()
        with self._lock:
            self.splits += 1
            self.taken_back += taken_back
        if self._on_split is not None:
            self._on_split(taken_back)
        return merge(older, second, half, bad[0] | bad[1], query, keys[:n], n, k, segments)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def merge(first: tuple[torch.Tensor, torch.Tensor], second: tuple[torch.Tensor, torch.Tensor], offset: int,
          bad: torch.Tensor, query: torch.Tensor, keys: torch.Tensor, n: int, k: int,
          segments) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused kernel's top-k of events [0, offset) (first) and [offset, n) (second, its indices relative) -> its
    top-k of [0, n): the 2k kept sorted by score, stably, so that equal scores keep the first part's (lower)
    indices first, each part's already index-ascending; empty slots (index -1, score -inf) sort after every
    kept score, which is finite in a row the kernel searched. Rows either part handed to the reference (`bad`
    [C]: the kernel flags a row by its query and the largest and non-finite keys, so the whole history flags
    exactly the rows either part does) are searched again whole by the reference, as the kernel does."""
    s = torch.cat([first[0], second[0]], 1)                                             # [C, 2k]
    idx = torch.cat([first[1], torch.where(second[1] >= 0, second[1] + offset, second[1])], 1)
    order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
    scores, idx = s.gather(1, order), idx.gather(1, order)
    if bool(bad.any()):
        rows = bad.nonzero().flatten()
        scores[rows], idx[rows] = topk_reference(query[rows], keys, n, k, segments)
    return scores, idx
