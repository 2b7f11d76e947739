"""The scoring path: one user's stored history + state -> one forward over all of its candidates.

Per micro-batch of concurrent requests (service.batching): one Redis round trip reads every user's capped
sequence and current model state (`StateStore.read_users`), then each request is one call of the model's
serving entry point (`score_candidates`: C candidates sharing one history, the retrieval serving layout),
under `torch.inference_mode`. A user with no events scores with an empty history. Requests and stored events
carry raw (catalogue) ids: the served bundle's vocabulary maps them to table rows (`ServingModel.map_ids`,
shared with the state updater and the block index), unknown ones to the out-of-vocabulary row, counted for
candidates in `recsys_score_oov_ids_total`; a candidate without a category takes its item's.

With the block index (service.block_index; `state.index_block` > 0 and a DARE-like model) a request reads
the user's block summaries and newest events first, then only the blocks whose score bound can still beat a
candidate's k-th best (`StateStore.read_index_heads`, then `read_ranges`: two round trips per micro-batch),
and runs stage 2 on the kept events (`DARE.kept_heads`): exactly the top-k of the whole-sequence search.
A user without a current index (a new version not yet rebuilt), with no events, or whose memory state is not
current, or whose sequence changed between the two reads, takes the whole-sequence path.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

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

# The indexed path is taken when the position bound leaves at most this share of the window's blocks
# (measured: with nothing pruned it was ~5x slower than the whole-sequence path at L = 10k).
MAX_INDEXED_FRACTION = 0.25
# How fast the share of index attempts that fell back follows the recent ones (per request: an EWMA).
FALLBACK_SHARE_RATE = 0.125


class Scorer:
    def __init__(self, model: ServingModel, store: StateStore, metrics: ServiceMetrics, rebuild_max_events: int = 0):
        self.model = model
        self.store = store
        self.metrics = metrics
        self.rebuild_max_events = rebuild_max_events
        self._fallback_share: dict[str, float] = {}  # model version -> recent share of index attempts that fell back

    @property
    def version(self) -> str:
        return self.model.version

    def run(self, jobs: Sequence[ScoreJob]) -> list[ScoreResult | Exception]:
        """Score a micro-batch. A Redis failure fails the whole batch (raised); a model error, one job."""
        t0 = time.perf_counter()
        model = self.model  # one model for the whole batch, even if a reload swaps it meanwhile
        out: list[ScoreResult | Exception | None] = [None] * len(jobs)
        indexer = model.block_indexer(self.store.cfg.index_block) if hasattr(model.model, "kept_heads") else None
        head_bytes: dict[int, int] = {}  # jobs that read the index first and then fell back
        views: dict[int, UserView] = {}   # users whose whole sequence that first read brought
        if indexer is not None:
            head_bytes, views = self._run_indexed(model, indexer, jobs, out)
        rest = [i for i, r in enumerate(out) if r is None]
        users = [u for u in dict.fromkeys(jobs[i].user_id for i in rest) if u not in views]
        if users:
            views.update(zip(users, self.store.read_users(users, model.version)))
        with torch.inference_mode():
            for i in rest:
                try:
                    out[i] = self._score_one(model, views[jobs[i].user_id], jobs[i])
                    out[i].bytes_read += head_bytes.get(i, 0)
                except Exception as e:  # noqa: BLE001 - reported to that request as a 503, never a crash
                    out[i] = e
        self.metrics.score_seconds.observe(time.perf_counter() - t0)
        self.metrics.score_batch_requests.observe(len(jobs))
        return out

    def _run_indexed(self, model: ServingModel, indexer, jobs: Sequence[ScoreJob],
                     out: list) -> tuple[dict[int, int], dict[int, UserView]]:
        """The indexed path for the jobs it can serve (the others stay None in `out`): three pipelined reads
        for the whole micro-batch (heads; the summaries the position bound leaves; the blocks their bounds
        leave). -> bytes read by the jobs that fall back to the whole-sequence path, by job (beyond their
        view's), and the views of the users whose whole sequence the first read brought."""
        from service.block_index import begin_search, select_blocks, surely_unpruned

        users = list(dict.fromkeys(j.user_id for j in jobs))
        # While most recent requests of this model fell back, the first read brings the whole sequences too
        # (the same snapshot): a fallback then costs no second round trip. It decides nothing about the path.
        whole = self._fallback_share.get(model.version, 0.0) > 0.5
        heads = dict(zip(users, self.store.read_index_heads(users, model.version, indexer.fmt, indexer.block,
                                                            model.has_memory, whole=whole)))
        views = {u: h.view for u, h in heads.items() if h.view is not None}
        searches = {}
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
                if surely_unpruned(indexer, h, model.max_len, model.model.k, MAX_INDEXED_FRACTION):
                    give_up(i, h)
                    fell_back += 1
                    continue
                try:
                    items, cates, *n_oov = model.map_candidates(job.items, job.cates)  # counted once the path is sure
                    search = begin_search(indexer, h, items, cates, model.max_len, model.model.k)
                except Exception:  # noqa: BLE001 - the index is an optimisation: the whole read still answers
                    log.exception("user %s: block index unusable, reading the whole sequence", job.user_id)
                    give_up(i, h)
                    fell_back += 1
                    continue
                # When the bounds prune little (e.g. histories with no recency or topical structure), block
                # reads and per-block scoring cost more than one whole read and the fused search.
                window_blocks = -(-search.window // indexer.block)
                if len(search.candidates) <= MAX_INDEXED_FRACTION * window_blocks:
                    searches[i] = search
                    oov[i] = n_oov
                else:
                    give_up(i, h)
                    fell_back += 1
            if tried:
                share = self._fallback_share.get(model.version, 0.0)
                self._fallback_share = {model.version: share + (fell_back / tried - share) * FALLBACK_SHARE_RATE}
            entries = self.store.read_index_entries(
                [(jobs[i].user_id, s.head, s.entry_ranges) for i, s in searches.items()], model.version,
                indexer.entry_bytes)
            for (i, s), got in list(zip(searches.items(), entries)):
                if got is None:  # the sequence moved between the reads: the whole-sequence path
                    give_up(i, s.head)
                    continue
                s.head.bytes_read += sum(map(len, got))
                try:
                    select_blocks(indexer, s, got)
                except Exception:  # noqa: BLE001
                    log.exception("user %s: block index unusable, reading the whole sequence", jobs[i].user_id)
                    give_up(i, s.head)
            reads = self.store.read_ranges([(jobs[i].user_id, s.head, s.ranges) for i, s in searches.items()])
            for (i, s), recs in zip(list(searches.items()), reads):
                if recs is None:
                    give_up(i, s.head)
                    continue
                try:
                    out[i] = self._finish_indexed(model, indexer, s, recs, jobs[i].explain)
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
