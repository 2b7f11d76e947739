"""An approximate, budgeted block search where the exact one reads every block: does DARE keep its quality?

With DARE trained on the lifelong synthetic data (L = 10k, log-bucket positions, benchmarks/lifelong.py
`--pos-exact 100 --bundles DIR`) the learned position term is flat, so the exact bound-pruned search
(retrieval.block_search) reads ~100% of the blocks (benchmarks/block_index_pruning.py). Here stage 1 reads
only a budget of events per request instead: the seed (the newest min(B, L) events, as the exact search)
and then whole blocks, in the order of a ranking rule over the block summaries' bounds
(retrieval.block_search.plan_blocks: per block and candidate an upper bound of any event's score), as long
as the events read stay within the budget; one exact top-k (retrieval.topk) over what was read, at the
original columns. Ranking rules:
  max_slack      a block by max over candidates of (bound + margin - the candidate's k-th score in the
                 seed): the exact search reads exactly the blocks with a slack >= 0, this reads the
                 largest slacks first;
  candidate_rank per candidate its blocks ranked by bound; a block by its best rank over the candidates
                 (the union of every candidate's top-m blocks, m growing; ties by max_slack): no candidate
                 with large bounds takes the whole budget;
  centroid_rank  as candidate_rank, the blocks ranked by <q, centroid> + the block's position bound (the
                 summary's mean key, not its upper bound: the ball's |q| r term ranks wide blocks first,
                 whether or not they hold a high score);
  recent         the newest blocks (no summary read): what a shorter window gives, the baseline a rule
                 must beat.

A request is one test target of the lifelong data (its rows: the positive or negative labels of one target
share the history), alone (`rows`, C = 3) or with random catalogue items added up to C = --fill (`fill`,
what a ranking request scores; items as often as they occur; one budget for all C candidates). Per budget (fractions of the window's events
and fixed event counts) and block size: recall@k of the exact top-k (per candidate |approx & exact| /
min(k, L), mean over candidates; `rows` means over the test rows only), the events read, and on the test
rows the model's AUC and evidence recall / hit per evidence distance (lifelong.figures) with stage 2 run on
the approximate top-k (DARE.kept_heads), next to the exact search's from the same pipeline and from the
batch forward (trainer predict, lifelong.py's figures). Control: the same requests on an untrained model
of the same config and random histories, and the trained model on random histories (recall only).

    .venv/bin/python benchmarks/budget_search.py --bundle /tmp/budget/bundles/dare-L10000-s1 \
        --data /tmp/budget/data [--blocks 64 256] [--fractions 0.05 0.1 0.25 0.5] [--events 1000 2000 4000] \
        [--fill 200] [--out results/budget_search_lifelong.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _machine import add_out_arg, emit  # noqa: E402
from block_index_pruning import keys_and_query, position_profile  # noqa: E402
from lifelong import figures  # noqa: E402

RULES = ("max_slack", "candidate_rank", "centroid_rank", "recent")
REAL = "trained, real histories"   # the model and histories whose test rows are scored (AUC); the others: controls


class DenseIds:
    """keys_and_query's `serving` for a dataset whose ids are the model's table rows already (the synthetic
    data: the trainer indexes the tables with the stored ids), so no vocabulary maps them."""

    def __init__(self, model, max_len: int) -> None:
        self.model, self.max_len = model, max_len

    @staticmethod
    def map_ids(ids: np.ndarray, field: str) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)), 0


def position_bound(model, max_len: int, block: int):
    from kernels.topk_attention.reference import segment_scale
    from recsys.models.dare import position_rows
    from retrieval.block_search import PositionBound

    (att, prefix), _ = model.role_tables()
    pt = att.weights()[f"{prefix}_pos"]
    d = pt.shape[1]
    rows = position_rows(torch.arange(max_len + 1), model.config)
    return PositionBound(pt[0] * segment_scale(3 * d, list(model.segments))[2 * d:], pt, block, rows)


class Request:
    """One request's blocks: the seed, per block the events it adds past the seed (abs ranges clipped to the
    window and below the seed) and per (block, candidate) the slack of the summary bound against the
    candidate's k-th score in the seed."""

    def __init__(self, q: torch.Tensor, keys: torch.Tensor, n: int, block: int, k: int, segs, pos) -> None:
        from kernels.topk_attention.reference import segment_scale
        from retrieval.block_search import (block_position_bounds, kth_scores, needed, plan_blocks, summaries,
                                            topk_over, window_blocks)

        L = keys.shape[0]
        d_sem = segs[0]
        self.q, self.keys, self.n, self.L, self.k, self.segs = q, keys, n, L, k, segs
        qs = q.float() * segment_scale(q.shape[1], segs)
        ix0, entries = summaries(keys.flip(0)[:, :d_sem], n - L, block)   # the window's events, oldest first
        ids = window_blocks(n, L, block)
        assert ids[0] == ix0 and len(ids) == len(entries)
        plan = plan_blocks(qs, d_sem, ids, entries, n, L, block, pos)
        self.n_seed = min(block, L)
        below = n - self.n_seed
        self.lo = np.maximum(ids * block, n - L)
        self.hi = np.minimum((ids + 1) * block, below)
        self.size = np.maximum(self.hi - self.lo, 0)
        s_seed, _ = topk_over(q, keys[:self.n_seed], np.arange(self.n_seed), k, segs)
        kth = kth_scores(s_seed, k)
        done = self.size == 0
        self.exact_read = float(self.size[needed(plan, kth, done)].sum() + self.n_seed) / L
        self.slack = plan.upper.double() + plan.margin[None, :] - kth[None, :]           # [nb, C]; inf: seed < k
        self.eligible = np.flatnonzero(~done)
        c = torch.from_numpy(entries[:, 2 * d_sem:3 * d_sem].astype(np.float64))
        p = torch.from_numpy(block_position_bounds(ids, n, block, pos))
        self.centroid = c @ qs[:, :d_sem].double().T + p[:, None]                        # [nb, C]

    def order(self, rule: str) -> np.ndarray:
        """Eligible blocks, first read first."""
        e = self.eligible
        if rule == "recent":
            return e[::-1]
        slack = self.slack[e] if rule != "centroid_rank" else self.centroid[e]
        best = slack.max(1).values.numpy()
        if rule == "max_slack":
            return e[np.lexsort((-e, -best))]                          # ties: the newer block first
        rank = torch.empty_like(slack, dtype=torch.long)
        rank.scatter_(0, torch.argsort(-slack, dim=0, stable=True), torch.arange(len(e))[:, None].expand_as(slack).contiguous())
        return e[np.lexsort((-e, -best, rank.min(1).values.numpy()))]

    def columns(self, blocks: np.ndarray) -> np.ndarray:
        """The seed and these blocks' events as reference columns (0 = most recent), ascending."""
        parts = [np.arange(self.n_seed)] + [np.arange(self.n - self.hi[b], self.n - self.lo[b]) for b in blocks]
        return np.sort(np.concatenate(parts))

    def within(self, rule: str, budget: int) -> np.ndarray:
        """The columns a budget of events reads: the seed, then blocks in the rule's order while they fit."""
        o = self.order(rule)
        fits = np.cumsum(self.size[o]) <= budget - self.n_seed
        return self.columns(o[:int(np.argmin(fits)) if not fits.all() else len(o)])

    def topk(self, cols: np.ndarray) -> torch.Tensor:
        from retrieval.block_search import topk_over

        return topk_over(self.q, self.keys[torch.from_numpy(cols)], cols, self.k, self.segs)[1]

    def oracle_events(self, exact: torch.Tensor) -> float:
        """Share of the window a perfect ranking reads for recall 1: the seed and every block holding a
        candidate's exact top-k event."""
        a = self.n - 1 - exact[exact >= self.n_seed].numpy()
        hold = np.unique(np.searchsorted(self.hi, a, side="right"))
        return float(self.n_seed + self.size[hold].sum()) / self.L


