"""Offline CTR metrics, vectorised numpy.

- `auc`: ROC AUC with tied scores counted as half (the Mann-Whitney statistic; equals sklearn's).
- `grouped_auc`: mean of per-group AUCs weighted by the group's rows, over groups with both labels.
  Grouped by user it is GAUC; by target category, the original DARE code's reported AUC.
- `logloss`: of the main head's probabilities only.
- Mergeable partials, for metrics over sharded rows: `auc_counts` (per group and distinct score, the positive
  and negative counts; `merge_auc_counts` sums them exactly), `group_aucs` (per-group AUC and rows: what a
  shard holding whole users sends for GAUC; `merge_group_aucs` averages), `logloss_partial`, and
  `ctr_partial` / `merge_ctr` for the whole set. The single-process functions are the one-shard case of
  the same code, so a merge over any user-disjoint split gives the same AUC, GAUC and category AUC bit for
  bit and the same logloss to float rounding.
- `search_recall`: the search stage's recall of the true driver events on synthetic data (all of them);
  `evidence_recall`: the same counted within the searched window and k slots, plus the hit rate
  (mergeable: `evidence_partial` / `merge_evidence`).
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


def _sum_runs(groups: np.ndarray, scores: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> dict[str, np.ndarray]:
    order = np.lexsort((scores, groups))
    g, s = groups[order], scores[order]
    if not len(s):
        return {"group": g, "score": s, "pos": np.zeros(0), "neg": np.zeros(0)}
    start = np.flatnonzero(np.r_[True, (g[1:] != g[:-1]) | (s[1:] != s[:-1])])
    return {"group": g[start], "score": s[start], "pos": np.add.reduceat(pos[order], start),
            "neg": np.add.reduceat(neg[order], start)}


def auc_counts(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Mergeable AUC partial: per (group, distinct score), sorted, the positive and negative row counts.

    Counts are exact and order-free, so `merge_auc_counts` over any row split (groups may span shards, as
    categories do) rebuilds the table one process builds, and every AUC computed from it is bit-identical."""
    labels, scores = _check(labels, scores)
    groups = np.zeros(len(labels), np.int64) if groups is None else np.asarray(groups)
    if groups.shape != labels.shape:
        raise ValueError(f"groups {groups.shape} must match labels {labels.shape}")
    return _sum_runs(groups, scores, labels, 1.0 - labels)


