"""The choice between the block index and the whole-sequence read (service.scoring.PathCosts): either path
gives the same scores; the decision follows the costs it is given at both of its points (before the seed
search, after it); the costs are fitted from the timings they are fed; the fallback accounting (the share that
makes the first read bring the whole sequence, the bytes read) holds whichever way the costs decide.
Redis: the session's own server (tests/conftest.py)."""

from __future__ import annotations

import random
import uuid

import numpy as np
import pytest
import torch

import service.block_index
from recsys.config.model import ModelConfig
from recsys.config.serve import StateStoreConfig
from recsys.models import build_model
from service.metrics import ServiceMetrics
from service.model_state import ModelStateUpdater, ServingModel
from service.redis_conn import connect
from service.scoring import COST_RATE, COST_WARMUP, EXPLORE_FACTOR, LinearCost, PathCosts, Scorer, ScoreJob
from service.state import Event, StateStore
from helpers import prefer_recent_positions
from test_service_support import cleanup_server_keys

BLOCK = 8


def _serving(decay: float = 1.0) -> ServingModel:
    """A small DARE whose position term prefers recent events (as a trained one's does): the index prunes."""
    torch.manual_seed(0)
    cfg = ModelConfig(max_len=400, top_k=4, dim_rep=8, dim_att=4, mlp=[8], init_std=0.3)
    serving = ServingModel(build_model(cfg, 60, 7), "pc-v1", 60, 7, 400)
    prefer_recent_positions(serving.model, decay)
    return serving


@pytest.fixture
def store_cfg(redis_server):
    prefix = f"t{uuid.uuid4().hex[:10]}:"
    yield StateStoreConfig(redis_url=redis_server, key_prefix=prefix, seq_cap=300, seq_slack=20, index_block=BLOCK,
                           index_seed=BLOCK)
    cleanup_server_keys(redis_server, prefix)


@pytest.fixture
def users(store_cfg):
    """(serving model, Redis handle, store) with users 1-3 holding 40, 170 and 300 events."""
    serving = _serving()
    rng = random.Random(0)
    with connect(store_cfg) as handle:
        store = StateStore(handle.client, store_cfg)
        for u, n in ((1, 40), (2, 170), (3, 300)):
            store.apply(ModelStateUpdater(serving), [Event(f"{u}-{j}", u, rng.randrange(1, 70), rng.randrange(1, 9),
                                                           0, 1_000 * j) for j in range(n)])
        yield serving, handle, store


def _jobs(n: int, seed: int = 0, users=(1, 2, 3)) -> list[ScoreJob]:
    g = np.random.default_rng(seed)
    return [ScoreJob(users[j % len(users)], g.integers(1, 70, 20), g.integers(1, 9, 20), True) for j in range(n)]


def _costs(whole: float, seed: float, index: tuple[float, float], read: float = 0.0, explore_every: int = 0):
    """Fixed costs: the whole path's forward `whole` s and read `read` s; the index's seed search `seed` s
    and a + b x s for x candidate blocks."""
    return lambda: PathCosts(read=LinearCost((read, 0.0)), forward=LinearCost((whole, 0.0)),
                             seed=LinearCost((seed, 0.0)), index=LinearCost(index), explore_every=explore_every)


def _exec_calls(client) -> int:
    return int(client.info("commandstats").get("cmdstat_exec", {}).get("calls", 0))


