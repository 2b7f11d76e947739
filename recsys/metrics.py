"""Offline CTR metrics, vectorised numpy, and their exact merge over ranks holding parts of the rows.

- `auc`: ROC AUC with tied scores counted as half (the Mann-Whitney statistic; equals sklearn's).
- `grouped_auc`: mean of per-group AUCs weighted by the group's rows, over groups with both labels.
  Grouped by user it is GAUC; by target category, the original DARE code's reported AUC.
- `logloss`: of the main head's probabilities only.
- `search_recall` / `evidence_recall`: the search stage against the synthetic generator's evidence.

Every number is computed so that no split of the rows can change a bit of it:
- a group's AUC is a function of three exact integers (positives, negatives, twice the concordant pairs
  with ties as half), computed from its per-score count table (`auc_counts`);
- means over groups and rows (the weighted AUC means, logloss, recall) are exact sums, rounded once
  (`exact_sum`: a float array's sum as a Fraction; `merge_means`).
So the one-process functions and a merge over any row split give the same floats, not merely close ones.

Merge over ranks (`merge_counts`, what `merge_ctr` and `recsys.train.evaluation.merge_split` call): a
rank never holds more than about its share of the count tables. Each rank's (group, score) runs are
range-partitioned by key (splitters from a regular sample of every rank's runs), sent to the range's rank
(`all_to_all`), and every rank reduces its key range to per-group integers; these per-range totals
(one row per group and range: O(groups + ranks), e.g. one row per rank for the global AUC) are gathered
everywhere, and the pairs between ranges (a positive in range r beats the negatives of its group in the
ranges below) are added exactly. GAUC needs no exchange: shards hold whole users, so each rank sends
only its exact sums. `comm` is anything with `world`, `gather(obj)` (every rank's obj, in rank order) and
`all_to_all(objs)` (objs[d] goes to rank d; returns what every rank sent here, in rank order):
`recsys.train.loop.Context` and its process-group subclasses, or `OneRank` here.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

EPS = 1e-7
SAMPLE = 1024  # runs per rank and table in the splitter sample: a range holds ~1/world of the runs +- 1/SAMPLE


class OneRank:
    """The one-process communicator: rank 0 of 1."""

    rank, world = 0, 1

    def gather(self, obj):
        return [obj]

    def all_to_all(self, objs: list) -> list:
        return list(objs)


def _check(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    if labels.shape != scores.shape or labels.ndim != 1:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} must be equal-length 1-d arrays")
    if not np.isfinite(scores).all():
        bad = int(np.flatnonzero(~np.isfinite(scores))[0])
        raise ValueError(f"scores: row {bad} is not finite ({scores[bad]})")
    return labels.astype(np.float64), scores


def exact_sum(x: np.ndarray) -> Fraction:
    """The exact sum of a float array (no rounding at all), so sums of parts add up to the sum of the whole
    whatever the split. Each float is m * 2^e with an integer |m| < 2^53; the m are summed per e in int64
    halves of 26 bits (no overflow below 2^36 values), then shifted together in Python ints."""
    x = np.asarray(x, np.float64).ravel()
    x = x[x != 0]
    if not len(x):
        return Fraction(0)
    m, e = np.frexp(x)
    mant, e = (m * 2.0**53).astype(np.int64), e.astype(np.int64) - 53
    order = np.argsort(e, kind="stable")
    mant, e = mant[order], e[order]
    start = np.flatnonzero(np.r_[True, e[1:] != e[:-1]])
    hi, lo = np.add.reduceat(mant >> 26, start), np.add.reduceat(mant & (2**26 - 1), start)
    low = int(e[0])
    total = sum(((int(h) << 26) + int(v)) << (int(ee) - low) for ee, h, v in zip(e[start], hi, lo))
    return Fraction(total << low) if low >= 0 else Fraction(total, 1 << -low)


def merge_means(parts: list[dict]) -> float:
    """sum / weight over partials {"sum": Fraction, "weight": int}, rounded once (NaN without weight)."""
    weight = sum(p["weight"] for p in parts)
    return float(sum((p["sum"] for p in parts), Fraction(0)) / weight) if weight else float("nan")


def _sum_runs(groups: np.ndarray, scores: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> dict[str, np.ndarray]:
    order = np.lexsort((scores, groups))
    g, s = groups[order], scores[order]
    if not len(s):
        return {"group": g, "score": s, "pos": np.zeros(0, np.int64), "neg": np.zeros(0, np.int64)}
    start = np.flatnonzero(np.r_[True, (g[1:] != g[:-1]) | (s[1:] != s[:-1])])
    return {"group": g[start], "score": s[start], "pos": np.add.reduceat(pos[order], start),
            "neg": np.add.reduceat(neg[order], start)}


def auc_counts(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """AUC's count table: per (group, distinct score), sorted, the positive and negative row counts (int64).
    Labels must be 0 or 1."""
    labels, scores = _check(labels, scores)
    groups = np.zeros(len(labels), np.int64) if groups is None else np.asarray(groups).astype(np.int64, copy=False)
    if groups.shape != labels.shape:
        raise ValueError(f"groups {groups.shape} must match labels {labels.shape}")
    pos = labels.astype(np.int64)
    if not np.array_equal(pos, labels) or ((pos != 0) & (pos != 1)).any():
        raise ValueError("labels must be 0 or 1")
    return _sum_runs(groups, scores, pos, 1 - pos)


def _merge_runs(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    parts = [p for p in parts if len(p["group"])]
    if not parts:
        return _sum_runs(np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64), np.zeros(0, np.int64))
    cat = {k: np.concatenate([p[k] for p in parts]) for k in ("group", "score", "pos", "neg")}
    return _sum_runs(cat["group"], cat["score"], cat["pos"], cat["neg"])


def group_totals(counts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per group of a count table: positives, negatives and twice the pairs a positive wins (a tie counts
    one in the doubled count), exact int64 (below ~4e9 rows)."""
    g, pos, neg = counts["group"], counts["pos"], counts["neg"]
    if not len(g):
        return {"group": g, "pos": pos, "neg": neg, "wins2": np.zeros(0, np.int64)}
    new = np.r_[True, g[1:] != g[:-1]]
    first, gid = np.flatnonzero(new), np.cumsum(new) - 1
    below = np.cumsum(neg) - neg
    below -= below[first][gid]
    return {"group": g[first], "pos": np.add.reduceat(pos, first), "neg": np.add.reduceat(neg, first),
            "wins2": np.add.reduceat(pos * (2 * below + neg), first)}


