"""A serving search split over an idle core (retrieval.lend): the parts' merged top-k is the unsplit fused
kernel's, bit for bit (indices and scores), on random and adversarial histories (ties across parts, signed
zeros, k beyond a part, non-finite and near-overflow inputs that send rows to the reference); the parts
cover the history on block boundaries; the split runs only while a core is free, and the parts the lent core
has not started are searched by the caller (and reported so);
retrieval.topk splits inside a scoring batch; a service Scorer with a lender gives the scores one without gives.
Redis: the session's own server (tests/conftest.py)."""

from __future__ import annotations

import threading

import pytest
import torch

import retrieval
from kernels.topk_attention import cpu as fused
from retrieval import dispatch, lend
from retrieval.lend import CoreLender


@pytest.fixture
def split_all(monkeypatch):
    """Every search splits, however small (the size rule is a speed rule, not a correctness one)."""
    monkeypatch.setattr(lend, "SPLIT_MIN_WORK", 0)
    monkeypatch.setattr(lend, "SPLIT_MIN_EVENTS", 0)


def _case(kind: str, L: int, rows: int, d: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    q, x = torch.randn(rows, d, generator=gen), torch.randn(L, d, generator=gen)
    if kind == "all_equal":            # every score ties: the k lowest indices, all in the first part
        x[:] = x[0]
    elif kind == "mirrored":           # the second half repeats the first: each tie spans two parts
        h = L // 2
        x[h: 2 * h] = x[:h]
    elif kind == "signed_zeros":       # +0 and -0 scores tie
        x[:] = 0.0
        x[1::2] = -0.0
        q[:, 0] = 0.0
    elif kind == "integers":           # many exact ties at several scores
        q, x = torch.randint(-2, 3, (rows, d), generator=gen).float(), torch.randint(-1, 2, (L, d), generator=gen).float()
    elif kind == "outlier":            # one event far above the rest, in the second half
        x[L - 3] *= 1e6
    elif kind == "nan_second_half":    # a non-finite key in one half: every row goes to the reference, whole
        x[L - 5, 1] = float("nan")
    elif kind == "inf_query":          # one row's query is not finite
        q[2, 0] = float("inf")
    elif kind == "near_overflow":      # finite, but d max|q| max|x| near fp32's range in the second half only
        x[L - 7] = 3e18
        q[::2] *= 3e18
    return q, x


KINDS = ["normal", "all_equal", "mirrored", "signed_zeros", "integers", "outlier", "nan_second_half", "inf_query",
         "near_overflow"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("L,n,k", [(300, 300, 20), (1_000, 777, 20), (150, 150, 100), (5_000, 4_999, 64),
                                   (40_000, 39_000, 20)])
def test_split_search_equals_the_whole(split_all, kind, L, n, k):
    gen = torch.Generator().manual_seed(L + n + k + len(kind))
    q, x = _case(kind, L, 12, 17, gen)
    segments = [16, 1]
    want = fused.topk_fused(q, x, n, k, segments)
    seen = []
    lender = CoreLender(cores=2, on_split=lambda lent, here: seen.append((lent, here)))
    try:
        with lender.scoring():
            got = lender.search(q, x, n, k, segments)
        assert got is not None and lender.splits == 1 and len(seen) == 1 and sum(seen[0]) == len(lend.parts(n)) - 1
        assert torch.equal(got[1], want[1]), (got[1] != want[1]).nonzero()[:5]
        assert torch.equal(got[0].view(torch.int32), want[0].view(torch.int32))   # the same bits, NaN included
    finally:
        lender.close()


def test_merge_keeps_the_lower_index_on_a_tie_across_parts():
    # the same score in three parts, k = 4: the earlier parts' events first
    first = (torch.tensor([[2.0, 1.0]]), torch.tensor([[3, 0]]))
    second = (torch.tensor([[2.0, -float("inf")]]), torch.tensor([[1, -1]]))
    third = (torch.tensor([[2.0, 2.0]]), torch.tensor([[0, 5]]))
    bad = torch.zeros(1, dtype=torch.bool)
    scores, idx = lend.merge([first, second, third], [0, 64, 128, 200], bad, torch.zeros(1, 1), torch.zeros(200, 1),
                             200, 4, None)
    assert idx.tolist() == [[3, 65, 128, 133]] and scores.tolist() == [[2.0, 2.0, 2.0, 2.0]]


@pytest.mark.parametrize("n", [0, 1, 63, 64, 100, 127, 128, 129, 5_000, 10_000, 16_384, 100_000, 131_072, 1_000_000])
def test_parts_cover_the_history_on_block_boundaries(n):
    b = lend.parts(n)
    assert b[0] == 0 and b[-1] == n and (n == 0 or all(x < y for x, y in zip(b, b[1:])))
    assert all(x % lend.ALIGN == 0 for x in b[:-1])
    if len(b) > 2:
        assert len(b) - 1 == max(2, min(lend.MAX_PARTS, n // lend.PART_EVENTS) // 2 * 2)
        assert (len(b) - 1) % 2 == 0                       # two threads end together
    assert (len(b) > 2) == (n > lend.ALIGN)   # two parts whenever a block-aligned first part leaves events


def test_the_split_needs_a_free_core(split_all):
    gen = torch.Generator().manual_seed(0)
    q, x = torch.randn(8, 16, generator=gen), torch.randn(512, 16, generator=gen)
    busy = CoreLender(cores=1)           # one core, taken by the batch itself
    two = CoreLender(cores=2)
    wide = CoreLender(cores=2, threads_per_batch=2)
    try:
        with busy.scoring():
            assert busy.search(q, x, 512, 8, None) is None
        with two.scoring():
            assert two.search(q, x, 512, 8, None) is not None
            with two.scoring():          # a second batch scoring: no core left
                assert two.search(q, x, 512, 8, None) is None
        with wide.scoring():             # a batch on two threads takes both cores
            assert wide.search(q, x, 512, 8, None) is None
        assert two.search(q, x, 64, 8, None) is None   # too short to split (one 64-event block)
    finally:
        for lender in (busy, two, wide):
            lender.close()


def test_small_searches_run_whole():
    q, x = torch.randn(200, 33), torch.randn(40_000, 33)
    lender = CoreLender(cores=2)
    try:
        with lender.scoring():
            assert lender.search(q, x, 2_000, 20, None) is None          # too little work
            assert lender.search(q, x, 40_000, 20, None) is None         # fewer than two parts
            assert lender.search(q[:20], x, 40_000, 20, None) is None
        assert not lend.worth_splitting(200, lend.SPLIT_MIN_EVENTS - 1, 33)
        assert lend.worth_splitting(200, lend.SPLIT_MIN_EVENTS, 33) and not lend.worth_splitting(20, 100_000, 33)
    finally:
        lender.close()


def test_parts_the_lent_core_has_not_started_are_searched_here(split_all):
    gen = torch.Generator().manual_seed(1)
    q, x = torch.randn(16, 16, generator=gen), torch.randn(30_000, 16, generator=gen)
    seen = []
    lender = CoreLender(cores=2, on_split=lambda lent, here: seen.append((lent, here)))
    release = threading.Event()
    blocker = lender._pool.submit(release.wait)   # the lent thread is busy elsewhere
    try:
        with lender.scoring():
            got = lender.search(q, x, 30_000, 20, None)
        m = len(lend.parts(30_000)) - 1
        assert lender.splits == 1 and seen == [(0, m)] and lender.parts_here == m and lender.parts_lent == 0
        want = fused.topk_fused(q, x, 30_000, 20)
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
        with lender.scoring():                   # the borrowed core was given back
            assert lender._borrow()
            lender._give_back()
    finally:
        release.set()
        blocker.result()
        lender.close()


def test_retrieval_topk_splits_inside_a_scoring_batch(split_all, monkeypatch):
    monkeypatch.setenv(dispatch.AUTOTUNE_ENV, "0")   # the fixed rule: the fused kernel for >= 8 queries
    gen = torch.Generator().manual_seed(2)
    q, x = torch.randn(32, 33, generator=gen), torch.randn(4_000, 33, generator=gen)
    want = retrieval.topk(q, x, 3_900, 20, [32, 1])
    lender = CoreLender(cores=2)
    try:
        with lender.scoring():
            got = retrieval.topk(q, x, 3_900, 20, [32, 1])
        assert lender.splits == 1
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
        assert lend.current() is None            # the batch's lender does not outlive it
    finally:
        lender.close()


def test_a_scorer_with_a_lender_scores_as_one_without(split_all, monkeypatch, redis_server):
    import random
    import uuid

    from recsys.config.model import ModelConfig
    from recsys.config.serve import StateStoreConfig
    from recsys.models import build_model
    from service.metrics import ServiceMetrics
    from service.model_state import ModelStateUpdater, ServingModel
    from service.redis_conn import connect
    from service.scoring import Scorer, ScoreJob
    from service.state import Event, StateStore
    from test_service_support import cleanup_server_keys

    monkeypatch.setenv(dispatch.AUTOTUNE_ENV, "0")
    torch.manual_seed(0)
    serving = ServingModel(build_model(ModelConfig(max_len=2_000, top_k=8, dim_rep=8, dim_att=4, mlp=[8]), 500, 9),
                           "lend-v1", 500, 9, 2_000)
    prefix = f"t{uuid.uuid4().hex[:10]}:"
    cfg = StateStoreConfig(redis_url=redis_server, key_prefix=prefix, seq_cap=2_000, seq_slack=100, index_block=0)
    rng = random.Random(0)
    lender = CoreLender(cores=2)
    try:
        with connect(cfg) as handle:
            store = StateStore(handle.client, cfg)
            store.apply(ModelStateUpdater(serving), [Event(f"1-{j}", 1, rng.randrange(1, 520), rng.randrange(1, 9), 0,
                                                           1_000 * j) for j in range(1_500)])
            import numpy as np
            jobs = [ScoreJob(1, np.array([rng.randrange(1, 520) for _ in range(40)]),
                             np.array([rng.randrange(1, 9) for _ in range(40)]), False)]
            plain = Scorer(serving, store, ServiceMetrics()).run(jobs)[0]
            lent = Scorer(serving, store, ServiceMetrics(), lender=lender).run(jobs)[0]
        assert lender.splits == 1
        assert lent.scores == plain.scores and lent.history_length == plain.history_length == 1_500
    finally:
        lender.close()
        cleanup_server_keys(redis_server, prefix)


def test_the_training_layout_is_not_split(split_all, monkeypatch):
    # one history per query (a cold user's batch forward in the service): the lender stays out of it
    monkeypatch.setattr(dispatch, "choose", lambda *a: "fused")
    gen = torch.Generator().manual_seed(3)
    q, x, n = torch.randn(4, 16, generator=gen), torch.randn(4, 600, 16, generator=gen), torch.tensor([600, 1, 300, 0])
    want = retrieval.topk(q, x, n, 8)
    lender = CoreLender(cores=2)
    try:
        with lender.scoring():
            got = retrieval.topk(q, x, n, 8)
        assert lender.splits == 0 and torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    finally:
        lender.close()


def test_several_serving_processes_do_not_lend():
    from recsys.config.http import HttpConfig, ServiceConfig
    from service.serve import for_processes

    config = ServiceConfig(http=HttpConfig(port=1234))
    assert config.http.lend_idle_core                                   # on by default
    assert for_processes(config, 1, False).http.lend_idle_core          # one process: it sees every idle core
    assert not for_processes(config, 2, False).http.lend_idle_core      # uvicorn workers share the cores
    assert not for_processes(config, 1, True).http.lend_idle_core       # so do Ray Serve replicas
    assert for_processes(config, 2, False).http.port == 1234            # nothing else changes


def test_the_lent_thread_runs_off_the_callers_cpu(split_all):
    import os

    cpus = os.sched_getaffinity(0)
    here = min(cpus)
    lender = CoreLender(cores=2)
    q, x = torch.randn(8, 16), torch.randn(1_000, 16)
    try:
        os.sched_setaffinity(0, {here})                      # this thread on one CPU for the test
        with lender.scoring():
            assert lender.search(q, x, 1_000, 8, None) is not None
        assert os.sched_getaffinity(lender._lent_tid) == (cpus - {here} if len(cpus) > 1 else cpus)
    finally:
        os.sched_setaffinity(0, cpus)
        lender.close()
