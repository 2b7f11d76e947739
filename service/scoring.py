"""The scoring path: one user's stored history + state -> one forward over all of its candidates.

Per micro-batch of concurrent requests (service.batching): one Redis round trip reads every user's capped
sequence and current model state (`StateStore.read_users`), then each request is one call of the model's
serving entry point (`score_candidates`: C candidates sharing one history, the retrieval serving layout),
under `torch.inference_mode`. A user with no events scores with an empty history; ids outside the model's
tables map to the out-of-vocabulary row (`ServingModel.map_ids`, shared with the state updater).
"""

from __future__ import annotations

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


class Scorer:
    def __init__(self, model: ServingModel, store: StateStore, metrics: ServiceMetrics, rebuild_max_events: int = 0):
        self.model = model
        self.store = store
        self.metrics = metrics
        self.rebuild_max_events = rebuild_max_events

    @property
    def version(self) -> str:
        return self.model.version

    def run(self, jobs: Sequence[ScoreJob]) -> list[ScoreResult | Exception]:
        """Score a micro-batch. A Redis failure fails the whole batch (raised); a model error, one job."""
        t0 = time.perf_counter()
        model = self.model  # one model for the whole batch, even if a reload swaps it meanwhile
        users = list(dict.fromkeys(j.user_id for j in jobs))
        views = dict(zip(users, self.store.read_users(users, model.version)))
        out: list[ScoreResult | Exception] = []
        with torch.inference_mode():
            for job in jobs:
                try:
                    out.append(self._score_one(model, views[job.user_id], job))
                except Exception as e:  # noqa: BLE001 - reported to that request as a 503, never a crash
                    out.append(e)
        self.metrics.score_seconds.observe(time.perf_counter() - t0)
        self.metrics.score_batch_requests.observe(len(jobs))
        return out

    def _score_one(self, model: ServingModel, view: UserView, job: ScoreJob) -> ScoreResult:
        seq = view.sequence[-model.max_len:]                                  # oldest first, [L]
        L = len(seq)
        if L == 0:
            self.metrics.cold_users.inc()
        items, n_oov = model.map_ids(job.items, "item")
        cates, _ = model.map_ids(job.cates, "cate")
        if n_oov:
            self.metrics.oov_items.inc(n_oov)
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
                           version=model.version, memory=memory)
