"""The scoring path: one user's stored history + state -> one forward over all of its candidates.

Per micro-batch of concurrent requests (service.batching): one Redis round trip reads every user's capped
sequence and current model state (`StateStore.read_users`), then each request is one call of the model's
serving entry point (`score_candidates`: C candidates sharing one history, the retrieval serving layout),
under `torch.inference_mode`. A user with no events scores with an empty history. Requests and stored events
carry raw (catalogue) ids: the served bundle's vocabulary maps them to table rows (`ServingModel.map_ids`,
shared with the state updater and the block index), unknown ones to the out-of-vocabulary row, counted for
candidates in `recsys_score_oov_ids_total`; a candidate without a category takes its item's.

With the block index (service.block_index; `state.index_block` > 0 and a DARE-like model) a request reads
the user's newest events first (the seed), then the summaries of the blocks the position bound leaves, then
only the blocks whose score bound can still beat a candidate's k-th best (`StateStore.read_index_heads`,
`read_index_entries`, `read_ranges`: up to three round trips per micro-batch; none after the first where
nothing past the seed can hold a top-k event), and runs stage 2 on the kept events (`DARE.kept_heads`):
exactly the top-k of the whole-sequence search.
A user without a current index (a new version not yet rebuilt), with no events, or whose memory state is not
current, or whose sequence changed between the two reads, takes the whole-sequence path; so does one for whom
the index is expected to cost more, by the timings of both paths on this process's earlier requests
(`PathCosts`).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from retrieval.lend import CoreLender
from service.metrics import ServiceMetrics
from service.model_state import ServingModel
from service.state import StateStore, UserView


@dataclass(frozen=True)
class ScoreJob:
    user_id: int
    items: np.ndarray  # [C] int64
    cates: np.ndarray  # [C] int64
    explain: bool


@dataclass
class ScoreResult:
    scores: list[float]
    history_length: int
    explanations: list[list[dict]] | None
    version: str = ""          # the model version that computed these scores
    memory: str | None = None  # models with memory branches: stored | rebuilt | empty
    bytes_read: int = 0        # sequence, index and state bytes read from Redis for this request
    blocks_read: int | None = None   # indexed path: blocks searched (None: whole-sequence path)


log = logging.getLogger("recsys.scoring")

# Before both paths have been timed on this process (see `PathCosts`), the indexed path is taken when the
# position bound leaves at most this share of the window's blocks (measured once, on one machine: with nothing
# pruned it was ~5x slower than the whole-sequence path at L = 10k), and skipped without the seed search when
# the blocks the position term alone surely leaves (`surely_kept`) are more.
MAX_INDEXED_FRACTION = 0.25
# How fast the share of index attempts that fell back follows the recent ones (per request: an EWMA).
FALLBACK_SHARE_RATE = 0.125
# The path costs (`PathCosts`): the weight of one request's timing in its fit (later ones weigh 1 - this less
# each: the fit follows the machine's load within ~10 requests of a path) ...
COST_RATE = 0.125
# ... where the history lengths (or block counts) a fit has seen spread by less than this share of their mean,
# the cost is taken as proportional to them (one length cannot tell the fixed part from the per-event one);
COST_MIN_SPREAD = 0.1
# ... and every this many choices the path the costs rank second runs instead, if it is predicted at most
# EXPLORE_FACTOR times as slow: a fit that a slow first request (cold caches) or a load burst left too high
# gets timed again, and a path several times slower never runs again once timed. Rare enough to stay out of
# the p99: an exploring request pays up to EXPLORE_FACTOR times its cost (at L = 100k on the Zen 3 VM the
# whole path ran ~3.8x the index's inside the scorer), so every 32nd (3%) would have been the p99 itself.
EXPLORE_EVERY = 256
EXPLORE_FACTOR = 4.0
# ... and the first timing of each part is not fitted: a process's first seed search cost 15.7 ms where the
# next ones cost ~1 ms (library loads, cold caches and tables; L = 100k, Zen 4), which priced the index path
# above the whole read, so 17% of requests took the 2.4x dearer path until an exploring request re-timed it.
COST_WARMUP = 1


class LinearCost:
    """seconds ~ a + b x for one part of one path (x: events, or blocks), fitted to the requests this process
    served: least squares with each request's weight decaying by 1 - COST_RATE per later one."""

    def __init__(self, pinned: tuple[float, float] | None = None, warmup: int = 0):
        self.pinned = pinned   # (a, b): not learned (tests, benchmarks: a forced path)
        self.warmup = warmup   # first timings not fitted (COST_WARMUP): until then the part counts as untimed
        self.seen = 0
        self._sums = (0.0, 0.0, 0.0, 0.0, 0.0)   # weight, x, y, x^2, x y
        self._lock = threading.Lock()             # two scoring threads share a Scorer

    def observe(self, x: float, y: float) -> None:
        if self.pinned is not None:
            return
        k = 1.0 - COST_RATE
        with self._lock:
            if self.warmup > 0:
                self.warmup -= 1
                return
            w, sx, sy, sxx, sxy = self._sums
            self._sums = (k * w + 1, k * sx + x, k * sy + y, k * sxx + x * x, k * sxy + x * y)
            self.seen += 1

    def predict(self, x: float) -> float | None:
        """None until timed once."""
        if self.pinned is not None:
            return self.pinned[0] + self.pinned[1] * x
        with self._lock:
            if not self.seen:
                return None
            w, sx, sy, sxx, sxy = self._sums
        mx, my = sx / w, sy / w
        var, cov = sxx / w - mx * mx, sxy / w - mx * my
        if var > (COST_MIN_SPREAD * mx) ** 2:
            if cov <= 0:       # noise over a spread of x: no per-unit cost to be seen
                return my
            b = cov / var
            if my - b * mx >= 0:
                return my - b * mx + b * x
        # x barely varied, or noise made the fixed part negative: proportional, exact at the mean
        return my * x / mx if mx > 0 else my


