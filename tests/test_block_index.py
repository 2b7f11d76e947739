"""The per-user block index (service.block_index, retrieval.block_search): the pruned search equals the
reference top-k (indices exactly, scores to fp32 rounding) on random and adversarial histories; the index the stream worker keeps
bounds what a rebuild computes; a request scored through the index equals the whole-sequence score; a
reload's rebuild writes the new version's index. Redis: the session's own server (tests/conftest.py)."""

from __future__ import annotations

import copy
import random
import uuid

import numpy as np
import pytest
import torch

from kernels.topk_attention.reference import segment_scale, topk_reference
from recsys.config.model import ModelConfig
from recsys.config.serve import StateStoreConfig
from recsys.models import build_model
from retrieval.block_search import PositionBound, pruned_topk
from service.metrics import ServiceMetrics
from service.model_state import ModelStateUpdater, ServingModel
from service.redis_conn import connect
from service.scoring import Scorer, ScoreJob
from service.state import RECORD_BYTES, Event, StateStore
from helpers import prefer_recent_positions
from test_service_support import cleanup_server_keys

D = 4
SEGS = [2 * D, D]


def _check(q: torch.Tensor, keys: torch.Tensor, P: torch.Tensor, k: int, block: int, seed: int | None = None) -> int:
    pos = PositionBound(P[0] * segment_scale(3 * D, SEGS)[2 * D:], P, block)
    s, i, n = pruned_topk(q, keys, k, SEGS, block, pos, 2 * D, seed=seed)
    rs, ri = topk_reference(q, keys, keys.shape[0], k, SEGS)
    assert torch.equal(i, ri), (i, ri)
    # fp32 matmuls round differently per shape (the reference scores all L columns at once, the search a
    # few blocks at a time): a few ulp, measured <= 2e-6 at d = 48
    torch.testing.assert_close(s, rs, rtol=1e-6, atol=2e-6)
    return n


def _history(L: int, P: torch.Tensor, sem: torch.Tensor) -> torch.Tensor:
    return torch.cat([sem, P[1:L + 1]], 1)


@pytest.mark.parametrize("L", [0, 1, 7, 8, 9, 63, 64, 65, 1000])
@pytest.mark.parametrize("block", [8, 16])
def test_pruned_search_equals_reference_random(L, block):
    g = torch.Generator().manual_seed(L * 31 + block)
    P = torch.randn(L + 2, D, generator=g)
    keys = _history(L, P, torch.randn(L, 2 * D, generator=g))
    q = torch.cat([torch.randn(5, 2 * D, generator=g), P[0].expand(5, D)], 1)
    for k in (1, 3, 20):
        _check(q, keys, P, k, block)


