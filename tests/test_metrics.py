"""Metrics against scikit-learn and direct per-group loops, on real model predictions; the merge over ranks
(threads standing in for ranks, and real gloo processes) against one process, exactly."""

from __future__ import annotations

import threading
from fractions import Fraction
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn.metrics import log_loss, roc_auc_score

from dist_support import leave_group
from recsys.config.model import ModelConfig
from recsys.data.sequences import iterate_batches, load_dataset
import recsys.metrics
from recsys.metrics import (auc, auc_counts, ctr_metrics, ctr_partial, exact_sum, gauc, group_aucs, grouped_auc, logloss,
                            merge_counts, merge_ctr, search_recall)
from recsys.models import build_model
from recsys.net import free_port
from recsys.train.step import make_optimizers, train_step
from recsys.config.train import TrainConfig


@pytest.fixture(scope="module")
def predictions(bench_dir):
    """A briefly trained tiny DARE's predictions on the first 3000 real test rows (many ties after rounding)."""
    ds = load_dataset(bench_dir, splits=("train", "test"))
    torch.manual_seed(0)
    m = build_model(ModelConfig(dim_att=4, dim_rep=4, top_k=4, max_len=20, mlp=[8]), ds.n_items, ds.n_cates)
    opt = make_optimizers(m, TrainConfig())
    for i, b in enumerate(iterate_batches(ds.store, ds.splits["train"], 20, 512, shuffle=True, seed=0)):
        train_step(m, b, opt, 1.0)
        if i == 15:
            break
    m.eval()
    from dataclasses import replace

    t = ds.splits["test"]
    t = replace(t, user=t.user[:3000], pos=t.pos[:3000], item=t.item[:3000], cate=t.cate[:3000], label=t.label[:3000])
    with torch.no_grad():
        p = np.concatenate([torch.sigmoid(m(b).logit).numpy() for b in iterate_batches(ds.store, t, 20, 1000)])
    return t, p.astype(np.float64)


def _loop_grouped_auc(y, p, g):
    num = den = 0.0
    for u in np.unique(g):
        m = g == u
        if 0 < y[m].sum() < m.sum():
            num += m.sum() * roc_auc_score(y[m], p[m])
            den += m.sum()
    return num / den


def test_auc_and_logloss_equal_sklearn(predictions):
    t, p = predictions
    assert auc(t.label, p) == pytest.approx(roc_auc_score(t.label, p), abs=1e-12)
    coarse = np.round(p, 2)  # heavy ties
    assert auc(t.label, coarse) == pytest.approx(roc_auc_score(t.label, coarse), abs=1e-12)
    assert logloss(t.label, p) == pytest.approx(log_loss(t.label, p), abs=1e-9)


def test_gauc_and_category_auc_equal_per_group_loops(predictions):
    t, p = predictions
    coarse = np.round(p, 2)
    assert gauc(t.label, coarse, t.user) == pytest.approx(_loop_grouped_auc(t.label, coarse, t.user), abs=1e-12)
    assert grouped_auc(t.label, p, t.cate) == pytest.approx(_loop_grouped_auc(t.label, p, t.cate), abs=1e-12)
    m = ctr_metrics(t.label, p, t.user, t.cate)
    assert set(m) == {"auc", "gauc", "logloss", "cate_auc", "rows"} and m["rows"] == 3000


def _rank_grouped_auc(labels, scores, groups):
    """The single-process implementation before partials existed (tied ranks per group), kept as reference."""
    labels, scores, groups = np.asarray(labels, np.float64), np.asarray(scores, np.float64), np.asarray(groups)
    order = np.lexsort((scores, groups))
    g, s = groups[order], scores[order]
    n = len(s)
    new_group = np.r_[True, g[1:] != g[:-1]]
    new_run = new_group | np.r_[True, s[1:] != s[:-1]]
    run_start = np.flatnonzero(new_run)
    run_len = np.diff(np.r_[run_start, n])
    group_start = np.maximum.accumulate(np.where(new_group, np.arange(n), 0))
    run_id = np.cumsum(new_run) - 1
    ranks = (run_start - group_start[run_start])[run_id] + (run_len[run_id] + 1) / 2.0
    _, gid = np.unique(g, return_inverse=True)
    y = labels[order]
    n_pos, n_all = np.bincount(gid, weights=y), np.bincount(gid).astype(np.float64)
    n_neg = n_all - n_pos
    rank_sum = np.bincount(gid, weights=ranks * y)
    ok = (n_pos > 0) & (n_neg > 0)
    if not ok.any():
        return float("nan")
    per = (rank_sum[ok] - n_pos[ok] * (n_pos[ok] + 1) / 2.0) / (n_pos[ok] * n_neg[ok])
    return float(np.average(per, weights=n_all[ok]))