@dataclass
class PathCosts:
    """What each path cost on this process's requests of one model version, in the parts each decision still
    has to pay: the whole-sequence path's read (x: events stored) and forward (x: events in the window); the
    index's seed search (`begin_search`, x = 1) and the rest (x: candidate blocks the position bound left:
    the summaries' and blocks' reads, `select_blocks`, `finish_search`, stage 2); and how many candidate
    blocks the seed search left beyond those the position term alone surely leaves (`beyond_sure`, x = 1),
    which is what the choice before the seed search expects it to leave.

    Why learned from requests rather than measured up front, as retrieval.dispatch measures the top-k
    kernels: most of either path's cost is Redis (round trips, and bytes: 2.9 MB a whole read at L = 100k),
    and what that costs depends on where Redis runs and how loaded it is, which a synthetic calibration could
    only measure by writing to the store it serves from. Every request of a path times it anyway."""

    read: LinearCost = field(default_factory=lambda: LinearCost(warmup=COST_WARMUP))
    forward: LinearCost = field(default_factory=lambda: LinearCost(warmup=COST_WARMUP))
    seed: LinearCost = field(default_factory=lambda: LinearCost(warmup=COST_WARMUP))
    index: LinearCost = field(default_factory=lambda: LinearCost(warmup=COST_WARMUP))
    beyond_sure: LinearCost = field(default_factory=LinearCost)   # a count, not a timing: nothing cold in it
    explore_every: int = EXPLORE_EVERY
    _turns: itertools.count = field(default_factory=itertools.count)

    @classmethod
    def forced(cls, path: str) -> "PathCosts":
        """Costs that always pick `path` ("index" or "whole") where the index can serve (tests, benchmarks)."""
        whole, index = {"index": (1.0, 0.0), "whole": (0.0, 1.0)}[path]
        return cls(read=LinearCost((0.0, 0.0)), forward=LinearCost((whole, 0.0)), seed=LinearCost((0.0, 0.0)),
                   index=LinearCost((index, 0.0)), explore_every=0)

    def whole_s(self, stored: int, window: int, prefetched: bool) -> float | None:
        """The whole-sequence path from here: its forward, and its read unless the first read brought it."""
        fwd = self.forward.predict(window)
        rd = 0.0 if prefetched else self.read.predict(stored)
        return None if fwd is None or rd is None else fwd + rd

    def explore(self) -> bool:
        """Once per request that reaches a cost decision: whether this one runs the path ranked second."""
        return bool(self.explore_every) and next(self._turns) % self.explore_every == self.explore_every - 1

    def prefer_index(self, whole_s: float | None, blocks: float, with_seed: bool, explore: bool) -> bool | None:
        """Whether the index path (its seed search if with_seed, then `blocks` candidate blocks) costs less
        than the whole-sequence path's `whole_s`; the other way round on an exploring request where the
        path ranked second is predicted within EXPLORE_FACTOR. None while either path is untimed."""
        index_s = self.index.predict(blocks)
        seed_s = self.seed.predict(1) if with_seed else 0.0
        if whole_s is None or index_s is None or seed_s is None:
            return None
        index_s += seed_s
        cheaper = index_s <= whole_s
        if explore and max(index_s, whole_s) <= EXPLORE_FACTOR * min(index_s, whole_s):
            return not cheaper
        return cheaper