def aucs_of(totals: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per group: AUC (NaN without both labels) from `group_totals`' integers, and the group's rows."""
    n_pos, n_neg = totals["pos"], totals["neg"]
    both = (n_pos > 0) & (n_neg > 0)
    per = np.full(len(n_pos), np.nan)
    per[both] = totals["wins2"][both].astype(np.float64) / 2.0 / (n_pos[both].astype(np.float64) * n_neg[both])
    return {"group": totals["group"], "auc": per, "weight": n_pos + n_neg}


def group_aucs(counts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per group of a complete count table: AUC with tied scores counted as half and the group's rows."""
    return aucs_of(group_totals(counts))


def mean_partial(per: dict[str, np.ndarray]) -> dict:
    """The weighted mean's exact partial over the groups with both labels: {"sum": Fraction, "weight": int}."""
    ok = ~np.isnan(per["auc"])
    return {"sum": exact_sum(per["auc"][ok] * per["weight"][ok]), "weight": int(per["weight"][ok].sum())}


def grouped_auc(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> float:
    """Row-weighted mean AUC over groups that have both labels (NaN when none has)."""
    return merge_means([mean_partial(group_aucs(auc_counts(labels, scores, groups)))])


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    return grouped_auc(labels, scores, np.zeros(len(labels), dtype=np.int64))


def gauc(labels: np.ndarray, scores: np.ndarray, users: np.ndarray) -> float:
    return grouped_auc(labels, scores, users)


def _key_sample(counts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Regularly spaced (group, score) keys of a sorted count table, each weighing the runs it stands for."""
    n = len(counts["group"])
    k = min(SAMPLE, n)
    idx = np.arange(k) * n // max(k, 1)
    return {"group": counts["group"][idx], "score": counts["score"][idx], "weight": np.full(k, n / max(k, 1))}


def _splitters(samples: list[dict[str, np.ndarray]], world: int) -> dict[str, np.ndarray]:
    """world - 1 keys cutting the ranks' pooled sample into about equal weights (a function of the samples
    only: every rank computes the same)."""
    g = np.concatenate([s["group"] for s in samples]).astype(np.int64)
    s_ = np.concatenate([s["score"] for s in samples]).astype(np.float64)
    w = np.concatenate([s["weight"] for s in samples]).astype(np.float64)
    if not len(g):
        return {"group": np.zeros(0, np.int64), "score": np.zeros(0)}
    order = np.lexsort((s_, g))
    cw = np.cumsum(w[order])
    at = np.minimum(np.searchsorted(cw, cw[-1] * np.arange(1, world) / world, side="right"), len(g) - 1)
    return {"group": g[order][at], "score": s_[order][at]}


def _partition(counts: dict[str, np.ndarray], cuts: dict[str, np.ndarray], world: int) -> list[dict[str, np.ndarray]]:
    """The sorted table cut into `world` key ranges: range r holds keys in [cut r-1, cut r); a key equal to
    a cut goes above it, so one score's runs from every rank meet in one range."""
    g, s = counts["group"], counts["score"]
    bounds = [0]
    for cg, cs in zip(cuts["group"], cuts["score"]):
        lo, hi = np.searchsorted(g, cg, "left"), np.searchsorted(g, cg, "right")
        bounds.append(int(lo + np.searchsorted(s[lo:hi], cs, "left")))
    bounds += [len(g)] * (world + 1 - len(bounds))
    return [{k: v[bounds[r]:bounds[r + 1]] for k, v in counts.items()} for r in range(world)]


def _merge_range_totals(tables: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The whole table's `group_totals` from every key range's, in range order: a group spanning ranges
    adds, for each range, its positives times the group's negatives in the ranges below (all lower scores)."""
    g = np.concatenate([t["group"] for t in tables]).astype(np.int64)
    if not len(g):
        return group_totals(_merge_runs([]))
    pos, neg, wins2 = (np.concatenate([t[k] for t in tables]).astype(np.int64) for k in ("pos", "neg", "wins2"))
    new = np.r_[True, g[1:] != g[:-1]]
    first, gid = np.flatnonzero(new), np.cumsum(new) - 1
    below = np.cumsum(neg) - neg
    below -= below[first][gid]
    return {"group": g[first], "pos": np.add.reduceat(pos, first), "neg": np.add.reduceat(neg, first),
            "wins2": np.add.reduceat(wins2 + 2 * pos * below, first)}


def merge_counts(tables: dict[str, dict[str, np.ndarray]], comm, extra=None) -> tuple[dict[str, dict[str, np.ndarray]], list]:
    """Per named count table (this rank's `auc_counts`; groups and scores may span ranks), the whole
    table's per-group AUCs (`aucs_of`) on every rank; and every rank's `extra`, in rank order. Three
    collectives: the key samples, the range exchange, the per-range totals (which carry `extra`). A rank
    holds its own runs, the runs of its key range and the per-range totals, never the whole table."""
    world = comm.world
    samples = comm.gather({n: _key_sample(t) for n, t in tables.items()})
    names = sorted({n for s in samples for n in s})  # a rank lacking a table sends none of its runs
    cuts = {n: _splitters([s[n] for s in samples if n in s], world) for n in names}
    del samples
    out = [{} for _ in range(world)]
    for n in names:
        if n in tables:
            for r, piece in enumerate(_partition(tables[n], cuts[n], world)):
                out[r][n] = piece
    got = comm.all_to_all(out)
    del out
    mine = {n: group_totals(_merge_runs([p[n] for p in got if n in p])) for n in names}
    del got
    everyone = comm.gather((mine, extra))
    return {n: aucs_of(_merge_range_totals([m[n] for m, _ in everyone])) for n in names}, [e for _, e in everyone]


def grouped_mean(per: dict[str, np.ndarray]) -> float:
    """Row-weighted mean of a whole table's per-group AUCs (grouped_auc's value)."""
    return merge_means([mean_partial(per)])


def logloss_partial(labels: np.ndarray, probs: np.ndarray) -> dict:
    labels, probs = _check(labels, probs)
    p = np.clip(probs, EPS, 1.0 - EPS)
    return {"sum": exact_sum(-(labels * np.log(p) + (1.0 - labels) * np.log(1.0 - p))), "weight": len(labels)}


def logloss(labels: np.ndarray, probs: np.ndarray) -> float:
    return merge_means([logloss_partial(labels, probs)])


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
    return {"recall_sum": exact_sum(hits[has] / np.minimum(k, n_reach[has])), "hit_rows": int(np.sum(hits[has] > 0)),
            "reach_rows": int(has.sum()), "evidence_rows": int(any_ev.sum()), "reachable_rows": int(np.sum(has[any_ev]))}


def merge_evidence(parts: list[dict]) -> dict[str, float]:
    reach, any_ev = sum(p["reach_rows"] for p in parts), sum(p["evidence_rows"] for p in parts)
    nan = float("nan")
    return {
        "recall": merge_means([{"sum": p["recall_sum"], "weight": p["reach_rows"]} for p in parts]),
        "hit": sum(p["hit_rows"] for p in parts) / reach if reach else nan,
        "reach": sum(p["reachable_rows"] for p in parts) / any_ev if any_ev else nan,
    }


def ctr_partial(labels: np.ndarray, probs: np.ndarray, users: np.ndarray, cates: np.ndarray) -> dict:
    """ctr_metrics' partial of a shard holding whole users (categories may span shards): the global and
    category count tables (exchanged by `merge_counts`), GAUC's and logloss's exact sums."""
    return {
        "auc": auc_counts(labels, probs),
        "cate": auc_counts(labels, probs, cates),
        "gauc": mean_partial(group_aucs(auc_counts(labels, probs, users))),
        "logloss": logloss_partial(labels, probs),
    }


def ctr_result(groups: dict[str, dict[str, np.ndarray]], parts: list[dict]) -> dict[str, float]:
    """ctr_metrics from merge_counts' "auc" and "cate" tables and every rank's GAUC and logloss partials."""
    return {
        "auc": grouped_mean(groups["auc"]),
        "gauc": merge_means([p["gauc"] for p in parts]),
        "logloss": merge_means([p["logloss"] for p in parts]),
        "cate_auc": grouped_mean(groups["cate"]),
        "rows": int(sum(p["logloss"]["weight"] for p in parts)),
    }


def merge_ctr(part: dict, comm) -> dict[str, float]:
    """ctr_metrics of the whole set on every rank from this rank's ctr_partial (ranks hold disjoint users)."""
    groups, parts = merge_counts({"auc": part["auc"], "cate": part["cate"]}, comm,
                                 {"gauc": part["gauc"], "logloss": part["logloss"]})
    return ctr_result(groups, parts)


def ctr_metrics(labels: np.ndarray, probs: np.ndarray, users: np.ndarray, cates: np.ndarray) -> dict[str, float]:
    """The metric set reported for a split: AUC, GAUC (by user), logloss, category-grouped AUC."""
    return merge_ctr(ctr_partial(labels, probs, users, cates), OneRank())
