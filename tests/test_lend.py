"""An idle core lent to a serving search (retrieval.lend): the search on the kernel's threads over the free cores is
the one-thread kernel's, bit for bit, on random and adversarial histories (ties, signed zeros, k beyond the
history, non-finite and near-overflow inputs); it runs only while a core is free and the search is large
enough; each way is tried once, then the faster by measured time per unit of work, the other every EXPLORE-th
time; retrieval.topk lends inside a scoring batch and never in the training layout; a service Scorer with a
lender gives the scores one without gives; several serving processes do not lend. Redis: the session's own
server (tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

import retrieval
from kernels.topk_attention import cpu as fused
from retrieval import dispatch, lend
from retrieval.lend import CoreLender


@pytest.fixture
def lend_all(monkeypatch):
    """Every search may borrow, however small (the size rule is a speed rule, not a correctness one)."""
    monkeypatch.setattr(lend, "SPLIT_MIN_WORK", 0)


def _case(kind: str, L: int, rows: int, d: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    q, x = torch.randn(rows, d, generator=gen), torch.randn(L, d, generator=gen)
    if kind == "all_equal":            # every score ties: the k lowest indices
        x[:] = x[0]
    elif kind == "mirrored":           # the second half repeats the first: ties across the threads' chunks
        h = L // 2
        x[h: 2 * h] = x[:h]
    elif kind == "signed_zeros":       # +0 and -0 scores tie
        x[:] = 0.0
        x[1::2] = -0.0
        q[:, 0] = 0.0
    elif kind == "integers":           # many exact ties at several scores
        q, x = torch.randint(-2, 3, (rows, d), generator=gen).float(), torch.randint(-1, 2, (L, d), generator=gen).float()
    elif kind == "outlier":            # one event far above the rest, near the end
        x[L - 3] *= 1e6
    elif kind == "nan_key":            # a non-finite key: every row goes to the reference
        x[L - 5, 1] = float("nan")
    elif kind == "inf_query":          # one row's query is not finite
        q[2, 0] = float("inf")
    elif kind == "near_overflow":      # finite, but d max|q| max|x| near fp32's range
        x[L - 7] = 3e18
        q[::2] *= 3e18
    return q, x


KINDS = ["normal", "all_equal", "mirrored", "signed_zeros", "integers", "outlier", "nan_key", "inf_query",
         "near_overflow"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("L,n,k,rows", [(300, 300, 20, 12), (1_000, 777, 20, 12), (150, 150, 200, 12),
                                        (20_000, 19_000, 20, 130), (5_000, 4_999, 64, 3)])
def test_the_team_search_equals_the_one_thread_kernel(lend_all, monkeypatch, kind, L, n, k, rows):
    gen = torch.Generator().manual_seed(L + n + k + len(kind))
    q, x = _case(kind, L, rows, 17, gen)
    segments = [16, 1]
    want = fused.topk_fused(q, x, n, k, segments, threads=1)
    threads = []
    kernel = fused.topk_fused
    monkeypatch.setattr(lend.fused, "topk_fused", lambda *a, **kw: threads.append(kw["threads"]) or kernel(*a, **kw))
    seen = []
    lender = CoreLender(cores=2, on_search=seen.append)
    lender.rate[False] = 1.0   # alone already timed and slow: the team runs
    with lender.scoring():
        got = lender.search(q, x, n, k, segments)
    assert seen == [True] and lender.searches == {True: 1, False: 0} and threads == [2]   # the free core's thread too
    assert torch.equal(got[1], want[1]), (got[1] != want[1]).nonzero()[:5]
    assert torch.equal(got[0].view(torch.int32), want[0].view(torch.int32))   # the same bits, NaN included


def test_each_way_once_then_the_faster_and_the_other_every_explore_th(lend_all):
    q, x = torch.randn(8, 16), torch.randn(512, 16)
    seen = []
    lender = CoreLender(cores=2, on_search=seen.append)
    with lender.scoring():
        for _ in range(2):
            lender.search(q, x, 512, 8, None)
        assert seen == [True, False] and None not in lender.rate.values()
        lender.rate.update({True: 1.0, False: 2.0})   # the team measured faster (the next timings barely move it)
        seen.clear()
        for _ in range(2 * lend.EXPLORE):
            lender.search(q, x, 512, 8, None)
            lender.rate.update({True: 1.0, False: 2.0})
    alone = [i for i, team in enumerate(seen) if not team]
    assert len(alone) == 2 and alone[1] - alone[0] == lend.EXPLORE
    with lender.scoring():                            # alone measured faster: alone, the team every EXPLORE-th
        seen.clear()
        for _ in range(2 * lend.EXPLORE):
            lender.rate.update({True: 2.0, False: 1.0})
            lender.search(q, x, 512, 8, None)
    assert seen.count(True) == 2


def test_a_timing_moves_the_average_by_its_weight(lend_all):
    q, x = torch.randn(8, 16), torch.randn(512, 16)
    lender = CoreLender(cores=2)
    lender.rate.update({True: 1.0, False: 1e9})       # the team is chosen, and its timing is far below 1.0
    with lender.scoring():
        lender.search(q, x, 512, 8, None)
    assert lender.rate[True] == pytest.approx(1.0 - lend.WEIGHT, rel=1e-3)


def test_lending_needs_a_free_core_and_enough_work(lend_all, monkeypatch):
    q, x = torch.randn(8, 16), torch.randn(512, 16)
    busy = CoreLender(cores=1)             # one core, taken by the batch itself
    two = CoreLender(cores=2)
    wide = CoreLender(cores=2, threads_per_batch=2)
    with busy.scoring():
        assert busy.search(q, x, 512, 8, None) is None
    with two.scoring():
        assert two.search(q, x, 512, 8, None) is not None
        with two.scoring():                # a second batch scoring: no core left
            assert two.search(q, x, 512, 8, None) is None
    with wide.scoring():                   # a batch on two threads takes both cores
        assert wide.search(q, x, 512, 8, None) is None
    monkeypatch.setattr(lend, "SPLIT_MIN_WORK", 8 * 512 * 16 + 1)
    with two.scoring():
        assert two.search(q, x, 512, 8, None) is None   # too little work
    assert two._borrow() == 2                            # no batch scoring, nothing lent: both cores free
    two._give_back()


def test_retrieval_topk_lends_inside_a_scoring_batch(lend_all, monkeypatch):
    monkeypatch.setenv(dispatch.AUTOTUNE_ENV, "0")   # the fixed rule: the fused kernel for >= 8 queries
    gen = torch.Generator().manual_seed(2)
    q, x = torch.randn(32, 33, generator=gen), torch.randn(4_000, 33, generator=gen)
    want = retrieval.topk(q, x, 3_900, 20, [32, 1])
    lender = CoreLender(cores=2)
    with lender.scoring():
        got = retrieval.topk(q, x, 3_900, 20, [32, 1])
    assert sum(lender.searches.values()) == 1
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    assert lend.current() is None            # the batch's lender does not outlive it


def test_the_training_layout_is_not_lent(lend_all, monkeypatch):
    # one history per query (a cold user's batch forward in the service): the lender stays out of it
    monkeypatch.setattr(dispatch, "choose", lambda *a: "fused")
    gen = torch.Generator().manual_seed(3)
    q, x, n = torch.randn(4, 16, generator=gen), torch.randn(4, 600, 16, generator=gen), torch.tensor([600, 1, 300, 0])
    want = retrieval.topk(q, x, n, 8)
    lender = CoreLender(cores=2)
    with lender.scoring():
        got = retrieval.topk(q, x, n, 8)
    assert sum(lender.searches.values()) == 0 and torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


def test_a_scorer_with_a_lender_scores_as_one_without(lend_all, monkeypatch, redis_server):
    import random
    import uuid

    import numpy as np

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
    lender.rate[False] = 1.0   # the team runs
    try:
        with connect(cfg) as handle:
            store = StateStore(handle.client, cfg)
            store.apply(ModelStateUpdater(serving), [Event(f"1-{j}", 1, rng.randrange(1, 520), rng.randrange(1, 9), 0,
                                                           1_000 * j) for j in range(1_500)])
            jobs = [ScoreJob(1, np.array([rng.randrange(1, 520) for _ in range(40)]),
                             np.array([rng.randrange(1, 9) for _ in range(40)]), False)]
            plain = Scorer(serving, store, ServiceMetrics()).run(jobs)[0]
            lent = Scorer(serving, store, ServiceMetrics(), lender=lender).run(jobs)[0]
        assert lender.searches[True] == 1
        assert lent.scores == plain.scores and lent.history_length == plain.history_length == 1_500
    finally:
        cleanup_server_keys(redis_server, prefix)


def test_several_serving_processes_do_not_lend():
    from recsys.config.http import HttpConfig, ServiceConfig
    from service.serve import for_processes

    config = ServiceConfig(http=HttpConfig(port=1234))
    assert config.http.lend_idle_core                                   # on by default
    assert for_processes(config, 1, False).http.lend_idle_core          # one process: it sees every idle core
    assert not for_processes(config, 2, False).http.lend_idle_core      # uvicorn workers share the cores
    assert not for_processes(config, 1, True).http.lend_idle_core       # so do Ray Serve replicas
    assert for_processes(config, 2, False).http.port == 1234            # nothing else changes