def test_pruned_search_adversarial_histories():
    g = torch.Generator().manual_seed(0)
    L, block = 203, 8                                    # not a multiple of the block size
    P = torch.randn(L + 2, D, generator=g) * 0.01
    # all keys equal (every score ties: the k most recent win, and every block's bound is reached)
    sem = torch.ones(L, 2 * D)
    P_flat = torch.zeros(L + 2, D)
    q = torch.cat([torch.randn(4, 2 * D, generator=g), P_flat[0].expand(4, D)], 1)
    assert _check(q, _history(L, P_flat, sem), P_flat, 5, block) > 0
    # one huge outlier far back, the rest small: found, and ties among the rest still go to lower indices
    sem = torch.randint(-1, 2, (L, 2 * D), generator=g).float()
    sem[L - 3] = 50.0
    q = torch.cat([torch.rand(4, 2 * D, generator=g), P[0].expand(4, D)], 1)
    _check(q, _history(L, P, sem), P, 6, block)
    # strong recency decay: the best semantic matches sit in the oldest block and must still be found
    P_decay = torch.zeros(L + 2, D)
    P_decay[:, 0] = 1.0
    P_decay[1:, 1] = -torch.linspace(0, 3, L + 1)
    P_decay[0, 1] = 1.0
    sem = torch.randn(L, 2 * D, generator=g) * 0.1
    target = torch.randn(2 * D, generator=g)
    sem[L - 2] = target * 10
    q = torch.cat([target.expand(3, -1), P_decay[0].expand(3, D)], 1)
    _check(q, _history(L, P_decay, sem), P_decay, 4, block)
    # recency decay and random semantics: far blocks are pruned (the bound does its job)
    sem = torch.randn(L, 2 * D, generator=g) * 0.05
    q = torch.cat([torch.randn(3, 2 * D, generator=g), P_decay[0].expand(3, D)], 1)
    n = _check(q, _history(L, P_decay, sem), P_decay, 4, block, seed=block)
    assert n < -(-L // block) - 1, f"{n} blocks scored: nothing pruned"
    # a seed larger than the history, and k larger than it
    _check(q[:, :], _history(5, P_decay, sem[:5]), P_decay, 9, block, seed=64)


def _serving(max_len: int, version: str = "ix-v1", seed: int = 0, pos_exact: int | None = None) -> ServingModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(max_len=max_len, top_k=4, dim_rep=8, dim_att=D, mlp=[8], init_std=0.3, pos_exact=pos_exact)
    return ServingModel(build_model(cfg, 60, 7), version, 60, 7, max_len)


@pytest.fixture(autouse=True)
def index_always(monkeypatch):
    """The tests check the indexed path's result even where it would prune too little to be taken."""
    import service.scoring

    monkeypatch.setattr(service.scoring, "MAX_INDEXED_FRACTION", 1.0)


@pytest.fixture
def store_cfg(redis_server):
    prefix = f"t{uuid.uuid4().hex[:10]}:"
    # a seed of one block, so that these short histories have blocks past it to bound and read
    yield StateStoreConfig(redis_url=redis_server, key_prefix=prefix, seq_cap=150, seq_slack=20, index_block=8,
                           index_seed=8)
    cleanup_server_keys(redis_server, prefix)


def _events(u: int, n: int, rng: random.Random, t0: int = 0) -> list[Event]:
    return [Event(f"{u}-{t0 + j}", u, rng.randrange(1, 70), rng.randrange(1, 9), 0, 1_000 * (t0 + j)) for j in range(n)]


def _index_of(store: StateStore, u: int, ix, version: str):
    k = store.keys.user(u)
    meta = {a.decode(): b.decode() for a, b in store.client.hgetall(k.meta).items()}
    assert meta.get(f"ixrev:{version}") == meta["rev"] and meta[f"ixfmt:{version}"] == ix.fmt
    return int(meta[f"ix0:{version}"]), ix.decode(store.client.get(k.index(version)) or b"")


def _assert_bounds_rebuilt(store: StateStore, u: int, ix, version: str) -> None:
    """The kept index covers the visible sequence: per block its box equals a rebuild's (a superset on the
    oldest, partly cut block), and its ball holds every visible event of the block (the worker moves the
    open block's centroid without reading the block back, so centroid and radius may differ from a
    rebuild's)."""
    view = store.read_users([u], version)[0]
    ix0, got = _index_of(store, u, ix, version)
    want = ix.full(view.sequence, view.n - len(view.sequence))
    want_e = ix.decode(want.entries)
    assert ix0 <= want.b0 and len(got) - (want.b0 - ix0) == len(want_e)
    got = got[want.b0 - ix0:]
    D = ix.d_sem
    np.testing.assert_array_equal(got[1:, :2 * D], want_e[1:, :2 * D])
    assert (got[0, :D] <= want_e[0, :D]).all() and (got[0, D:2 * D] >= want_e[0, D:2 * D]).all()
    keys = ix.keys(view.sequence).double()
    first = view.n - len(view.sequence)
    for j, e in enumerate(got):
        b = want.b0 + j
        lo, hi = max(b * 8, first) - first, min((b + 1) * 8, view.n) - first
        dist = (keys[lo:hi] - torch.from_numpy(np.array(e[2 * D:3 * D])).double()).norm(dim=1)
        assert (dist <= float(e[3 * D])).all(), (b, dist.max().item(), e[3 * D])


def test_worker_index_bounds_the_rebuilt_index_after_appends_merges_and_cuts(store_cfg):
    serving = _serving(max_len=100)
    updater = ModelStateUpdater(serving)
    ix = serving.block_indexer(8)
    rng = random.Random(0)
    with connect(store_cfg) as handle:
        store = StateStore(handle.client, store_cfg)
        events = _events(1, 400, rng)
        at = 0
        for size in [1, 2, 5, 7, 8, 9, 3, 30, 13] * 6:       # in order, odd batch sizes: the open block grows
            store.apply(updater, events[at:at + size])
            at += size
            _assert_bounds_rebuilt(store, 1, ix, serving.version)
        late = events[at:at + 40]
        rng.shuffle(late)                                      # out of order: merges rebuild the index
        store.apply(updater, late[:20])
        _assert_bounds_rebuilt(store, 1, ix, serving.version)
        store.apply(updater, late[20:])
        _assert_bounds_rebuilt(store, 1, ix, serving.version)
        # past the cap and its slack: the sequence is cut back, and the index with it
        store.apply(updater, events[at + 40:])
        _assert_bounds_rebuilt(store, 1, ix, serving.version)
        ix0, got = _index_of(store, 1, ix, serving.version)
        assert len(got) <= -(-(store_cfg.seq_cap + store_cfg.seq_slack) // 8) + 1


def _scores_both_ways(store_cfg, handle, serving, jobs):
    indexed = Scorer(serving, StateStore(handle.client, store_cfg), ServiceMetrics()).run(jobs)
    plain_cfg = store_cfg.model_copy(update={"index_block": 0})
    plain = Scorer(serving, StateStore(handle.client, plain_cfg), ServiceMetrics()).run(jobs)
    return indexed, plain


@pytest.mark.parametrize("max_len,pos_exact", [(100, None), (400, None), (400, 30)])
def test_online_score_with_the_index_equals_the_whole_sequence_score(store_cfg, max_len, pos_exact):
    serving = _serving(max_len=max_len, pos_exact=pos_exact)
    updater = ModelStateUpdater(serving)
    rng = random.Random(1)
    with connect(store_cfg) as handle:
        store = StateStore(handle.client, store_cfg)
        for u, n in [(1, 3), (2, 9), (3, 160), (4, 260)]:
            evs = _events(u, n, rng)
            for a in range(0, n, 37):
                store.apply(updater, evs[a:a + 37])
        g = np.random.default_rng(0)
        jobs = [ScoreJob(u, g.integers(1, 70, 25), g.integers(1, 9, 25), True) for u in (1, 2, 3, 4, 3, 5)]
        indexed, plain = _scores_both_ways(store_cfg, handle, serving, jobs)
        for job, a, b in zip(jobs, indexed, plain):
            assert not isinstance(a, Exception), a
            if job.user_id == 5:                               # no events: the whole-sequence path
                assert a.blocks_read is None
                continue
            assert a.blocks_read is not None, "the indexed path did not run"
            assert a.explanations == b.explanations             # the same kept events, in the same order
            assert a.history_length == b.history_length
            torch.testing.assert_close(torch.tensor(a.scores), torch.tensor(b.scores), rtol=1e-6, atol=1e-7)
        # the direct model call on the whole history (the offline serving entry point)
        view = store.read_users([4], serving.version)[0]
        job = jobs[3]
        want, _, _ = serving.score(view.sequence, view.state, *(serving.map_ids(x, f)[0] for x, f in
                                                               ((job.items, "item"), (job.cates, "cate"))))
        torch.testing.assert_close(torch.tensor(indexed[3].scores), want, rtol=1e-6, atol=1e-7)


def test_reload_rebuilds_the_index_for_the_new_version(store_cfg):
    old, new = _serving(100, "ix-old", seed=0), _serving(100, "ix-new", seed=5)
    rng = random.Random(2)
    with connect(store_cfg) as handle:
        store = StateStore(handle.client, store_cfg)
        store.apply(ModelStateUpdater(old), _events(7, 90, rng))
        k = store.keys.user(7)
        assert handle.client.hget(k.meta, "ixrev:ix-new") is None
        g = np.random.default_rng(1)
        jobs = [ScoreJob(7, g.integers(1, 70, 10), g.integers(1, 9, 10), False)]
        # before the rebuild the new version has no index: the whole-sequence path, same scores
        before = Scorer(new, StateStore(handle.client, store_cfg), ServiceMetrics()).run(jobs)[0]
        assert before.blocks_read is None
        assert store.rebuild(ModelStateUpdater(new), [7]) == 1
        _assert_bounds_rebuilt(store, 7, new.block_indexer(8), "ix-new")
        after, plain = _scores_both_ways(store_cfg, handle, new, jobs)
        assert after[0].blocks_read is not None
        assert after[0].scores == before.scores == plain[0].scores
        # events applied by the new version's worker keep its index current; the old one goes stale
        store.apply(ModelStateUpdater(new), _events(7, 5, rng, t0=90))
        _assert_bounds_rebuilt(store, 7, new.block_indexer(8), "ix-new")
        assert handle.client.hget(k.meta, "ixrev:ix-old") != handle.client.hget(k.meta, "rev")


# ---- positions beyond pos_exact (log-distance buckets) ------------------------------------------------------


def test_position_rows_exact_then_log_buckets():
    from recsys.models.dare import DARE, position_rows

    cfg = ModelConfig(max_len=1_000_000, pos_exact=1_000, pos_buckets_per_octave=4)
    r = torch.arange(0, 1_000_001)
    rows = position_rows(r, cfg)
    assert torch.equal(rows[:1_001], r[:1_001])                       # exact up to pos_exact, 0 stays 0
    assert (rows[1:] >= rows[:-1]).all()                               # recency order kept
    assert int(rows[-1]) == 1_000 + 1 + int(4 * np.log2(1_000))        # 4 buckets per doubling
    assert rows[2_000] == 1_000 + 5 and rows[1_999] == 1_000 + 4
    model = DARE(cfg.model_copy(update={"dim_att": 2, "dim_rep": 2, "mlp": [4]}), 10, 3)
    assert model.rows["pos"] == int(rows[-1]) + 1                      # 1,041 rows, not 1,000,001


def test_bucketed_positions_train_and_serve_with_offline_parity():
    """The mapping is inside the model: the batch forward (training, offline evaluation) and the serving
    entry point read the same rows, and the bucket rows get gradient."""
    from recsys.data.batch import HistoryBatch

    torch.manual_seed(0)
    L, C = 300, 6
    cfg = ModelConfig(max_len=L, top_k=5, dim_rep=8, dim_att=4, mlp=[8], init_std=0.3, pos_exact=20)
    model = build_model(cfg, 60, 7)
    hist_item, hist_cate = torch.randint(1, 60, (L,)), torch.randint(1, 7, (L,))
    cand_item, cand_cate = torch.randint(1, 60, (C,)), torch.randint(1, 7, (C,))
    batch = HistoryBatch(user=torch.zeros(C, dtype=torch.int64), target_item=cand_item, target_cate=cand_cate,
                         hist_item=hist_item.expand(C, L).clone(), hist_cate=hist_cate.expand(C, L).clone(),
                         hist_pos=torch.arange(1, L + 1).expand(C, L).clone(), hist_len=torch.full((C,), L),
                         label=torch.randint(0, 2, (C,)).float())
    out = model(batch)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(out.logit, batch.label)
    if out.aux_logit is not None:
        loss = loss + torch.nn.functional.binary_cross_entropy_with_logits(out.aux_logit, batch.label)
    loss.backward()
    from recsys.embeddings import table_sets

    pos_grads = [p.grad for ts in table_sets(model).values() for name, p in ts.named_parameters()
                 if "pos" in name and p.grad is not None]
    rows = set()
    for g in pos_grads:
        g = g.coalesce() if g.is_sparse else g.to_sparse()
        rows |= set(g.indices()[0].tolist())
    assert max(rows) > cfg.pos_exact, "no bucket row got gradient"
    model.eval()
    with torch.no_grad():
        want = model(batch)
    serving = ServingModel(copy.deepcopy(model), "pos-v1", 60, 7, L)
    served = serving.model.score_candidates(hist_item, hist_cate, cand_item, cand_cate)
    assert torch.equal(served.indices, want.indices)
    torch.testing.assert_close(served.logit, want.logit, rtol=1e-5, atol=1e-6)


def test_a_sequence_that_moves_between_the_two_reads_is_not_read_as_blocks(store_cfg):
    serving = _serving(max_len=100)
    updater = ModelStateUpdater(serving)
    ix = serving.block_indexer(8)
    rng = random.Random(3)
    with connect(store_cfg) as handle:
        store = StateStore(handle.client, store_cfg)
        store.apply(updater, _events(1, 50, rng))
        head = store.read_index_heads([1], serving.version, ix.fmt, 8, False)[0]
        assert head.ix0 is not None and head.n == 50 and len(head.newest) == 8
        ranges = [(0, 16), (24, 42)]
        got = store.read_ranges([(1, head, ranges)])[0]
        whole = store.read_users([1], serving.version)[0].sequence
        np.testing.assert_array_equal(np.concatenate(got), np.concatenate([whole[0:16], whole[24:42]]))
        np.testing.assert_array_equal(head.newest, whole[-8:])
        entries = store.read_index_entries([(1, head, [(0, 2), (4, 6)])], serving.version, ix.entry_bytes)[0]
        want = ix.decode(store.client.get(store.keys.user(1).index(serving.version)))
        np.testing.assert_array_equal(ix.decode(b"".join(entries)), want[[0, 1, 4, 5]])
        store.apply(updater, _events(1, 3, rng, t0=50))            # a write between the reads
        assert store.read_ranges([(1, head, ranges)]) == [None]
        assert store.read_index_entries([(1, head, [(0, 2)])], serving.version, ix.entry_bytes) == [None]


def test_an_unusable_index_falls_back_to_the_whole_sequence(store_cfg):
    """The index is an optimisation: one that does not cover the window (here: its string lost while the
    meta still calls it current) must not fail the request."""
    serving = _serving(max_len=100)
    rng = random.Random(4)
    with connect(store_cfg) as handle:
        store = StateStore(handle.client, store_cfg)
        store.apply(ModelStateUpdater(serving), _events(2, 60, rng))
        handle.client.delete(store.keys.user(2).index(serving.version))
        g = np.random.default_rng(2)
        jobs = [ScoreJob(2, g.integers(1, 70, 10), g.integers(1, 9, 10), True)]
        got, plain = _scores_both_ways(store_cfg, handle, serving, jobs)
        assert not isinstance(got[0], Exception) and got[0].blocks_read is None
        assert got[0].scores == plain[0].scores and got[0].explanations == plain[0].explanations


def test_online_equals_offline_with_the_index_at_100k_events(redis_server):
    """L = 100k: the indexed request (which here reads a few blocks: the model's position term prefers
    recent events, as a trained one's does) equals the whole-sequence request and the batch forward."""
    from recsys.data.batch import HistoryBatch

    L, C = 100_000, 8
    prefix = f"t{uuid.uuid4().hex[:10]}:"
    cfg = StateStoreConfig(redis_url=redis_server, key_prefix=prefix, seq_cap=L, seq_slack=1_000, index_block=256)
    serving = _serving(max_len=L, version="ix-100k")
    (att, p), _ = serving.model.role_tables()
    with torch.no_grad():
        pos = att.weights()[f"{p}_pos"]
        pos[:, 0] = -0.5 * torch.log2(1 + torch.arange(pos.shape[0], dtype=torch.float64)).float()
        pos[0, 0] = 2.0
    rng = random.Random(5)
    try:
        with connect(cfg) as handle:
            store = StateStore(handle.client, cfg)
            evs = _events(1, L, rng)
            for a in range(0, L, 10_000):
                store.apply(ModelStateUpdater(serving), evs[a:a + 10_000])
            g = np.random.default_rng(3)
            jobs = [ScoreJob(1, g.integers(1, 70, C), g.integers(1, 9, C), True)]
            got, plain = _scores_both_ways(cfg, handle, serving, jobs)
            assert got[0].blocks_read is not None and got[0].blocks_read < 40, got[0].blocks_read   # of 391
            assert got[0].bytes_read < L * RECORD_BYTES / 5
            assert got[0].explanations == plain[0].explanations
            torch.testing.assert_close(torch.tensor(got[0].scores), torch.tensor(plain[0].scores), rtol=1e-6, atol=1e-7)
            seq = store.read_users([1], serving.version)[0].sequence
            hist_item, _ = serving.map_ids(seq["item"][::-1].copy(), "item")
            hist_cate, _ = serving.map_ids(seq["cate"][::-1].copy(), "cate")
            items, _ = serving.map_ids(jobs[0].items, "item")
            cates, _ = serving.map_ids(jobs[0].cates, "cate")
            batch = HistoryBatch(user=torch.zeros(C, dtype=torch.int64), target_item=items, target_cate=cates,
                                 hist_item=hist_item.expand(C, L), hist_cate=hist_cate.expand(C, L),
                                 hist_pos=torch.arange(1, L + 1).expand(C, L), hist_len=torch.full((C,), L),
                                 label=torch.zeros(C))
            with torch.no_grad():
                want = torch.sigmoid(serving.model(batch).logit)
            torch.testing.assert_close(torch.tensor(got[0].scores), want, rtol=1e-5, atol=1e-6)
    finally:
        cleanup_server_keys(redis_server, prefix)


def _exec_calls(client) -> int:
    return int(client.info("commandstats").get("cmdstat_exec", {}).get("calls", 0))


@pytest.mark.parametrize("decay", [0.0, 1.0])
def test_a_sure_fallback_is_one_the_search_would_make(store_cfg, decay):
    """`surely_kept` (from the position term alone, before the seed search) is a lower bound on the blocks
    begin_search leaves, so a fallback decided from it is one the search would make; with no recency
    preference it leaves more than 25% of the window for most requests (what lets the whole-sequence path
    skip the seed search)."""
    from service.block_index import begin_search, surely_kept

    serving = _serving(max_len=400, seed=2)
    if decay:
        prefer_recent_positions(serving.model, decay)
    ix = serving.block_indexer(8)
    rng = random.Random(7)
    sure = taken = 0
    with connect(store_cfg) as handle:
        store = StateStore(handle.client, store_cfg)
        lengths = [3, 9, 16, 17, 40, 95, 150, 171]
        for u, n in enumerate(lengths, 1):
            store.apply(ModelStateUpdater(serving), _events(u, n, rng))
        heads = store.read_index_heads(range(1, len(lengths) + 1), serving.version, ix.fmt, 8, False)
        g = np.random.default_rng(1)
        for h in heads:
            kept = surely_kept(ix, h, serving.max_len, serving.model.k)
            for _ in range(6):
                C = int(g.integers(1, 30))
                items, cates, *_ = serving.map_candidates(g.integers(1, 70, C), g.integers(1, 9, C))
                s = begin_search(ix, h, items, cates, serving.max_len, serving.model.k)
                assert kept <= len(s.candidates), (h.n, h.visible, kept, len(s.candidates))
                blocks = -(-s.window // 8)
                sure += kept > 0.25 * blocks
                taken += len(s.candidates) <= 0.25 * blocks
    if decay:
        assert taken >= 24, taken     # the long histories prune: only short ones (a block half in the seed) fall back
    else:
        assert sure >= 24, sure


def test_a_model_whose_index_does_not_prune_scores_in_one_round_trip(store_cfg, monkeypatch):
    """With no recency preference nothing can be pruned: once most requests fell back, the first read brings
    the whole sequence (the same snapshot as `read_users`) and the request needs no second round trip;
    the scores are those of the whole-sequence path, bit for bit."""
    import service.scoring

    monkeypatch.setattr(service.scoring, "MAX_INDEXED_FRACTION", 0.25)
    serving = _serving(max_len=400, seed=2)
    ix = serving.block_indexer(8)
    rng = random.Random(8)
    with connect(store_cfg) as handle:
        store = StateStore(handle.client, store_cfg)
        store.apply(ModelStateUpdater(serving), _events(1, 150, rng))
        lean = store.read_index_heads([1], serving.version, ix.fmt, 8, False)[0]
        full = store.read_index_heads([1], serving.version, ix.fmt, 8, False, whole=True)[0]
        view = store.read_users([1], serving.version)[0]
        for f in ("rev", "n", "stored", "seq_records", "visible", "state", "ix0"):
            assert getattr(full, f) == getattr(lean, f), f
        np.testing.assert_array_equal(full.newest, lean.newest)
        np.testing.assert_array_equal(full.view.sequence, view.sequence)
        assert (full.view.state, full.view.rev, full.view.n) == (view.state, view.rev, view.n)

        g = np.random.default_rng(4)
        jobs = [ScoreJob(1, g.integers(1, 70, 20), g.integers(1, 9, 20), True) for _ in range(10)]
        scorer = Scorer(serving, store, ServiceMetrics())
        plain = Scorer(serving, StateStore(handle.client, store_cfg.model_copy(update={"index_block": 0})),
                       ServiceMetrics())
        trips = []
        for job in jobs:
            before = _exec_calls(handle.client)
            got = scorer.run([job])[0]
            trips.append(_exec_calls(handle.client) - before)
            want = plain.run([job])[0]
            assert got.blocks_read is None
            assert got.scores == want.scores and got.explanations == want.explanations
            assert got.bytes_read >= want.bytes_read
        assert trips[:2] == [2, 2] and trips[-3:] == [1, 1, 1], trips


@pytest.mark.parametrize("decay", [0.0, 40.0])
def test_a_search_the_seed_answers_reads_once(store_cfg, monkeypatch, decay):
    """Where no block past the seed can hold a top-k event (a window the seed covers; or, with a steep recency
    preference, every older block's position bound below each candidate's k-th seed score) the request is
    answered from the first round trip, by the seed's search, not run again; otherwise it reads the summaries,
    then the blocks, and searches them with the seed. Either way the whole-sequence path's scores and kept events."""
    import service.block_index
    from service.scoring import PathCosts

    serving = _serving(max_len=400, seed=2)
    prefer_recent_positions(serving.model, decay)
    searches = []
    real = service.block_index._search
    monkeypatch.setattr(service.block_index, "_search", lambda *a: searches.append(len(a[2])) or real(*a))
    rng = random.Random(11)
    with connect(store_cfg) as handle:
        store = StateStore(handle.client, store_cfg)
        for u, n in [(1, 6), (2, 90)]:
            store.apply(ModelStateUpdater(serving), _events(u, n, rng))
        g = np.random.default_rng(5)
        jobs = [ScoreJob(u, g.integers(1, 70, 20), g.integers(1, 9, 20), True) for u in (1, 2)]
        scorer = Scorer(serving, store, ServiceMetrics(), costs=lambda: PathCosts.forced("index"))
        plain = Scorer(serving, StateStore(handle.client, store_cfg.model_copy(update={"index_block": 0})),
                       ServiceMetrics())
        for job in jobs:
            searches.clear()
            before = _exec_calls(handle.client)
            got = scorer.run([job])[0]
            trips = _exec_calls(handle.client) - before
            want = plain.run([job])[0]
            assert got.scores == want.scores and got.explanations == want.explanations
            if job.user_id == 1 or decay:                   # nothing past the seed: one read, one search
                assert (trips, searches, got.blocks_read) == (1, [6 if job.user_id == 1 else 8], 0)
            else:                                           # no recency preference: summaries, blocks, a second search
                assert trips == 3 and got.blocks_read > 0 and searches[0] == 8 and searches[1] > 8, (trips, searches)
        # `index_seed` sets what the first read brings: a seed holding user 2's 90 events answers alone
        wide = Scorer(serving, StateStore(handle.client, store_cfg.model_copy(update={"index_seed": 96})),
                      ServiceMetrics(), costs=lambda: PathCosts.forced("index"))
        searches.clear()
        before = _exec_calls(handle.client)
        got = wide.run([jobs[1]])[0]
        assert (_exec_calls(handle.client) - before, searches, got.blocks_read) == (1, [90], 0)
        assert got.scores == plain.run([jobs[1]])[0].scores


def test_indexed_requests_compute_the_position_term_once_per_model(store_cfg, monkeypatch):
    """The index's searches (seed and blocks) read the model's per-row position term from its cache
    (`DARE.position_bias`), as the forward does: recomputed per search it cost ~50 ms at a 1M-row position
    table, twice a request, for a search of a few thousand events. Scores unchanged (the cache holds the
    same numbers: tests/test_retrieval_serving.py)."""
    import recsys.models.attention as attention

    serving = _serving(max_len=400, seed=3)
    calls = []
    real = attention._row_bias
    monkeypatch.setattr(attention, "_row_bias", lambda t, w: calls.append(t.shape) or real(t, w))
    rng = random.Random(9)
    with connect(store_cfg) as handle:
        store = StateStore(handle.client, store_cfg)
        for u in (1, 2):
            store.apply(ModelStateUpdater(serving), _events(u, 120, rng))
        g = np.random.default_rng(2)
        jobs = [ScoreJob(u, g.integers(1, 70, 9), g.integers(1, 9, 9), True) for u in (1, 2, 1, 2)]
        out = Scorer(serving, StateStore(handle.client, store_cfg), ServiceMetrics()).run(jobs)
    assert all(r.blocks_read is not None for r in out), "the indexed path did not run"
    assert len(calls) == 1, calls
