"""An idle core lent to a serving search (retrieval.lend, the fused kernel's two-thread team): the result is the
one-thread search's bit for bit (indices and scores) on random and adversarial histories (ties, signed zeros, k
beyond the history, non-finite and near-overflow inputs that send rows to the reference), in each pass 1 (fp32,
bf16, int8), with both threads taking chunks; a member that comes late, never comes, or finds the search failed
changes nothing and never hangs; the lender lends only while a core is free and the search is big enough;
retrieval.topk lends inside a scoring batch; a service Scorer with a lender gives the scores one without gives.
Redis: the session's own server (tests/conftest.py)."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

import retrieval
from kernels.gather_keys import cpu as gather
from kernels.team import Team
from kernels.topk_attention import cpu as fused
from retrieval import dispatch, lend
from retrieval.lend import CoreLender


@pytest.fixture
def lend_all(monkeypatch):
    """Every search and gather is lent, however small (the size rules are speed rules, not correctness ones)."""
    monkeypatch.setattr(lend, "LEND_MIN_WORK", 0)
    monkeypatch.setattr(lend, "GATHER_MIN_WORDS", 0)


def _case(kind: str, L: int, rows: int, d: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    q, x = torch.randn(rows, d, generator=gen), torch.randn(L, d, generator=gen)
    if kind == "all_equal":            # every score ties: the k lowest indices, all in the first chunk
        x[:] = x[0]
    elif kind == "mirrored":           # the second half repeats the first: each tie spans two chunks
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


def _with_member(team: Team, search):
    """search() run with the team's member already waiting on another thread (it spins until the call opens), so
    that it takes chunks from the start -> (search's result, whether the member took part)."""
    team.reset()
    joined = []
    cpus = os.sched_getaffinity(0)
    here = min(cpus)
    others = cpus - {here} or cpus

    def member_work() -> None:
        os.sched_setaffinity(0, others)   # else the OS may queue it behind this thread until the search is over
        joined.append(team.join())

    member = threading.Thread(target=member_work)
    os.sched_setaffinity(0, {here})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as served; and torch's OpenMP workers would spin on the member's CPU
    try:
        member.start()
        time.sleep(0.02)   # torch's OpenMP workers, from the test's last op on two threads, stop spinning (~8 ms)
        return search(), joined
    finally:
        team.close()
        member.join(10)
        os.sched_setaffinity(0, cpus)
        torch.set_num_threads(threads)
        assert not member.is_alive()


def _same(got, want) -> None:
    assert torch.equal(got[1], want[1]), (got[1] != want[1]).nonzero()[:5]
    assert torch.equal(got[0].view(torch.int32), want[0].view(torch.int32))   # the same bits, NaN included


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows,d,L,n,k", [(12, 17, 300, 300, 20), (12, 17, 1_000, 777, 20), (12, 17, 150, 150, 100),
                                          (12, 17, 5_000, 4_999, 64), (12, 17, 40_000, 39_000, 20),
                                          (200, 33, 6_000, 5_000, 20), (40, 33, 20_000, 19_990, 20)])
def test_the_team_finds_what_one_thread_finds(kind, rows, d, L, n, k):
    # rows 200: int8 pass 1 where the CPU has it (bf16 or fp32 elsewhere); rows 40: bf16 where the CPU has it
    gen = torch.Generator().manual_seed(L + n + k + len(kind))
    q, x = _case(kind, L, rows, d, gen)
    segments = [d - 1, 1]
    want = fused.topk_fused(q, x, n, k, segments)
    team = fused.Team()
    got, joined = _with_member(team, lambda: fused.topk_fused(q, x, n, k, segments, team=team))
    _same(got, want)
    assert len(joined) == 1 and sum(team.chunks) > 0 and (team.chunks[1] > 0) <= joined[0]


def test_both_threads_take_chunks():
    gen = torch.Generator().manual_seed(5)
    q, x = torch.randn(200, 33, generator=gen), torch.randn(100_000, 33, generator=gen)
    want = fused.topk_fused(q, x, 100_000, 20, [32, 1])
    team = fused.Team()
    _both_take_chunks(team, lambda: fused.topk_fused(q, x, 100_000, 20, [32, 1], team=team), lambda got: _same(got, want))