def merge_auc_counts(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    # an empty shard's arrays may carry another dtype (float ids from np.asarray([])); they add nothing
    parts = [p for p in parts if len(p["group"])] or list(parts[:1])
    if not parts:
        return {"group": np.zeros(0, np.int64), "score": np.zeros(0), "pos": np.zeros(0), "neg": np.zeros(0)}
    cat = {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in ("group", "score", "pos", "neg")}
    return _sum_runs(cat["group"], cat["score"].astype(np.float64), cat["pos"].astype(np.float64), cat["neg"].astype(np.float64))


def group_aucs(counts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per group of a count table: AUC with tied scores counted as half (NaN without both labels) and the
    group's rows (its weight). Computed from a group's complete counts, it is also GAUC's mergeable partial:
    a shard holding whole users sends only this."""
    g, pos, neg = counts["group"], counts["pos"], counts["neg"]
    if not len(g):
        return {"group": g, "auc": np.zeros(0), "weight": np.zeros(0)}
    new = np.r_[True, g[1:] != g[:-1]]
    first, gid = np.flatnonzero(new), np.cumsum(new) - 1
    below = np.cumsum(neg) - neg
    below -= below[first][gid]
    # each term is a half-integer, exact in float64 below 2^52 rows, so the sum is independent of order
    wins = np.add.reduceat(pos * (below + neg / 2.0), first)
    n_pos, n_neg = np.add.reduceat(pos, first), np.add.reduceat(neg, first)
    both = (n_pos > 0) & (n_neg > 0)
    per = np.full(len(first), np.nan)
    per[both] = wins[both] / (n_pos[both] * n_neg[both])
    return {"group": g[first], "auc": per, "weight": n_pos + n_neg}


def merge_group_aucs(parts: list[dict[str, np.ndarray]]) -> float:
    """Row-weighted mean AUC over groups that have both labels (NaN when none has). Each group must be in
    exactly one part: per-group AUCs do not merge, only whole groups do."""
    parts = [p for p in parts if len(p["group"])]
    if not parts:
        return float("nan")
    g = np.concatenate([np.asarray(p["group"]) for p in parts])
    a = np.concatenate([np.asarray(p["auc"], np.float64) for p in parts])
    w = np.concatenate([np.asarray(p["weight"], np.float64) for p in parts])
    order = np.argsort(g, kind="stable")  # the single-process order, so the weighted sum is bit-identical
    g, a, w = g[order], a[order], w[order]
    if len(g) > 1 and (g[1:] == g[:-1]).any():
        dup = g[1:][g[1:] == g[:-1]][0]
        raise ValueError(f"group {dup} is split across partials; shard by whole groups")
    ok = ~np.isnan(a)
    if not ok.any():
        return float("nan")
    return float(np.average(a[ok], weights=w[ok]))


def grouped_auc(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> float:
    """Row-weighted mean AUC over groups that have both labels (NaN when none has)."""
    return merge_group_aucs([group_aucs(auc_counts(labels, scores, groups))])


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    return grouped_auc(labels, scores, np.zeros(len(labels), dtype=np.int64))


def gauc(labels: np.ndarray, scores: np.ndarray, users: np.ndarray) -> float:
    return grouped_auc(labels, scores, users)


def logloss_partial(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    labels, probs = _check(labels, probs)
    p = np.clip(probs, EPS, 1.0 - EPS)
    return {"sum": float(-np.sum(labels * np.log(p) + (1.0 - labels) * np.log(1.0 - p))), "rows": len(labels)}


def merge_logloss(parts: list[dict[str, float]]) -> float:
    # float sums: a split changes the last bits only (relative ~1e-16 per shard)
    rows = sum(p["rows"] for p in parts)
    return sum(p["sum"] for p in parts) / rows if rows else float("nan")


def logloss(labels: np.ndarray, probs: np.ndarray) -> float:
    return merge_logloss([logloss_partial(labels, probs)])


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
    return merge_evidence([evidence_partial(indices, pos, evidence, max_len)])


def evidence_partial(indices: np.ndarray, pos: np.ndarray, evidence: list[np.ndarray], max_len: int) -> dict[str, float]:
    """evidence_recall's mergeable partial of a shard of rows: the sums and counts behind its means."""
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
    return {"recall_sum": float(np.sum(hits[has] / np.minimum(k, n_reach[has]))), "hit_rows": int(np.sum(hits[has] > 0)),
            "reach_rows": int(has.sum()), "evidence_rows": int(any_ev.sum()), "reachable_rows": int(np.sum(has[any_ev]))}


def merge_evidence(parts: list[dict[str, float]]) -> dict[str, float]:
    # one part gives np.mean's value exactly (the same pairwise sum, divided once); more parts, to rounding
    reach, any_ev = sum(p["reach_rows"] for p in parts), sum(p["evidence_rows"] for p in parts)
    nan = float("nan")
    return {
        "recall": sum(p["recall_sum"] for p in parts) / reach if reach else nan,
        "hit": sum(p["hit_rows"] for p in parts) / reach if reach else nan,
        "reach": sum(p["reachable_rows"] for p in parts) / any_ev if any_ev else nan,
    }


def ctr_partial(labels: np.ndarray, probs: np.ndarray, users: np.ndarray, cates: np.ndarray) -> dict:
    """ctr_metrics' mergeable partial of a shard holding whole users (categories may span shards)."""
    return {
        "auc": auc_counts(labels, probs),
        "gauc": group_aucs(auc_counts(labels, probs, users)),
        "cate": auc_counts(labels, probs, cates),
        "logloss": logloss_partial(labels, probs),
    }


def merge_ctr(parts: list[dict]) -> dict[str, float]:
    """ctr_metrics from the shards' ctr_partial results: AUC and category AUC exact, GAUC exact given
    user-disjoint shards, logloss to float rounding."""
    return {
        "auc": merge_group_aucs([group_aucs(merge_auc_counts([p["auc"] for p in parts]))]),
        "gauc": merge_group_aucs([p["gauc"] for p in parts]),
        "logloss": merge_logloss([p["logloss"] for p in parts]),
        "cate_auc": merge_group_aucs([group_aucs(merge_auc_counts([p["cate"] for p in parts]))]),
        "rows": int(sum(p["logloss"]["rows"] for p in parts)),
    }


def ctr_metrics(labels: np.ndarray, probs: np.ndarray, users: np.ndarray, cates: np.ndarray) -> dict[str, float]:
    """The metric set reported for a split: AUC, GAUC (by user), logloss, category-grouped AUC."""
    return merge_ctr([ctr_partial(labels, probs, users, cates)])