def _same(a, b, tol=0.0):
    return (np.isnan(a) and np.isnan(b)) or abs(a - b) <= tol


def _rows(obj) -> int:
    """Table rows in a received object: the lengths of its numpy arrays (a table's columns counted once)."""
    if isinstance(obj, np.ndarray):
        return len(obj)
    if isinstance(obj, dict):
        arrays = [v for v in obj.values() if isinstance(v, np.ndarray)]
        return (len(arrays[0]) if arrays else 0) + sum(_rows(v) for v in obj.values() if not isinstance(v, np.ndarray))
    if isinstance(obj, (list, tuple)):
        return sum(_rows(v) for v in obj)
    return 0


class _Threads:
    """`world` ranks as threads of this process, with the Context's collectives (tests only): what each rank
    received per collective is recorded, counted in table rows."""

    def __init__(self, world: int):
        self.world, self.slots, self.barrier = world, [None] * world, threading.Barrier(world, timeout=60)
        self.received: list[list[tuple[str, int]]] = [[] for _ in range(world)]

    def rank(self, r: int):
        shared = self

        class Rank:
            rank, world = r, shared.world

            def _swap(self, obj, pick):
                shared.slots[r] = obj
                shared.barrier.wait()
                out = [pick(shared.slots[src]) for src in range(shared.world)]
                shared.barrier.wait()
                return out

            def gather(self, obj):
                out = self._swap(obj, lambda x: x)
                shared.received[r].append(("gather", _rows(out)))
                return out

            def all_to_all(self, objs):
                out = self._swap(list(objs), lambda x: x[r])
                shared.received[r].append(("all_to_all", _rows(out)))
                return out

        return Rank()

    def run(self, fn, parts):
        """fn(part, comm) on every rank at once -> the ranks' results."""
        with ThreadPoolExecutor(self.world) as pool:
            return [f.result() for f in [pool.submit(fn, p, self.rank(r)) for r, p in enumerate(parts)]]


def _random_rows(rng, n=None, n_users=None, digits=None):
    n = int(rng.integers(200, 3000)) if n is None else n
    n_users = int(rng.integers(5, 120)) if n_users is None else n_users
    user = rng.integers(0, n_users, n)
    cate = rng.integers(0, 12, n)
    label = (rng.random(n) < rng.uniform(0.1, 0.6)).astype(np.float32)
    label[user == 0] = 1.0  # user 0 alone in a shard below: that shard has positives only
    prob = rng.random(n) if digits == 0 else np.round(rng.random(n), int(rng.integers(1, 4)) if digits is None else digits)
    return label, prob, user, cate


def _by_rank(rows, rank_of_user, world):
    label, prob, user, cate = rows
    rank = rank_of_user[user]
    return [ctr_partial(label[rank == r], prob[rank == r], user[rank == r], cate[rank == r]) for r in range(world)]


def _assert_equal_metrics(got, want):
    assert set(got) == set(want)
    for k in want:
        assert _same(got[k], want[k]), (k, got[k], want[k])


@pytest.mark.parametrize("seed", range(6))
def test_merge_over_ranks_equals_one_process_exactly(seed, monkeypatch):
    """Random rows with heavy ties, users spread over 1-9 ranks (some ranks with no user, one whose rows
    have one label only), coarse and fine splitter samples: every rank ends with the one-process metrics,
    every metric bit for bit; one process equals the rank-based AUC reference and sklearn's logloss."""
    rng = np.random.default_rng(seed)
    rows = _random_rows(rng)
    label, prob, user, cate = rows
    one = ctr_metrics(*rows)
    for k, g in (("auc", np.zeros(len(label), np.int64)), ("gauc", user), ("cate_auc", cate)):
        assert _same(one[k], _rank_grouped_auc(label, prob, g), 1e-12), k
    assert one["logloss"] == pytest.approx(log_loss(label, prob.clip(1e-7, 1 - 1e-7)), abs=1e-12)
    for world, sample in ((1, 1024), (2, 1024), (3, 2), (4, 1), (9, 5)):
        monkeypatch.setattr(recsys.metrics, "SAMPLE", sample)  # few sample keys: uneven ranges, still exact
        rank_of_user = rng.integers(1, world, user.max() + 1) if world > 1 else np.zeros(user.max() + 1, np.int64)
        rank_of_user[0] = 0
        got = _Threads(world).run(merge_ctr, _by_rank(rows, rank_of_user, world))
        assert all(g["rows"] == len(label) for g in got)
        for g in got:
            _assert_equal_metrics(g, one)