class Scorer:
    def __init__(self, model: ServingModel, store: StateStore, metrics: ServiceMetrics, rebuild_max_events: int = 0,
                 costs: Callable[[], PathCosts] = PathCosts, lender: CoreLender | None = None):
        self.model = model
        self.lender = lender
        self.store = store
        self.metrics = metrics
        self.rebuild_max_events = rebuild_max_events
        self._fallback_share: dict[str, float] = {}  # model version -> recent share of index attempts that fell back
        self._new_costs = costs
        self._costs: dict[str, PathCosts] = {}       # the served model version's (a reload starts anew)

    @property
    def version(self) -> str:
        return self.model.version

    def path_costs(self, version: str) -> PathCosts:
        costs = self._costs.get(version)
        if costs is None:
            costs = self._new_costs()
            self._costs = {version: costs}
        return costs

    def run(self, jobs: Sequence[ScoreJob]) -> list[ScoreResult | Exception]:
        """Score a micro-batch. A Redis failure fails the whole batch (raised); a model error, one job."""
        with self.lender.scoring() if self.lender is not None else contextlib.nullcontext():
            return self._run(jobs)

    def _run(self, jobs: Sequence[ScoreJob]) -> list[ScoreResult | Exception]:
        t0 = time.perf_counter()
        model = self.model  # one model for the whole batch, even if a reload swaps it meanwhile
        out: list[ScoreResult | Exception | None] = [None] * len(jobs)
        indexer = model.block_indexer(self.store.cfg.index_block) if hasattr(model.model, "kept_heads") else None
        costs = self.path_costs(model.version) if indexer is not None else None   # only where there is a choice
        head_bytes: dict[int, int] = {}  # jobs that read the index first and then fell back
        views: dict[int, UserView] = {}   # users whose whole sequence that first read brought
        if indexer is not None:
            head_bytes, views = self._run_indexed(model, indexer, costs, jobs, out)
        rest = [i for i, r in enumerate(out) if r is None]
        users = [u for u in dict.fromkeys(jobs[i].user_id for i in rest) if u not in views]
        if users:
            t = time.perf_counter()
            read = self.store.read_users(users, model.version)
            share = (time.perf_counter() - t) / len(users)   # one pipelined round trip for all of them
            views.update(zip(users, read))
            if costs is not None:
                for v in read:
                    costs.read.observe(len(v.sequence), share)
        with torch.inference_mode():
            for i in rest:
                try:
                    t = time.perf_counter()
                    out[i] = self._score_one(model, views[jobs[i].user_id], jobs[i])
                    if costs is not None and out[i].history_length:
                        costs.forward.observe(out[i].history_length, time.perf_counter() - t)
                    out[i].bytes_read += head_bytes.get(i, 0)
                except Exception as e:  # noqa: BLE001 - reported to that request as a 503, never a crash
                    out[i] = e
        self.metrics.score_seconds.observe(time.perf_counter() - t0)
        self.metrics.score_batch_requests.observe(len(jobs))
        for r in out:
            if isinstance(r, ScoreResult):
                self.metrics.score_path.labels("whole" if r.blocks_read is None else "index").inc()
                self.metrics.score_redis_bytes.inc(r.bytes_read)
        return out

    def _run_indexed(self, model: ServingModel, indexer, costs: PathCosts, jobs: Sequence[ScoreJob],
                     out: list) -> tuple[dict[int, int], dict[int, UserView]]:
        """The indexed path for the jobs it can serve and is expected to serve faster (the others stay None
        in `out`): up to three pipelined reads for the whole micro-batch (heads; the summaries the position
        bound leaves; the blocks their bounds leave), each skipped by the jobs it has nothing to bring. ->
        bytes read by the jobs that fall back to the whole-sequence path, by job (beyond their view's), and
        the views of the users whose whole sequence the first read brought.

        The choice, per job, from `costs` (this process's timings of both paths, `PathCosts`), at two
        points, each with what is known there: after the first read, from the window's length and the
        blocks the search is expected to leave (those the position term alone surely leaves, `surely_kept`,
        and as many more as recent searches left), whether to run the seed search at all; after it
        (`begin_search`), from the candidate blocks, which path finishes sooner. Until both paths have been timed the fixed rule
        (MAX_INDEXED_FRACTION) decides, except that after the seed search a path timed on no request yet is
        taken once its rival has been. Either path gives the same top-k and the same scores."""
        from service.block_index import begin_search, select_blocks, surely_kept

        users = list(dict.fromkeys(j.user_id for j in jobs))
        # While most recent requests of this model fell back, the first read brings the whole sequences too
        # (the same snapshot): a fallback then costs no second round trip, and the choice below counts the
        # whole path's read as paid (but not the share: see `unpaid_s`).
        whole = self._fallback_share.get(model.version, 0.0) > 0.5
        heads = dict(zip(users, self.store.read_index_heads(users, model.version, indexer.fmt, self.store.cfg.index_seed,
                                                            model.has_memory, whole=whole)))
        views = {u: h.view for u, h in heads.items() if h.view is not None}
        searches = {}
        spent: dict[int, float] = {}    # seconds of each search's own work after begin_search
        fallback: dict[int, int] = {}
        oov: dict[int, list[int]] = {}

        def give_up(i: int, head) -> None:
            view = views.get(jobs[i].user_id)
            fallback[i] = head.bytes_read - (0 if view is None else view.sequence.nbytes + len(view.state or b""))
            searches.pop(i, None)

        with torch.inference_mode():
            tried = fell_back = 0
            for i, job in enumerate(jobs):
                h = heads[job.user_id]
                if h.ix0 is None or h.visible == 0 or (model.has_memory and not h.state):
                    continue
                tried += 1
                window = min(h.visible, model.max_len)
                whole_s = costs.whole_s(h.visible, window, h.view is not None)
                # The share that decides whether the first read brings the whole sequence counts the choices
                # as they would be without it: counting those made with its read already paid would keep it
                # on where the index, read and all, is the cheaper path.
                unpaid_s = whole_s if h.view is None else costs.whole_s(h.visible, window, False)
                explore = costs.explore()
                window_blocks = -(-window // indexer.block)
                # The blocks the search is expected to leave: the sure ones and as many more as recent searches
                # left beyond theirs. Expecting only the sure ones (a bound: never a wrong skip) ran every
                # search at L = 10k and then read the whole sequence anyway, 1-2 ms a request.
                kept = surely_kept(indexer, h, model.max_len, model.model.k)
                beyond = costs.beyond_sure.predict(1)
                expected = kept if beyond is None else min(window_blocks, kept + beyond)
                search_first = costs.prefer_index(whole_s, expected, True, explore)
                if search_first is None:   # a path untimed: the fixed rule's sure fallback
                    search_first = kept <= MAX_INDEXED_FRACTION * window_blocks
                if not search_first:
                    give_up(i, h)
                    fell_back += costs.prefer_index(unpaid_s, expected, True, False) is not True
                    continue
                try:
                    t = time.perf_counter()
                    items, cates, *n_oov = model.map_candidates(job.items, job.cates)  # counted once the path is sure
                    search = begin_search(indexer, h, items, cates, model.max_len, model.model.k)
                    costs.seed.observe(1, time.perf_counter() - t)
                    costs.beyond_sure.observe(1, len(search.candidates) - kept)
                except Exception:  # noqa: BLE001 - the index is an optimisation: the whole read still answers
                    log.exception("user %s: block index unusable, reading the whole sequence", job.user_id)
                    give_up(i, h)
                    fell_back += 1
                    continue
                take = costs.prefer_index(whole_s, len(search.candidates), False, explore)
                if take is None:   # a path untimed: timed now if its rival has been, else the fixed rule
                    if (costs.index.seen == 0) != (whole_s is None):
                        take = whole_s is not None
                    else:
                        take = len(search.candidates) <= MAX_INDEXED_FRACTION * window_blocks
                if take:
                    searches[i] = search
                    spent[i] = 0.0
                    oov[i] = n_oov
                else:
                    give_up(i, h)
                    fell_back += costs.prefer_index(unpaid_s, len(search.candidates), False, False) is not True
            if tried:
                share = self._fallback_share.get(model.version, 0.0)
                self._fallback_share = {model.version: share + (fell_back / tried - share) * FALLBACK_SHARE_RATE}
            # A search the position bound left no block is answered by its seed (read in the first round trip,
            # one snapshot), and one whose summaries leave no block by the seed and those summaries: neither
            # reads again.
            t = time.perf_counter()
            asking = [i for i, s in searches.items() if len(s.candidates)]
            entries = dict(zip(asking, self.store.read_index_entries(
                [(jobs[i].user_id, searches[i].head, searches[i].entry_ranges) for i in asking], model.version,
                indexer.entry_bytes)))
            for i in asking:
                spent[i] += (time.perf_counter() - t) / len(asking)
            for i, s in list(searches.items()):
                got = entries.get(i, [])
                if got is None:  # the sequence moved between the reads: the whole-sequence path
                    give_up(i, s.head)
                    continue
                s.head.bytes_read += sum(map(len, got))
                try:
                    t = time.perf_counter()
                    select_blocks(indexer, s, got)
                    spent[i] += time.perf_counter() - t
                except Exception:  # noqa: BLE001
                    log.exception("user %s: block index unusable, reading the whole sequence", jobs[i].user_id)
                    give_up(i, s.head)
            t = time.perf_counter()
            asking = [i for i, s in searches.items() if s.ranges]
            reads = dict(zip(asking, self.store.read_ranges(
                [(jobs[i].user_id, searches[i].head, searches[i].ranges) for i in asking])))
            for i in asking:
                spent[i] += (time.perf_counter() - t) / len(asking)
            for i, s in list(searches.items()):
                recs = reads.get(i, [])
                if recs is None:
                    give_up(i, s.head)
                    continue
                try:
                    t = time.perf_counter()
                    out[i] = self._finish_indexed(model, indexer, s, recs, jobs[i].explain)
                    costs.index.observe(len(s.candidates), spent[i] + time.perf_counter() - t)
                    self._count_oov(*oov[i])
                except Exception as e:  # noqa: BLE001
                    out[i] = e
        return fallback, views

    def _finish_indexed(self, model: ServingModel, indexer, s, recs, explain: bool) -> ScoreResult:
        from service.block_index import finish_search

        _, idx, kept = finish_search(indexer, s, recs, model.model.k)
        memory, source = {}, None
        if model.has_memory:
            memory["memory"], source = model._memory(kept[:0], s.head.state, 0)
            self.metrics.memory_source.labels(source).inc()
        k_item, _ = model.map_ids(kept["item"].reshape(-1), "item")
        k_cate, _ = model.map_ids(kept["cate"].reshape(-1), "cate")
        o = model.model.kept_heads(s.items, s.cates, k_item.view(idx.shape), k_cate.view(idx.shape), idx, s.window,
                                   **memory)
        probs = torch.sigmoid(o.logit)
        self.metrics.scores_served.inc(len(probs))
        explanations = None
        if explain:
            explanations = [[{"position": int(j) + 1, "item_id": int(r["item"]), "category_id": int(r["cate"]),
                              "ts": int(r["ts"])} for j, r in zip(row, krow) if j >= 0]
                            for row, krow in zip(idx.tolist(), kept)]
        return ScoreResult(scores=probs.tolist(), history_length=s.window, explanations=explanations,
                           version=model.version, memory=source,
                           bytes_read=s.head.bytes_read + sum(r.nbytes for r in recs),
                           blocks_read=s.blocks)

    def _count_oov(self, items: int, cates: int) -> None:
        if items:
            self.metrics.oov_ids.labels("item").inc(items)
        if cates:
            self.metrics.oov_ids.labels("category").inc(cates)

    def _score_one(self, model: ServingModel, view: UserView, job: ScoreJob) -> ScoreResult:
        seq = view.sequence[-model.max_len:]                                  # oldest first, [L]
        L = len(seq)
        if L == 0:
            self.metrics.cold_users.inc()
        items, cates, *n_oov = model.map_candidates(job.items, job.cates)
        self._count_oov(*n_oov)
        # [C], [C, k] (-1 = empty slot); the memory reads the state (or, rebuilt, the whole stored sequence)
        scores, idx, memory = model.score(view.sequence, view.state, items, cates, self.rebuild_max_events)
        self.metrics.scores_served.inc(len(scores))
        if memory is not None:
            self.metrics.memory_source.labels(memory).inc()
        explanations = None
        if job.explain and idx is not None:
            recent = seq[::-1]                                                # column j = (j+1)-th most recent
            explanations = [
                [{"position": int(j) + 1, "item_id": int(recent["item"][j]), "category_id": int(recent["cate"][j]),
                  "ts": int(recent["ts"][j])} for j in row if j >= 0]
                for row in idx.tolist()
            ]
        return ScoreResult(scores=scores.tolist(), history_length=L, explanations=explanations,
                           version=model.version, memory=memory, bytes_read=view.sequence.nbytes + len(view.state or b""))