def _both_take_chunks(team: Team, call, check) -> None:
    """call() with a member until both threads took chunks (the OS may keep the member off its core for a whole
    call: a few tries), check(result) each time."""
    shares = []
    for _ in range(5):
        got, _ = _with_member(team, call)
        check(got)
        shares.append(team.chunks)
        if min(team.chunks) > 0:
            break
    assert min(shares[-1]) > 0, shares


def test_a_member_that_comes_late_or_never_changes_nothing():
    gen = torch.Generator().manual_seed(6)
    q, x = torch.randn(64, 16, generator=gen), torch.randn(3_000, 16, generator=gen)
    want = fused.topk_fused(q, x, 3_000, 8)
    team = fused.Team()
    team.reset()
    _same(fused.topk_fused(q, x, 3_000, 8, team=team), want)   # nobody joined: the caller took every chunk
    assert team.chunks[1] == 0 and team.chunks[0] > 0
    assert team.join() is False                                # too late: returns at once
    team.reset()
    team.close()                                               # closed before the call
    assert team.join() is False
    # a search that fails before the kernel runs: the waiting member returns once the caller closes the team
    with pytest.raises(ValueError):
        _with_member(team, lambda: fused.topk_fused(q, x, 3_000, 0, team=team))


def test_the_training_layout_runs_alone():
    # rows go to workers by a fixed share there, so every member would have to come: the kernel does not wait
    gen = torch.Generator().manual_seed(3)
    q, x, n = torch.randn(4, 16, generator=gen), torch.randn(4, 600, 16, generator=gen), torch.tensor([600, 1, 300, 0])
    want = fused.topk_fused(q, x, n, 8)
    team = fused.Team()
    got, joined = _with_member(team, lambda: fused.topk_fused(q, x, n, 8, team=team))
    _same(got, want)
    assert joined == [False] and team.chunks == (0, 0)


def test_a_lent_search_equals_the_kernels(lend_all):
    gen = torch.Generator().manual_seed(7)
    q, x = torch.randn(200, 33, generator=gen), torch.randn(30_000, 33, generator=gen)
    want = fused.topk_fused(q, x, 29_000, 20, [32, 1])
    seen = []
    lender = CoreLender(cores=2, on_call=lambda kernel, lent, here: seen.append((kernel, lent, here)))
    try:
        for _ in range(3):
            with lender.scoring():
                _same(lender.search(q, x, 29_000, 20, [32, 1]), want)
        got = lender.lent["search"]
        assert got.calls == 3 and len(seen) == 3 and all(k == "search" and h > 0 for k, _, h in seen)
        assert got.chunks_lent == sum(t for _, t, _ in seen) and got.chunks_here == sum(h for _, _, h in seen)
        assert (got.chunks_lent > 0) == (got.joined > 0) and lender.lent["gather"].calls == 0
    finally:
        lender.close()


def test_lending_needs_a_free_core(lend_all):
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
    finally:
        for lender in (busy, two, wide):
            lender.close()


def test_small_searches_run_alone():
    q, x = torch.randn(200, 33), torch.randn(40_000, 33)
    lender = CoreLender(cores=2)
    small = lend.LEND_MIN_WORK // (200 * 33)
    try:
        with lender.scoring():
            assert lender.search(q, x, small - 1, 20, None) is None           # too little work
            assert lender.search(q, x, small + 1, 20, None) is not None
        assert not lend.worth_lending(200, small - 1, 33) and lend.worth_lending(200, small + 1, 33)
    finally:
        lender.close()


def test_a_busy_lent_core_leaves_the_search_here(lend_all):
    gen = torch.Generator().manual_seed(1)
    q, x = torch.randn(16, 16, generator=gen), torch.randn(30_000, 16, generator=gen)
    seen = []
    lender = CoreLender(cores=2, on_call=lambda kernel, lent, here: seen.append((lent, here)))
    release = threading.Event()
    blocker = lender._pool.submit(release.wait)   # the lent thread is busy elsewhere
    try:
        with lender.scoring():
            got = lender.search(q, x, 30_000, 20, None)
        assert lender.lent["search"].calls == 1 and lender.lent["search"].joined == 0
        assert seen[0][0] == 0 and seen[0][1] > 0
        _same(got, fused.topk_fused(q, x, 30_000, 20))
        with lender.scoring():                   # the borrowed core was given back
            assert lender._borrow()
            lender._give_back()
    finally:
        release.set()
        blocker.result()
        lender.close()