def _edge_cases():
    rng = np.random.default_rng(7)
    n = 400
    user = np.repeat(np.arange(40), 10)
    cate = rng.integers(0, 5, n)
    label = (rng.random(n) < 0.4).astype(np.float32)
    yield "all scores equal", (label, np.full(n, 0.25), user, cate)
    one_pos = np.zeros(n, np.float32)
    one_pos[123] = 1
    yield "one positive", (one_pos, np.round(rng.random(n), 2), user, cate)
    yield "no positive", (np.zeros(n, np.float32), rng.random(n), user, cate)
    only = cate.copy()
    only[user < 10] = 9  # category 9 lives on rank 0 only
    only[user >= 10] = np.minimum(only[user >= 10], 8)
    yield "a category on one rank only", (label, np.round(rng.random(n), 1), user, only)
    two = np.where(rng.random(n) < 0.5, 0.3, 0.7)  # two scores, both on every rank: ties across every boundary
    yield "two scores", (label, two, user, cate)


@pytest.mark.parametrize("case", [name for name, _ in _edge_cases()])
def test_merge_edge_cases_equal_one_process(case):
    rows = dict(_edge_cases())[case]
    one = ctr_metrics(*rows)
    rank_of_user = np.minimum(np.arange(40) // 10, 3)
    rank_of_user[rank_of_user == 2] = 1  # rank 2 gets no rows
    for world in (1, 4):
        got = _Threads(world).run(merge_ctr, _by_rank(rows, rank_of_user if world > 1 else np.zeros(40, np.int64), world))
        for g in got:
            _assert_equal_metrics(g, one)
    if case in ("no positive",):
        assert np.isnan(one["auc"]) and np.isnan(one["gauc"])


def test_a_rank_holds_its_share_of_the_count_tables_not_the_split():
    """200k rows of distinct scores over 4 ranks: the range exchange hands each rank about a quarter of the
    runs (within 1/SAMPLE of the runs of each sender, plus one run per sender for a tie at a cut), and the
    per-range totals every rank gathers have one row per group and range, not per row."""
    rng = np.random.default_rng(3)
    world, n = 4, 200_000
    rows = _random_rows(rng, n=n, n_users=2000, digits=0)
    label, prob, user, cate = rows
    rank_of_user = rng.integers(0, world, 2000)
    threads = _Threads(world)
    got = threads.run(merge_ctr, _by_rank(rows, rank_of_user, world))
    for g in got:
        _assert_equal_metrics(g, ctr_metrics(*rows))
    per_rank = np.bincount(rank_of_user[user], minlength=world)
    n_cate_runs = len(auc_counts(label, prob, cate)["group"])
    for r, received in enumerate(threads.received):
        assert [kind for kind, _ in received] == ["gather", "all_to_all", "gather"]
        sample, exchange, totals = (rows_ for _, rows_ in received)
        assert sample <= 2 * world * recsys.metrics.SAMPLE  # two tables' samples from every rank
        # global table: n runs in all; category table: n_cate_runs
        share = (n + n_cate_runs) / world
        assert exchange <= share + 2 * world * (per_rank.max() / recsys.metrics.SAMPLE + 1), (r, exchange, share)
        assert exchange < 0.3 * (n + n_cate_runs)
        assert totals <= world * (1 + 12)  # per range: one global row, at most one row per category


def test_exact_sum_is_the_exact_sum():
    rng = np.random.default_rng(0)
    x = np.r_[rng.standard_normal(1000) * 10.0 ** rng.integers(-30, 30, 1000), 5e-324, -2.0**1000, 0.0]
    want = sum((Fraction(v) for v in x), Fraction(0))
    assert exact_sum(x) == want
    assert exact_sum(x[:400]) + exact_sum(x[400:]) == want
    assert exact_sum(np.zeros(0)) == 0


def _gloo_rank(rank, world, port, out):
    from pipelines.train import GroupContext

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        rows = _random_rows(np.random.default_rng(11), n=20_000, n_users=300, digits=3)
        rank_of_user = np.arange(300) % world
        rank_of_user[rank_of_user == 2] = 1  # rank 2: no rows
        part = _by_rank(rows, rank_of_user, world)[rank]
        ctx = GroupContext(rank, world)
        sizes = [len(p["group"]) for p in ctx.all_to_all([{"group": np.arange(rank * 10 + d)} for d in range(world)])]
        torch.save({"metrics": merge_ctr(part, ctx), "sizes": sizes}, f"{out}/{rank}.pt")
    except BaseException:
        dist.destroy_process_group()
        raise
    leave_group()


def test_merge_on_gloo_processes_equals_one_process(tmp_path):
    """Three real gloo processes (GroupContext, as Ray Train's workers and the evaluation actors use it),
    one with no rows, users spread round-robin (ties across every range boundary): every rank gets the
    one-process metrics bit for bit, and all_to_all delivers to rank d what each rank addressed to d."""
    world = 3
    mp.spawn(_gloo_rank, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    one = ctr_metrics(*_random_rows(np.random.default_rng(11), n=20_000, n_users=300, digits=3))
    for r in range(world):
        got = torch.load(tmp_path / f"{r}.pt", weights_only=False)
        _assert_equal_metrics(got["metrics"], one)
        assert got["sizes"] == [src * 10 + r for src in range(world)]


def test_count_tables_and_per_group_aucs():
    y = np.array([1, 0, 1, 0, 1, 0])
    s = np.array([0.5, 0.5, 0.2, 0.9, 0.5, 0.2])
    g = np.array([0, 0, 0, 1, 1, 1])
    whole = auc_counts(y, s, g)
    np.testing.assert_array_equal(whole["pos"], [1, 1, 0, 1, 0])  # (0,.2) (0,.5) (1,.2) (1,.5) (1,.9)
    per = group_aucs(whole)
    # group 0: the positive at .5 ties the negative (1/2), the one at .2 loses: 0.25; group 1: 0.5 of 1 pair won
    np.testing.assert_array_equal(per["auc"], [0.25, 0.5])
    groups, extra = merge_counts({"t": whole}, _Threads(1).rank(0), "x")
    np.testing.assert_array_equal(groups["t"]["auc"], per["auc"])
    assert extra == ["x"]
    with pytest.raises(ValueError, match="0 or 1"):
        auc_counts(np.array([0.5, 1.0]), np.array([0.1, 0.2]))


def test_groups_with_one_label_are_skipped_and_bad_scores_named():
    y = np.array([1, 0, 1, 1, 0, 0])
    s = np.array([0.9, 0.1, 0.8, 0.7, 0.2, 0.3])
    g = np.array([0, 0, 1, 1, 2, 2])  # only group 0 has both labels
    assert gauc(y, s, g) == 1.0
    assert np.isnan(gauc(np.ones(4), np.arange(4.0), np.zeros(4)))
    with pytest.raises(ValueError, match="row 1"):
        auc(np.array([0, 1]), np.array([0.5, np.nan]))


def test_search_recall_maps_columns_to_positions():
    # row 0: target at pos 10, kept columns 0 and 3 -> positions 9 and 6; evidence {9, 2}: recall 1/2
    # row 1: target at pos 5, kept column 1 -> position 3, one empty slot; evidence {3}: recall 1
    # row 2: no evidence: not counted
    idx = np.array([[0, 3], [1, -1], [0, 1]])
    r = search_recall(idx, np.array([10, 5, 7]), [np.array([9, 2]), np.array([3]), np.array([], dtype=np.int64)])
    assert r == pytest.approx(0.75)


def test_evidence_recall_counts_what_the_window_and_k_allow():
    from recsys.metrics import evidence_recall

    # window max_len = 5, k = 2
    # row 0: target at pos 10, window = positions 5..9; kept columns 0, 3 -> positions 9, 6.
    #        evidence {2, 6, 8, 9}: 2 is out of reach; reachable {6, 8, 9}, 2 retrieved of min(k, 3) = 2 -> 1.0
    # row 1: target at pos 5; kept column 1 -> position 3, one empty slot; evidence {0, 2}:
    #        reachable both, none retrieved -> recall 0, no hit
    # row 2: target at pos 20; evidence {3}: out of reach -> not counted in recall/hit, lowers reach
    # row 3: no evidence (a negative): counted nowhere
    # row 4: target at pos 7; kept column 0 -> position 6; evidence {6}: 1 of min(2, 1) -> 1.0
    idx = np.array([[0, 3], [1, -1], [0, 1], [0, 1], [0, 4]])
    pos = np.array([10, 5, 20, 9, 7])
    ev = [np.array([2, 6, 8, 9]), np.array([0, 2]), np.array([3]), np.array([], dtype=np.int64), np.array([6])]
    r = evidence_recall(idx, pos, ev, max_len=5)
    assert r["recall"] == pytest.approx((1.0 + 0.0 + 1.0) / 3)
    assert r["hit"] == pytest.approx(2 / 3)
    assert r["reach"] == pytest.approx(3 / 4)
    assert np.isnan(evidence_recall(idx[3:4], pos[3:4], ev[3:4], 5)["recall"])