def recall(approx: torch.Tensor, exact: torch.Tensor) -> np.ndarray:
    """Per candidate |approx & exact| / |exact| over the real (>= 0) indices."""
    a, e = approx.numpy(), exact.numpy()
    hit = ((a[:, :, None] == e[:, None, :]) & (e[:, None, :] >= 0)).any(1).sum(1)
    return hit / np.maximum((e >= 0).sum(1), 1)


def requests(samples, store, max_len: int, fill: int, seed: int = 0):
    """Per test target: (rows of the split, user, n = events before the target, candidate ids: the rows'
    targets first, then catalogue fillers up to `fill`)."""
    key = samples.user.astype(np.int64) * (int(samples.pos.max()) + 1) + samples.pos
    _, first, inv = np.unique(key, return_index=True, return_inverse=True)
    rng = np.random.default_rng(seed)
    for t in np.argsort(first, kind="stable"):
        rows = np.flatnonzero(inv == t)
        pick = rng.integers(0, len(store.item), max(fill - len(rows), 0))
        ci = np.concatenate([samples.item[rows], store.item[pick]]).astype(np.int64)
        cc = np.concatenate([samples.cate[rows], store.cate[pick]]).astype(np.int64)
        yield rows, int(samples.user[rows[0]]), int(samples.pos[rows[0]]), ci, cc