def test_a_failing_search_gives_the_core_back(lend_all):
    q, x = torch.randn(8, 16), torch.randn(512, 16)
    lender = CoreLender(cores=2)
    try:
        with lender.scoring():
            with pytest.raises(ValueError):
                lender.search(q, x, 512, 0, None)   # k = 0: refused before the kernel runs
            assert lender._borrow()                 # given back, and the lent thread is free again
            lender._give_back()
            assert lender.search(q, x, 512, 8, None) is not None
    finally:
        lender.close()


def test_retrieval_topk_lends_inside_a_scoring_batch(lend_all, monkeypatch):
    monkeypatch.setenv(dispatch.AUTOTUNE_ENV, "0")   # the fixed rule: the fused kernel for >= 8 queries
    gen = torch.Generator().manual_seed(2)
    q, x = torch.randn(32, 33, generator=gen), torch.randn(4_000, 33, generator=gen)
    want = retrieval.topk(q, x, 3_900, 20, [32, 1])
    lender = CoreLender(cores=2)
    try:
        with lender.scoring():
            got = retrieval.topk(q, x, 3_900, 20, [32, 1])
        assert lender.lent["search"].calls == 1
        _same(got, want)
        assert lend.current() is None            # the batch's lender does not outlive it
        # one history per query (a cold user's batch forward in the service): the lender stays out of it
        monkeypatch.setattr(dispatch, "choose", lambda *a: "fused")
        qt, xt, n = torch.randn(4, 16, generator=gen), torch.randn(4, 600, 16, generator=gen), torch.tensor([600, 1, 300, 0])
        want = retrieval.topk(qt, xt, n, 8)
        with lender.scoring():
            got = retrieval.topk(qt, xt, n, 8)
        assert lender.lent["search"].calls == 1
        _same(got, want)
    finally:
        lender.close()


def test_a_scorer_with_a_lender_scores_as_one_without(lend_all, monkeypatch, redis_server):
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
        assert lender.lent["search"].calls == 1 and lender.lent["gather"].calls == 1   # the search's keys
        assert lent.scores == plain.scores and lent.history_length == plain.history_length == 1_500
    finally:
        lender.close()
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


def test_the_lent_thread_runs_off_the_callers_cpu(lend_all):
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


