"""Metrics against scikit-learn and direct per-group loops, on real model predictions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss, roc_auc_score

from recsys.config.model import ModelConfig
from recsys.data.sequences import iterate_batches, load_dataset
from recsys.metrics import auc, ctr_metrics, gauc, grouped_auc, logloss, search_recall
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
