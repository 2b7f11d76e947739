"""Offline CTR metrics, vectorised numpy.

- `auc`: ROC AUC with tied scores counted as half (the Mann-Whitney statistic; equals sklearn's).
- `grouped_auc`: mean of per-group AUCs weighted by the group's rows, over groups with both labels.
  Grouped by user it is GAUC; by target category, the original DARE code's reported AUC.
- `logloss`: of the main head's probabilities only.
- `search_recall`: the search stage's recall of the true driver events on synthetic data (all of them);
  `evidence_recall`: the same counted within the searched window and k slots, plus the hit rate.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-7


def _check(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    if labels.shape != scores.shape or labels.ndim != 1:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} must be equal-length 1-d arrays")
    if not np.isfinite(scores).all():
        bad = int(np.flatnonzero(~np.isfinite(scores))[0])
        raise ValueError(f"scores: row {bad} is not finite ({scores[bad]})")
    return labels.astype(np.float64), scores


def _tied_ranks(groups: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """1-based ranks of scores within each group, ties averaged. -> (ranks, order) in sorted order."""
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
    return ranks, order


def grouped_auc(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> float:
    """Row-weighted mean AUC over groups that have both labels (NaN when none has)."""
    labels, scores = _check(labels, scores)
    groups = np.asarray(groups)
    if groups.shape != labels.shape:
        raise ValueError(f"groups {groups.shape} must match labels {labels.shape}")
    ranks, order = _tied_ranks(groups, scores)
    _, gid = np.unique(groups[order], return_inverse=True)
    y = labels[order]
    n_pos = np.bincount(gid, weights=y)
    n_all = np.bincount(gid).astype(np.float64)
    n_neg = n_all - n_pos
    rank_sum = np.bincount(gid, weights=ranks * y)
    ok = (n_pos > 0) & (n_neg > 0)
    if not ok.any():
        return float("nan")
    per_group = (rank_sum[ok] - n_pos[ok] * (n_pos[ok] + 1) / 2.0) / (n_pos[ok] * n_neg[ok])
    return float(np.average(per_group, weights=n_all[ok]))


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    return grouped_auc(labels, scores, np.zeros(len(labels), dtype=np.int64))


def gauc(labels: np.ndarray, scores: np.ndarray, users: np.ndarray) -> float:
    return grouped_auc(labels, scores, users)


def logloss(labels: np.ndarray, probs: np.ndarray) -> float:
    labels, probs = _check(labels, probs)
    p = np.clip(probs, EPS, 1.0 - EPS)
    return float(-np.mean(labels * np.log(p) + (1.0 - labels) * np.log(1.0 - p)))


def search_recall(indices: np.ndarray, pos: np.ndarray, evidence: list[np.ndarray]) -> float:
    """Mean over rows with evidence of |retrieved & evidence| / |evidence|.

    indices [R, k]: retrieved history columns (-1 = empty); column j of the row whose target sits at
    sequence position `pos` is the event at position pos - 1 - j. evidence[r]: true driver positions.
    """
    indices, pos = np.asarray(indices), np.asarray(pos, dtype=np.int64)
    if indices.ndim != 2 or len(indices) != len(pos) or len(evidence) != len(pos):
        raise ValueError(f"indices {indices.shape}, pos {pos.shape} and evidence ({len(evidence)}) must have one row each")
    n_ev = np.array([len(e) for e in evidence], dtype=np.int64)
    if not n_ev.any():
        return float("nan")
    stride = int(pos.max(initial=0)) + 2
    rows = np.repeat(np.arange(len(pos)), indices.shape[1])
    got_pos = np.repeat(pos, indices.shape[1]) - 1 - indices.reshape(-1)
    keep = indices.reshape(-1) >= 0
    retrieved = rows[keep] * stride + got_pos[keep]
    ev_rows = np.repeat(np.arange(len(pos)), n_ev)
    ev = np.concatenate([np.asarray(e, dtype=np.int64) for e in evidence]) if n_ev.sum() else np.zeros(0, np.int64)
    hits = np.bincount(ev_rows, weights=np.isin(ev_rows * stride + ev, retrieved), minlength=len(pos))
    has = n_ev > 0
    return float(np.mean(hits[has] / n_ev[has]))


def evidence_recall(indices: np.ndarray, pos: np.ndarray, evidence: list[np.ndarray], max_len: int) -> dict[str, float]:
    """The search stage against the generator's evidence, counting only what the search could have found.

    indices [R, k]: retrieved history columns (-1 = empty); column j of the row whose target sits at
    sequence position `pos` is the event at position pos - 1 - j. evidence[r]: positions of the events that
    make the rule fire (synthetic data). Only evidence within the searched window (the last `max_len`
    events before pos) is *reachable*. Over rows with reachable evidence E_r:
      recall = mean |retrieved & E_r| / min(k, |E_r|)   (1 when the k slots hold as much evidence as fits)
      hit    = share of rows with at least one evidence event retrieved (one is all the rule needs)
    reach = share of rows with evidence whose evidence is reachable at all (the others lie further back
    than max_len: no search over this window can find them). NaN where no row counts.
    """
    indices, pos = np.asarray(indices), np.asarray(pos, dtype=np.int64)
    if indices.ndim != 2 or len(indices) != len(pos) or len(evidence) != len(pos):
        raise ValueError(f"indices {indices.shape}, pos {pos.shape} and evidence ({len(evidence)}) must have one row each")
    k = indices.shape[1]
    n_ev = np.array([len(e) for e in evidence], dtype=np.int64)
    ev_rows = np.repeat(np.arange(len(pos)), n_ev)
    ev = np.concatenate([np.asarray(e, dtype=np.int64) for e in evidence]) if n_ev.sum() else np.zeros(0, np.int64)
    ok = ev >= pos[ev_rows] - max_len
    ev_rows, ev = ev_rows[ok], ev[ok]
    n_reach = np.bincount(ev_rows, minlength=len(pos))
    stride = int(pos.max(initial=0)) + 2
    rows = np.repeat(np.arange(len(pos)), k)
    keep = indices.reshape(-1) >= 0
    retrieved = rows[keep] * stride + (np.repeat(pos, k) - 1 - indices.reshape(-1))[keep]
    hits = np.bincount(ev_rows, weights=np.isin(ev_rows * stride + ev, retrieved), minlength=len(pos))
    has, any_ev = n_reach > 0, n_ev > 0
    nan = float("nan")
    return {
        "recall": float(np.mean(hits[has] / np.minimum(k, n_reach[has]))) if has.any() else nan,
        "hit": float(np.mean(hits[has] > 0)) if has.any() else nan,
        "reach": float(np.mean(has[any_ev])) if any_ev.any() else nan,
    }


def ctr_metrics(labels: np.ndarray, probs: np.ndarray, users: np.ndarray, cates: np.ndarray) -> dict[str, float]:
    """The metric set reported for a split: AUC, GAUC (by user), logloss, category-grouped AUC."""
    return {
        "auc": auc(labels, probs),
        "gauc": gauc(labels, probs, users),
        "logloss": logloss(labels, probs),
        "cate_auc": grouped_auc(labels, probs, cates),
        "rows": int(len(labels)),
    }