def _fields(L: int, widths: list[int], gen: torch.Generator) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Tables of the given widths (1: a per-row number) and L ids into each."""
    tables = [torch.randn(997 + 13 * f, w, generator=gen) if w > 1 else torch.randn(997 + 13 * f, generator=gen)
              for f, w in enumerate(widths)]
    return tables, [torch.randint(0, t.shape[0], (L,), generator=gen) for t in tables]


@pytest.mark.parametrize("widths", [[16, 16, 1], [32, 1], [8, 16, 1], [5, 3]])   # fixed layouts, then the general loop
@pytest.mark.parametrize("L", [1, 2_047, 2_049, 30_001])                            # around the chunk of 2048 events
def test_the_gather_team_copies_what_one_thread_copies(widths, L):
    gen = torch.Generator().manual_seed(L + sum(widths))
    tables, ids = _fields(L, widths, gen)
    tables[0][3, 0] = float("nan")   # copied as bits, whichever thread copies it
    ids[0][L // 2] = 3
    want = gather.gather_keys(tables, ids)
    team = gather.Team()
    got, joined = _with_member(team, lambda: gather.gather_keys(tables, ids, team=team))
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    assert len(joined) == 1 and sum(team.chunks) == -(-L // 2048) and (team.chunks[1] > 0) <= joined[0]


def test_both_threads_take_gather_chunks():
    gen = torch.Generator().manual_seed(8)
    tables, ids = _fields(400_000, [16, 16, 1], gen)
    want = gather.gather_keys(tables, ids)
    team = gather.Team()

    def same(got):
        assert torch.equal(got, want)

    _both_take_chunks(team, lambda: gather.gather_keys(tables, ids, team=team), same)


def test_a_team_gather_names_the_first_bad_id():
    # bad ids in several chunks, whichever thread reaches its chunk first: the earliest (event, field) is named
    gen = torch.Generator().manual_seed(9)
    tables, ids = _fields(20_000, [16, 16, 1], gen)
    ids[2][15_000] = -1
    ids[1][9_000] = tables[1].shape[0]
    ids[0][9_000 + 1] = 10**9
    team = gather.Team()
    for _ in range(3):
        with pytest.raises(IndexError, match=r"ids\[1\]\[9000\]"):
            _with_member(team, lambda: gather.gather_keys(tables, ids, team=team))
    with pytest.raises(IndexError, match=r"ids\[1\]\[9000\]"):
        gather.gather_keys(tables, ids)


def test_a_gather_member_that_comes_late_or_never_changes_nothing():
    gen = torch.Generator().manual_seed(10)
    tables, ids = _fields(9_000, [16, 16, 1], gen)
    want = gather.gather_keys(tables, ids)
    team = gather.Team()
    assert torch.equal(gather.gather_keys(tables, ids, team=team), want)   # nobody joined: the caller took all
    assert team.chunks == (5, 0)
    assert team.join() is False                                            # too late: returns at once
    team.reset()
    team.close()
    assert team.join() is False
    with pytest.raises(ValueError):   # fails before the kernel: the waiting member returns once the team closes
        _with_member(team, lambda: gather.gather_keys(tables, ids, out=torch.empty(3, 3), team=team))


def test_the_lender_gathers_only_what_pays(monkeypatch):
    gen = torch.Generator().manual_seed(11)
    tables, ids = _fields(70_000, [16, 16, 1], gen)
    lender = CoreLender(cores=2)
    small = lend.GATHER_MIN_WORDS // 33
    try:
        with lender.scoring():
            assert lender.gather(tables, [i[:small - 1] for i in ids]) is None                # too little work
            got = lender.gather(tables, [i[:small + 1] for i in ids])
            assert torch.equal(got, gather.gather_keys(tables, [i[:small + 1] for i in ids]))
            monkeypatch.setenv(gather.SWITCH_ENV, "0")                                       # no C gather: no team
            assert lender.gather(tables, ids) is None
        assert lender.lent["gather"].calls == 1 and lender.lent["search"].calls == 0
    finally:
        lender.close()


def test_stage1_keys_gathered_with_a_lent_core_are_the_same(lend_all):
    from recsys.models.attention import stage1_from_tables

    gen = torch.Generator().manual_seed(12)
    tables, ids = _fields(5_000, [16, 16, 16], gen)
    target = [torch.randn(40, 16, generator=gen), torch.randn(40, 16, generator=gen),
              torch.randn(1, 16, generator=gen).expand(40, 16)]   # DARE: every target at one position row
    want = stage1_from_tables(target, tables, ids, [32, 16])
    lender = CoreLender(cores=2)
    try:
        with lender.scoring():
            got = stage1_from_tables(target, tables, ids, [32, 16])
        assert lender.lent["gather"].calls == 1
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and got[2] == want[2] == [32, 1]
    finally:
        lender.close()


def test_the_services_metrics_count_the_lent_chunks(lend_all):
    from prometheus_client import generate_latest

    from service.metrics import ServiceMetrics

    metrics = ServiceMetrics()
    gen = torch.Generator().manual_seed(13)
    tables, ids = _fields(9_000, [16, 16, 1], gen)
    q, x = torch.randn(40, 33, generator=gen), torch.randn(9_000, 33, generator=gen)
    lender = CoreLender(cores=2, on_call=metrics.count_lent)
    try:
        with lender.scoring():
            lender.search(q, x, 9_000, 20, [32, 1])
            lender.gather(tables, ids)
    finally:
        lender.close()
    text = generate_latest(metrics.registry).decode()
    for kernel in ("search", "gather"):
        stats = lender.lent[kernel]
        for by, n in (("lent", stats.chunks_lent), ("batch", stats.chunks_here)):
            assert f'recsys_score_lent_chunks_total{{by="{by}",kernel="{kernel}"}} {float(n)}' in text
        assert stats.calls == 1 and stats.chunks_lent + stats.chunks_here > 0