def markdown(result: dict) -> str:
    """Per model and histories, candidates and block size: recall@k (and on the scored rows AUC / evidence
    hit) per rule and budget, the exact search's line first."""
    ex = result["exact"]["per_request_pipeline"]["all"]
    out = []
    groups: dict = {}
    for r in result["results"]:
        groups.setdefault((r["model_and_histories"], r["candidates"], r["block"]), []).append(r)
    for (name, mode, block), rs in groups.items():
        head = next(r for r in rs if r["rule"] == "exact")
        budgets = [r["budget"] for r in rs if r["rule"] == RULES[0]]
        lines = [f"{name}, candidates {mode}, B = {block}: exact search reads {head['exact_search_read_fraction_mean']:.3f}, "
                 f"a perfect ranking {head['oracle_read_fraction_mean']:.3f} of the window"
                 + (f"; exact AUC {ex['auc']:.4f}, hit {ex['hit']:.3f}" if name == REAL else ""), "",
                 "| rule | " + " | ".join(f"{v:g}" + (" L" if kind == "fraction" else " ev") for b in budgets
                                         for kind, v in b.items()) + " |", "|---" * (len(budgets) + 1) + "|"]
        for rule in RULES:
            cells = []
            for r in (r for r in rs if r["rule"] == rule):
                c = f"{r['recall_at_k_mean']:.3f}"
                if "test" in r:
                    c += f" / {r['test']['all']['auc']:.4f} / {r['test']['all']['hit']:.3f}"
                cells.append(c)
            lines.append(f"| {rule} | " + " | ".join(cells) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", help="DARE trained by lifelong.py --bundles (the test split's model)")
    ap.add_argument("--data", type=Path, help="lifelong.py --data-dir (the same data)")
    ap.add_argument("--blocks", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.1, 0.25, 0.5])
    ap.add_argument("--events", type=int, nargs="+", default=[1000, 2000, 4000])
    ap.add_argument("--fill", type=int, default=200, help="candidates per request in the `fill` mode")
    ap.add_argument("--requests", type=int, default=None, help="the first N test targets only (a quick look)")
    ap.add_argument("--note", default="", help="where the bundle came from (recorded in the JSON)")
    ap.add_argument("--table", type=Path, default=None, help="print the markdown tables of this result JSON and exit")
    add_out_arg(ap, "budget_search_lifelong")
    args = ap.parse_args()
    if args.table:
        print(markdown(json.loads(args.table.read_text())))
        return
    if not (args.bundle and args.data):
        ap.error("--bundle and --data are required")
    torch.set_num_threads(1)
    t_start = time.perf_counter()

    from recsys.data.sequences import load_dataset
    from recsys.models import build_model
    from recsys.train.evaluation import predict
    from retrieval.block_search import topk_over
    from service.model_state import ServingModel

    served = ServingModel.from_bundle(args.bundle)       # the auxiliary head dropped: kept_heads runs stage 2
    model, L_max, k = served.model, served.max_len, served.model.config.top_k
    segs = list(model.segments)
    torch.manual_seed(0)
    untrained = build_model(model.config, served.n_items, served.n_cates).eval()
    ds = load_dataset(args.data)
    samples, store = ds.splits["test"], ds.store

    batch = predict(model, ds, "test", L_max, 512)          # lifelong.py's scoring of the same bundle
    budgets = [("fraction", f) for f in args.fractions] + [("events", e) for e in args.events]
    modes = {"rows": 0, "fill": args.fill}
    bounds = {(name, b): position_bound(m, L_max, b) for name, m in (("trained", model), ("untrained", untrained))
              for b in args.blocks}
    R = len(samples)
    # per (mode, block, rule, budget) and the exact search: test rows' probs / indices, recall, events read
    probs: dict = {}
    idx: dict = {}
    acc: dict = {}
    exact_rows = {"probs": np.zeros(R), "idx": np.zeros((R, k), np.int64)}
    rng = np.random.default_rng(1)
    gen = list(requests(samples, store, L_max, args.fill))[:args.requests]
    prof_cands, prof_hist, prof_rand = [], [], []
    for r_i, (rows, user, n, ci, cc) in enumerate(gen):
        item, cate, _ = store.user_events(user)
        L = min(n, L_max)
        item, cate = item[n - L:n], cate[n - L:n]
        rand = (rng.integers(1, served.n_items, L), rng.integers(1, served.n_cates, L))
        if r_i < 20:
            prof_hist.append((item, cate))
            prof_rand.append(rand)
            prof_cands.append((torch.from_numpy(ci[:args.fill]), torch.from_numpy(cc[:args.fill])))
        nr = len(rows)
        h_i, h_c = torch.from_numpy(item[::-1].copy()), torch.from_numpy(cate[::-1].copy())
        t_i, t_c = torch.from_numpy(ci[:nr]), torch.from_numpy(cc[:nr])

        def stage2(ix: torch.Tensor) -> np.ndarray:
            """The test rows' probabilities with stage 1's columns ix [C, k] (rows first)."""
            safe = ix[:nr].clamp(min=0)
            out = model.kept_heads(t_i, t_c, h_i[safe], h_c[safe], ix[:nr], L)
            return torch.sigmoid(out.logit).double().numpy()

        for mode, C in modes.items():
            c = max(C, nr)
            cand_i, cand_c = torch.from_numpy(ci[:c]), torch.from_numpy(cc[:c])
            for name, m, hist in ((REAL, model, (item, cate)), ("trained, random histories", model, rand),
                                  ("untrained, random histories", untrained, rand)):
                keys, q = keys_and_query(DenseIds(m, L_max), hist[0], hist[1], cand_i, cand_c)
                exact = topk_over(q, keys, np.arange(L), k, segs)[1]
                if name == REAL and mode == "rows":
                    exact_rows["probs"][rows] = stage2(exact)
                    exact_rows["idx"][rows] = exact[:nr].numpy()
                for block in args.blocks:
                    req = Request(q, keys, n, block, k, segs, bounds[(name.split(",")[0], block)])
                    key0 = (name, mode, block)
                    a0 = acc.setdefault(key0 + ("exact",), {"read": [], "oracle": []})
                    a0["read"].append(req.exact_read)
                    a0["oracle"].append(req.oracle_events(exact))
                    for rule in RULES:
                        for kind, v in budgets:
                            budget = int(round(v * L)) if kind == "fraction" else int(v)
                            cols = req.within(rule, budget)
                            ix = req.topk(cols)
                            rec = recall(ix, exact)
                            a = acc.setdefault(key0 + (rule, kind, v), {"read": [], "recall": [], "recall_rows": []})
                            a["read"].append(len(cols) / L)
                            a["recall"].append(rec.mean())
                            a["recall_rows"].extend(rec[:nr])
                            if name == REAL:
                                kk = (mode, block, rule, kind, v)
                                probs.setdefault(kk, np.zeros(R))[rows] = stage2(ix)
                                idx.setdefault(kk, np.zeros((R, k), np.int64))[rows] = ix[:nr].numpy()
        if r_i % 50 == 0:
            print(f"request {r_i}/{len(gen)} {time.perf_counter() - t_start:.0f} s", file=sys.stderr, flush=True)

    scored = np.sort(np.concatenate([g[0] for g in gen]))
    sub = samples if len(scored) == R else _rows_of(samples, scored)

    def fig(p, i):
        return figures(sub, p[scored], i[scored], L_max)

    same_idx = float((exact_rows["idx"][scored] == batch.indices[scored]).all(1).mean())
    results = []
    for key, a in acc.items():
        name, mode, block, rule, *bud = key
        r = {"model_and_histories": name,
             "candidates": mode, "block": block, "rule": rule}
        if rule == "exact":
            r |= {"exact_search_read_fraction_mean": round(float(np.mean(a["read"])), 4),
                  "oracle_read_fraction_mean": round(float(np.mean(a["oracle"])), 4)}
        else:
            kind, v = bud
            r |= {"budget": {kind: v}, "read_fraction_mean": round(float(np.mean(a["read"])), 4),
                  "recall_at_k_mean": round(float(np.mean(a["recall"])), 4),
                  "recall_at_k_test_rows_mean": round(float(np.mean(a["recall_rows"])), 4)}
            if name == REAL:
                r["test"] = fig(probs[(mode, block, rule, kind, v)], idx[(mode, block, rule, kind, v)])
        results.append(r)
        print({x: y for x, y in r.items() if x != "test"} | ({"auc": r["test"]["all"]["auc"], "hit": r["test"]["all"]["hit"]}
                                                            if "test" in r else {}), file=sys.stderr)
    emit({"benchmark": "budget_search",
          "inputs": {"bundle": args.bundle, "data": str(args.data), "bundle_note": args.note, "split": "test",
                     "requests": len(gen), "rows": int(len(scored)), "top_k": k, "max_len": L_max,
                     "pos_exact": model.config.pos_exact, "blocks": args.blocks,
                     "budgets": [{kind: v} for kind, v in budgets], "rules": list(RULES),
                     "candidates": {"rows": "the target's own test rows", "fill": f"the rows plus random catalogue "
                                    f"items up to {args.fill}"},
                     "seed": "the newest min(B, L) events, always read and counted in the budget"},
          "exact": {"batch_forward": fig(batch.probs, batch.indices),
                    "per_request_pipeline": fig(exact_rows["probs"], exact_rows["idx"]),
                    "pipeline_indices_equal_batch_forward_share": round(same_idx, 4),
                    "pipeline_prob_max_abs_diff": float(np.abs(exact_rows["probs"][scored] - batch.probs[scored]).max())},
          # the position term against the semantic spread (block_index_pruning.position_profile), first 20 requests
          "position_profile": {REAL: position_profile(DenseIds(model, L_max), prof_hist, prof_cands, k),
                               "untrained, random histories": position_profile(DenseIds(untrained, L_max), prof_rand,
                                                                               prof_cands, k)},
          "results": results, "wall_s": round(time.perf_counter() - t_start, 1)}, args.out)


def _rows_of(samples, rows: np.ndarray):
    """The split's `rows` as Samples (a --requests subset)."""
    from dataclasses import fields, replace

    return replace(samples, **{f.name: (None if getattr(samples, f.name) is None else
                                        [getattr(samples, f.name)[r] for r in rows] if isinstance(getattr(samples, f.name), list)
                                        else getattr(samples, f.name)[rows]) for f in fields(samples)})


if __name__ == "__main__":
    main()
