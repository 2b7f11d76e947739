"""Metrics against scikit-learn and direct per-group loops, on real model predictions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss, roc_auc_score

from recsys.config.model import ModelConfig
from recsys.data.sequences import iterate_batches, load_dataset
from recsys.metrics import (auc, auc_counts, ctr_metrics, ctr_partial, gauc, group_aucs, grouped_auc, logloss, merge_auc_counts,
                            merge_ctr, merge_group_aucs, search_recall)
from recsys.models import build_model
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


@pytest.mark.parametrize("seed", range(6))
def test_partial_metrics_merged_over_user_shards_equal_one_process(seed):
    """Random rows with heavy ties, split over user-disjoint shards several ways (empty shards, a shard whose
    rows have one label only): the merged AUC, GAUC and category AUC equal one process exactly, logloss to
    1e-12, and both equal the rank-based implementation."""
    rng = np.random.default_rng(seed)
    n, n_users = int(rng.integers(200, 3000)), int(rng.integers(5, 120))
    user = rng.integers(0, n_users, n)
    cate = rng.integers(0, 12, n)
    label = (rng.random(n) < rng.uniform(0.1, 0.6)).astype(np.float32)
    label[user == 0] = 1.0  # user 0 alone in a shard below: that shard has positives only
    prob = np.round(rng.random(n), int(rng.integers(1, 4)))  # few distinct scores: ties within and across shards
    one = ctr_metrics(label, prob, user, cate)
    for k, g in (("auc", np.zeros(n, np.int64)), ("gauc", user), ("cate_auc", cate)):
        assert _same(one[k], _rank_grouped_auc(label, prob, g), 1e-12), k
    assert one["logloss"] == pytest.approx(log_loss(label, prob.clip(1e-7, 1 - 1e-7)), abs=1e-12)
    for n_shards in (1, 2, 3, 7):
        shard_of_user = rng.integers(1, n_shards + 1, n_users)  # shard 0 and maybe others get no user
        shard_of_user[0] = 0
        shard = shard_of_user[user]
        parts = [ctr_partial(label[shard == i], prob[shard == i], user[shard == i], cate[shard == i]) for i in range(n_shards + 2)]
        rng.shuffle(parts)
        merged = merge_ctr(parts)
        assert merged["rows"] == n
        for k in ("auc", "gauc", "cate_auc"):
            assert _same(merged[k], one[k]), (k, n_shards)
        assert merged["logloss"] == pytest.approx(one["logloss"], abs=1e-12)


def test_auc_counts_merge_to_the_whole_table_and_users_must_not_span_partials():
    y = np.array([1, 0, 1, 0, 1, 0])
    s = np.array([0.5, 0.5, 0.2, 0.9, 0.5, 0.2])
    g = np.array([0, 0, 0, 1, 1, 1])
    whole = auc_counts(y, s, g)
    merged = merge_auc_counts([auc_counts(y[:3], s[:3], g[:3]), auc_counts(y[3:], s[3:], g[3:]), auc_counts(y[:0], s[:0])])
    for k in whole:
        np.testing.assert_array_equal(merged[k], whole[k])
    np.testing.assert_array_equal(whole["pos"], [1, 1, 0, 1, 0])  # (0,.2) (0,.5) (1,.2) (1,.5) (1,.9)
    per = group_aucs(whole)
    # group 0: the positive at .5 ties the negative (1/2), the one at .2 loses: 0.25; group 1: 0.5 of 1 pair won
    np.testing.assert_array_equal(per["auc"], [0.25, 0.5])
    with pytest.raises(ValueError, match="group 1"):
        merge_group_aucs([group_aucs(auc_counts(y[:4], s[:4], g[:4])), group_aucs(auc_counts(y[4:], s[4:], g[4:]))])
    assert np.isnan(merge_ctr([])["auc"]) and merge_ctr([])["rows"] == 0


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