def _count_searches(monkeypatch) -> list[int]:
    calls = []
    real = service.block_index.begin_search

    def counted(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(service.block_index, "begin_search", counted)
    return calls


# ---- the fit ------------------------------------------------------------------------------------------------


def test_linear_cost_fits_a_line_and_follows_recent_timings():
    c = LinearCost()
    assert c.predict(1_000) is None
    for x in (1_000, 5_000, 9_000, 3_000):
        c.observe(x, 0.002 + 3e-7 * x)
    assert c.predict(20_000) == pytest.approx(0.002 + 3e-7 * 20_000, rel=1e-9)
    assert c.predict(0) == pytest.approx(0.002, rel=1e-9)
    # the machine got twice as slow: the fit follows within a few tens of requests
    for j in range(40):
        c.observe((1_000, 9_000)[j % 2], 2 * (0.002 + 3e-7 * (1_000, 9_000)[j % 2]))
    assert c.predict(5_000) == pytest.approx(2 * (0.002 + 3e-7 * 5_000), rel=0.01)


def _mean(values):
    """The fit's weighting of two observations: the older one weighs 1 - COST_RATE."""
    return ((1 - COST_RATE) * values[0] + values[1]) / (2 - COST_RATE)


def test_linear_cost_is_proportional_where_x_did_not_vary_or_the_fixed_part_came_out_negative():
    one = LinearCost()
    for y in (0.004, 0.006):             # every request at one history length
        one.observe(10_000, y)
    assert one.predict(100_000) == pytest.approx(10 * _mean((0.004, 0.006)), rel=1e-9)
    neg = LinearCost()
    for x, y in ((1_000, 0.001), (2_000, 0.004)):   # a line through (0, -0.002): noise, not a negative cost
        neg.observe(x, y)
    assert neg.predict(3_000) == pytest.approx(_mean((0.001, 0.004)) * 3_000 / _mean((1_000, 2_000)), rel=1e-9)
    flat = LinearCost()
    for x, y in ((1_000, 0.003), (2_000, 0.002)):   # dearer at fewer events: no per-event cost to be seen
        flat.observe(x, y)
    assert flat.predict(10_000) == pytest.approx(_mean((0.003, 0.002)), rel=1e-9)


def test_prefer_index_ranks_by_cost_and_explores_only_a_path_within_the_factor():
    costs = _costs(whole=0.003, seed=0.001, index=(0.001, 0.0005), read=0.001)()
    w = costs.whole_s(300, 300, prefetched=False)
    assert w == 0.004 and costs.whole_s(300, 300, prefetched=True) == 0.003   # the first read brought it
    assert costs.prefer_index(w, 2, True, False) is True     # 0.001 + 0.001 + 0.001 <= 0.004
    assert costs.prefer_index(w, 6, True, False) is False    # 0.005
    assert costs.prefer_index(w, 6, False, False) is True    # the seed search already paid: 0.004
    assert costs.prefer_index(w, 6, True, True) is True      # exploring: 0.005 is within 4x of 0.004
    far = 4 * EXPLORE_FACTOR * 0.004 / 0.0005
    assert costs.prefer_index(w, int(far), True, True) is False
    assert PathCosts().prefer_index(w, 2, True, False) is None   # nothing timed: the fixed rule decides
    explore = PathCosts(explore_every=3)
    assert [explore.explore() for _ in range(6)] == [False, False, True, False, False, True]


# ---- the scorer ---------------------------------------------------------------------------------------------


def test_either_forced_path_gives_the_same_scores(users):
    serving, handle, store = users
    jobs = _jobs(6)
    metrics = {"index": ServiceMetrics(), "whole": ServiceMetrics()}
    index = Scorer(serving, store, metrics["index"], costs=lambda: PathCosts.forced("index")).run(jobs)
    whole = Scorer(serving, store, metrics["whole"], costs=lambda: PathCosts.forced("whole")).run(jobs)
    for path, out in (("index", index), ("whole", whole)):   # each request counted under the path that answered
        m = metrics[path].registry.get_sample_value
        assert m("recsys_score_path_total", {"path": path}) == len(jobs)
        assert m("recsys_score_path_total", {"path": "whole" if path == "index" else "index"}) is None
        assert m("recsys_score_redis_bytes_total") == sum(r.bytes_read for r in out) > 0
    assert sum(r.bytes_read for r in index) < sum(r.bytes_read for r in whole)
    for a, b in zip(index, whole):
        assert a.blocks_read is not None and b.blocks_read is None
        assert a.blocks_read < -(-a.history_length // BLOCK) - 1, "nothing pruned: a weak test of the index"
        assert a.explanations == b.explanations and a.history_length == b.history_length
        assert a.scores == b.scores


@pytest.mark.parametrize("whole,index,path", [(0.010, (0.001, 0.0), "index"), (0.001, (0.010, 0.0), "whole")])
def test_the_cheaper_path_answers_and_a_sure_loser_skips_the_seed_search(users, monkeypatch, whole, index, path):
    serving, handle, store = users
    searches = _count_searches(monkeypatch)
    out = Scorer(serving, store, ServiceMetrics(), costs=_costs(whole, 0.0005, index)).run(_jobs(3))
    assert all((r.blocks_read is not None) == (path == "index") for r in out), [r.blocks_read for r in out]
    assert len(searches) == (3 if path == "index" else 0)


def test_after_the_seed_search_the_candidate_blocks_decide(users, monkeypatch):
    """The position term alone leaves few blocks for sure, so the seed search runs; what it leaves decides:
    a per-block cost that makes the index dearer than the whole read at that many blocks sends the request
    to the whole read (and the next one straight there: the search is expected to leave as many), a smaller
    one keeps it on the index."""
    from service.block_index import begin_search, surely_kept

    serving, handle, store = users
    ix = serving.block_indexer(BLOCK)
    job = _jobs(1, users=(3,))[0]
    head = store.read_index_heads([3], serving.version, ix.fmt, BLOCK, False)[0]
    kept = surely_kept(ix, head, serving.max_len, serving.model.k)
    items, cates, *_ = serving.map_candidates(job.items, job.cates)
    n = len(begin_search(ix, head, items, cates, serving.max_len, serving.model.k).candidates)
    assert kept < n, (kept, n)
    b = 0.020 / (kept + n)   # index(kept) = 0.020 kept / (kept + n) < 0.010 < index(n)
    searches = _count_searches(monkeypatch)
    dear = Scorer(serving, store, ServiceMetrics(), costs=_costs(0.010, 0.0, (0.0, b)))
    got = dear.run([job])[0]
    assert len(searches) == 1 and got.blocks_read is None
    # the next request expects the search to leave as many blocks again: it reads the whole sequence at once
    assert dear.path_costs(serving.version).beyond_sure.predict(1) == n - kept
    got = dear.run([job])[0]
    assert len(searches) == 1 and got.blocks_read is None
    cheap = Scorer(serving, store, ServiceMetrics(), costs=_costs(0.010, 0.0, (0.0, 0.5 * 0.010 / n)))
    for _ in range(2):
        assert cheap.run([job])[0].blocks_read is not None
    assert len(searches) == 3


def test_exploring_requests_take_the_dearer_path_only_within_the_factor(users):
    serving, handle, store = users
    near = Scorer(serving, store, ServiceMetrics(), costs=_costs(0.004, 0.001, (0.006, 0.0), explore_every=2))
    far = Scorer(serving, store, ServiceMetrics(), costs=_costs(0.004, 0.001, (0.030, 0.0), explore_every=2))
    for scorer, want in ((near, [False, True] * 3), (far, [False] * 6)):
        got = [scorer.run([job])[0].blocks_read is not None for job in _jobs(6)]
        assert got == want


def test_timings_fit_the_costs_and_each_path_is_timed_once_its_rival_has_been(users):
    """A fresh scorer: the fixed rule takes one path (here the index: the position term prunes) until its
    parts are timed past their warm-up (COST_WARMUP: a process's first timing is not fitted); then requests,
    past the seed search, take the untimed whole read until it is timed too; from then on both are timed and
    every request feeds the path it took."""
    serving, handle, store = users
    scorer = Scorer(serving, store, ServiceMetrics())
    costs = scorer.path_costs(serving.version)
    assert COST_WARMUP == 1
    first = scorer.run(_jobs(1, users=(3,)))[0]
    assert first.blocks_read is not None
    assert costs.index.seen == costs.seed.seen == 0 and costs.index.predict(3) is None   # the warm-up timing
    assert scorer.run(_jobs(1, seed=1, users=(3,)))[0].blocks_read is not None
    assert costs.index.seen == costs.seed.seen == 1 and costs.forward.seen == costs.read.seen == 0
    for j in (2, 3):   # the whole read: its warm-up, then its first fitted timing
        assert scorer.run(_jobs(1, seed=j, users=(3,)))[0].blocks_read is None
    assert costs.seed.seen == 3 and costs.index.seen == 1 and costs.forward.seen == costs.read.seen == 1
    assert costs.forward.predict(300) > 0 and costs.read.predict(300) > 0 and costs.index.predict(3) > 0
    out = scorer.run(_jobs(4, seed=4))
    taken = sum(r.blocks_read is not None for r in out)
    assert costs.index.seen == 1 + taken and costs.forward.seen == 1 + 4 - taken
    assert scorer.path_costs("another") is not costs and scorer.path_costs(serving.version) is not costs


def test_a_cold_first_timing_does_not_price_a_path_out():
    """A process's first seed search cost 15.7 ms where the next ones cost ~1 ms: fitted, it priced the index
    path above the whole read until an exploring request (every 256th) timed it again."""
    costs = PathCosts()
    for y in (0.0157, 0.001, 0.001):
        costs.seed.observe(1, y)
    for y in (0.2, 0.004, 0.004):
        costs.index.observe(30, y)
    assert costs.seed.predict(1) == pytest.approx(0.001) and costs.index.predict(30) == pytest.approx(0.004)
    assert costs.prefer_index(0.017, 30, True, False) is True
    assert PathCosts().beyond_sure.warmup == 0   # a block count, not a timing: its first value is as good


def test_fallbacks_chosen_by_cost_make_the_first_read_bring_the_whole_sequence(users):
    """Whole reads chosen by cost count as fallbacks: once most recent requests fell back the first read
    brings the whole sequence (one round trip, not two), and the bytes read are those of the reads made."""
    serving, handle, store = users
    ix = serving.block_indexer(BLOCK)
    head = store.read_index_heads([2], serving.version, ix.fmt, BLOCK, False)[0]
    plain = Scorer(serving, StateStore(handle.client, store.cfg.model_copy(update={"index_block": 0})),
                   ServiceMetrics())
    scorer = Scorer(serving, store, ServiceMetrics(), costs=_costs(0.001, 0.001, (0.010, 0.0)))
    trips = []
    for job in _jobs(9, users=(2,)):
        before = _exec_calls(handle.client)
        got = scorer.run([job])[0]
        trips.append(_exec_calls(handle.client) - before)
        want = plain.run([job])[0]
        assert got.blocks_read is None and got.scores == want.scores
        # the heads' bytes on top of the whole read's, until the whole read comes with the heads
        assert got.bytes_read == want.bytes_read + (head.bytes_read if trips[-1] == 2 else 0)
    # the share of fallbacks (EWMA, 1/8 a request) passes one half at the 6th request
    assert trips == [2] * 6 + [1] * 3, trips
    # where the index is cheaper, nothing falls back: the heads, then the summaries where the position bound
    # leaves blocks past the seed, and the blocks where the summaries leave any
    scorer = Scorer(serving, store, ServiceMetrics(), costs=_costs(0.010, 0.001, (0.001, 0.0)))
    for job in _jobs(8, users=(2,)):
        before = _exec_calls(handle.client)
        blocks = scorer.run([job])[0].blocks_read
        assert blocks is not None
        assert _exec_calls(handle.client) - before in ((3,) if blocks else (1, 2))


def test_a_whole_read_brought_by_the_first_read_does_not_keep_itself_on(users):
    """With the whole sequence already read, the whole path costs only its forward and wins (3 ms against the
    index's 4); without it, it costs 5 ms and the index wins. Those choices count as the index's in the
    share of fallbacks, so the first read stops bringing the whole sequence and the index answers."""
    serving, handle, store = users
    scorer = Scorer(serving, store, ServiceMetrics(), costs=_costs(0.003, 0.0, (0.004, 0.0), read=0.002))
    scorer._fallback_share[serving.version] = 1.0          # as after a run of fallbacks
    got = [scorer.run([job])[0].blocks_read is not None for job in _jobs(8, users=(2,))]
    # 1, 7/8, (7/8)^2, ...: at or below one half from the 7th request on
    assert got == [False] * 6 + [True] * 2, got
