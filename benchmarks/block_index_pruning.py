"""How much of a history the block index lets a request skip: blocks read by the exact bound-pruned search
(retrieval.block_search, the path service.block_index runs) per request, on real user histories scored by a
trained DARE bundle, against an untrained model of the same shape and random histories.

Per user (the longest histories of the dataset, oldest first as stored), C candidates (random items of the
catalogue, as a ranking request sends, or the user's own held-out next items with `--candidates own`), the
newest block as the seed: the fraction of blocks scored, the fraction a perfect bound would still read
(the seed and the blocks holding some candidate's reference top-k event), and a check that the result
equals the reference top-k over the whole window (indices exactly). Per model it also records what the
bound works with: the learned position term (the folded position field, DARE.position_bias) at a few
recencies against the spread of the semantic part of the scores, and the median recency of the reference
top-k events.

With `--layout time key` the same requests also run against a layout that groups each window's events by
their semantic keys instead of by time (`run_key`, offline per window: what a key-grouped index would
read, and how tight its group bounds are against the time blocks'); `--layout time` (the default) is the
output above alone.

    .venv/bin/python benchmarks/block_index_pruning.py --bundle runs/dare/bundle --data benchmarks/ml-latest-small \
        [--users 20] [--candidates 200 own] [--blocks 64 256] [--layout time key] [--out results/block_index_pruning.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import add_out_arg, emit  # noqa: E402


def keys_and_query(serving, item: np.ndarray, cate: np.ndarray, cand_item, cand_cate):
    """History (oldest first) -> reference-order keys [L, D] and queries [C, D] from the attention tables."""
    from recsys.models.dare import position_rows

    model = serving.model
    (att, prefix), _ = model.role_tables()
    w = att.weights()
    it, ct, pt = w[f"{prefix}_item"], w[f"{prefix}_cate"], w[f"{prefix}_pos"]
    L = len(item)
    hi, _ = serving.map_ids(item[::-1], "item")
    hc, _ = serving.map_ids(cate[::-1], "cate")
    pos = position_rows(torch.arange(1, L + 1), model.config)
    keys = torch.cat([it[hi], ct[hc], pt[pos]], 1)
    q = torch.cat([it[cand_item], ct[cand_cate], pt[0].expand(len(cand_item), -1)], 1)
    return keys, q


RECENCIES = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000)


def position_profile(serving, histories, cands, k: int) -> dict:
    """The position term per recency (what the block bound adds per block) next to the semantic part of the
    scores on these requests: if the term's spread is small against the semantic spread, or it does not
    fall with distance, far blocks cannot be skipped on position grounds."""
    from kernels.topk_attention.reference import topk_reference
    from recsys.models.dare import position_rows

    model = serving.model
    (att, prefix), _ = model.role_tables()
    pt = att.weights()[f"{prefix}_pos"]
    d = pt.shape[1]
    with torch.no_grad():
        per_row = model.position_bias(pt, pt[0] * (1.0 / d ** 0.5)).double()       # the model's own numbers
        s = per_row[position_rows(torch.arange(serving.max_len + 1), model.config)].numpy()
        sem_range, sem_std, top_rec = [], [], []
        for (item, cate), (ci, cc) in zip(histories, cands):
            keys, q = keys_and_query(serving, item, cate, ci, cc)
            sem = (q[:, :2 * d] @ keys[:, :2 * d].T / (2 * d) ** 0.5).double()
            sem_range.append(float(sem.max() - sem.min()))
            sem_std.append(float(sem.std()))
            _, ri = topk_reference(q, keys, len(item), k, list(model.segments))
            top_rec.append(ri[ri >= 0].numpy() + 1)
    pos = s[1:]
    return {"position_term_at_recency": {str(r): round(float(s[r]), 3) for r in RECENCIES if r <= serving.max_len},
            "position_term_argmax_recency": int(np.argmax(pos)) + 1,
            "position_term_range": round(float(pos.max() - pos.min()), 3),
            "semantic_range_mean": round(float(np.mean(sem_range)), 3),
            "semantic_std_mean": round(float(np.mean(sem_std)), 3),
            "reference_topk_recency_median": float(np.median(np.concatenate(top_rec)))}


def run(serving, histories, cands, block: int, k: int) -> dict:
    from kernels.topk_attention.reference import segment_scale, topk_reference
    from recsys.models.dare import position_rows
    from retrieval.block_search import PositionBound, pruned_topk

    model = serving.model
    (att, prefix), _ = model.role_tables()
    pt = att.weights()[f"{prefix}_pos"]
    d = pt.shape[1]
    segs = list(model.segments)
    rows = position_rows(torch.arange(serving.max_len + 1), model.config)
    pos = PositionBound(pt[0] * segment_scale(3 * d, segs)[2 * d:], pt, block, rows)
    fr, least, exact = [], [], True
    for (item, cate), (ci, cc) in zip(histories, cands):
        keys, q = keys_and_query(serving, item, cate, ci, cc)
        _, i, n = pruned_topk(q, keys, k, segs, block, pos, 2 * d)
        _, ri = topk_reference(q, keys, len(item), k, segs)
        exact &= bool(torch.equal(i, ri))
        L = len(item)
        nb = -(-L // block)
        fr.append((n + min(1, nb)) / nb)      # blocks scored past the seed, plus the seed block
        # A perfect bound still reads every block holding some candidate's top-k event outside the seed
        # (the newest min(block, L) events; reference column j is abs index L - 1 - j).
        past = ri[ri >= min(block, L)].numpy()
        least.append((len(np.unique((L - 1 - past) // block)) + min(1, nb)) / nb)
    return {"block": block, "blocks_read_fraction_mean": round(float(np.mean(fr)), 3),
            "blocks_read_fraction_median": round(float(np.median(fr)), 3),
            "blocks_read_fraction_min": round(float(np.min(fr)), 3),
            "blocks_holding_topk_fraction_mean": round(float(np.mean(least)), 3), "equals_reference": exact}


def key_groups(sem: np.ndarray, block: int) -> np.ndarray:
    """Semantic keys [L, D] -> a permutation of 0..L-1 whose consecutive runs of `block` are the groups
    (every group full but the last). Recursive balanced bisection: the split direction is that of a
    2-means on the part (farthest-point start, a few Lloyd rounds: it follows cluster gaps where the
    principal axis may cut through a cluster), the cut is at a rank along it, so the left part holds a
    multiple of `block` events (half the part's groups) and only the last leaf can be short. Balanced
    rather than plain k-means: groups as many as the time layout's blocks, of the same size, so the
    fractions read compare like for like; deterministic (argmax and stable sort, no random start)."""
    out: list[np.ndarray] = []
    stack = [np.arange(len(sem))]
    while stack:
        idx = stack.pop()
        if len(idx) <= block:
            out.append(idx)
            continue
        x = sem[idx]
        c1 = x[np.argmax(((x - x.mean(0)) ** 2).sum(1))]
        c2 = x[np.argmax(((x - c1) ** 2).sum(1))]
        for _ in range(5):
            near1 = ((x - c1) ** 2).sum(1) <= ((x - c2) ** 2).sum(1)
            if near1.all() or not near1.any():
                break
            c1, c2 = x[near1].mean(0), x[~near1].mean(0)
        order = idx[np.argsort(x @ (c1 - c2), kind="stable")]
        nl = -(-len(idx) // block) // 2 * block
        stack += [order[nl:], order[:nl]]                  # left popped first: leaves come out left to right
    return np.concatenate(out)


def run_key(serving, histories, cands, block: int, k: int) -> dict:
    """The key layout: each window's events grouped by `key_groups` over their semantic keys, each group
    summarised as a time block is (retrieval.block_search.summaries: box and ball), its position part the
    maximum of the position term over its members' recencies in this window (exact for this snapshot;
    "window_position_bound" figures use the maximum over the whole window instead, what a layout must use
    when appends shift every recency). Search: seed = each candidate's highest-bound group (union over
    candidates), scored exactly for each candidate's k-th score; then every group whose bound + margin
    reaches some candidate's k-th is read; one top-k over the seed and those groups in column order.
    Per (candidate, group) pair: needed = the group's true best score reaches the candidate's reference
    k-th, admitted = its bound + margin does; "admitted at reference k-th": the seed and the groups some
    candidate admits, i.e. what the bound would read if the seed already gave every candidate its final
    k-th (a best-first search per candidate, group after group, reads that much in many round trips);
    the same pairs for the time blocks on the same requests."""
    from kernels.topk_attention.reference import segment_scale, scaled_scores, topk_reference
    from recsys.models.dare import position_rows
    from retrieval.block_search import MARGIN, PositionBound, kth_scores, summaries, topk_over

    model = serving.model
    (att, prefix), _ = model.role_tables()
    pt = att.weights()[f"{prefix}_pos"]
    d = pt.shape[1]
    D = 2 * d
    segs = list(model.segments)
    rows = position_rows(torch.arange(serving.max_len + 1), model.config)
    pos = PositionBound(pt[0] * segment_scale(3 * d, segs)[2 * d:], pt, 1, rows)
    s_rec = pos.window_max                                               # float64 position term per recency
    acc: dict[str, list[float]] = {n: [] for n in ("groups", "events", "seed", "least", "least_events", "need",
                                                   "admit", "admit_window", "slack", "oracle", "time_need", "time_admit",
                                                   "time_oracle")}
    exact = True
    for (item, cate), (ci, cc) in zip(histories, cands):
        keys, q = keys_and_query(serving, item, cate, ci, cc)
        L, C = len(item), len(ci)
        qs = q.float() * segment_scale(q.shape[1], segs)
        s = scaled_scores(q, keys, segs)                                 # [C, L] reference order
        _, ri = topk_reference(q, keys, L, k, segs)
        ref_kth = torch.topk(s, min(k, L), dim=1).values[:, -1].double()
        sem = keys[:, :D].double().numpy()
        qd = qs[:, :D].double()
        p_window = float(s_rec[1:L + 1].max())

        def bounds(order: np.ndarray):
            """Groups = consecutive runs of `order` (reference columns) -> sem bound [ng, C] float64,
            members' position max [ng], margin [C], true best score [ng, C], group of each column [L]."""
            _, e = summaries(keys[torch.from_numpy(order), :D], 0, block)
            e = torch.from_numpy(e.astype(np.float64))
            box = e[:, D:2 * D] @ qd.clamp(min=0).T + e[:, :D] @ qd.clamp(max=0).T
            ball = e[:, 2 * D:3 * D] @ qd.T + e[:, 3 * D:] * qd.norm(dim=1)[None, :]
            ng = len(e)
            group = np.empty(L, np.int64)
            group[order] = np.arange(L) // block
            p = np.full(ng, -np.inf)
            np.maximum.at(p, group, s_rec[np.arange(L) + 1])
            kabs = float(e[:, :D].abs().max())
            margin = MARGIN * (qd.abs().sum(1) * kabs + pos.abs_sum + float(np.abs(p).max())) + 1e-30
            true = torch.full((ng, C), float("-inf"), dtype=torch.float64)
            true = true.scatter_reduce(0, torch.from_numpy(group)[:, None].expand(-1, C), s.T.double(), "amax")
            return torch.minimum(box, ball), torch.from_numpy(p), margin, true, group

        sem_b, p, margin, true, group = bounds(key_groups(sem, block))
        upper = sem_b + p[:, None]
        ng = len(upper)
        seed = np.zeros(ng, bool)
        seed[upper.argmax(0).numpy()] = True
        seed_cols = np.flatnonzero(seed[group])
        s_seed, _ = topk_over(q, keys[torch.from_numpy(seed_cols)], seed_cols, k, segs)
        kth = kth_scores(s_seed, k)
        read = seed | (upper + margin[None, :] >= kth[None, :]).any(1).numpy()
        cols = np.flatnonzero(read[group])
        _, i = topk_over(q, keys[torch.from_numpy(cols)], cols, k, segs)
        exact &= bool(torch.equal(i, ri))
        holding = seed.copy()
        holding[group[ri[ri >= 0].numpy()]] = True
        acc["groups"].append(read.mean())
        acc["events"].append(len(cols) / L)
        acc["seed"].append(seed.mean())
        acc["least"].append(holding.mean())
        acc["least_events"].append(holding[group].mean())
        acc["need"].append(float((true >= ref_kth[None]).double().mean()))
        acc["admit"].append(float((upper + margin[None] >= ref_kth[None]).double().mean()))
        acc["admit_window"].append(float((sem_b + p_window + margin[None] >= ref_kth[None]).double().mean()))
        acc["oracle"].append((seed | (upper + margin[None] >= ref_kth[None]).any(1).numpy()).mean())
        acc["slack"].append(float(((upper - ref_kth[None]) / s.std(1).double()[None]).median()))
        t_sem, t_p, t_margin, t_true, _ = bounds(np.arange(L)[::-1].copy())  # abs order: the time blocks
        acc["time_need"].append(float((t_true >= ref_kth[None]).double().mean()))
        t_admit = t_sem + t_p[:, None] + t_margin[None] >= ref_kth[None]
        acc["time_admit"].append(float(t_admit.double().mean()))
        acc["time_oracle"].append(float(t_admit.any(1).double().mean()))
    m = {n: round(float(np.mean(v)), 3) for n, v in acc.items()}
    return {"layout": "key", "block": block, "groups_read_fraction_mean": m["groups"],
            "groups_read_fraction_median": round(float(np.median(acc["groups"])), 3),
            "groups_read_fraction_min": round(float(np.min(acc["groups"])), 3),
            "events_read_fraction_mean": m["events"], "seed_groups_fraction_mean": m["seed"],
            "groups_admitted_at_reference_kth_fraction_mean": m["oracle"],
            "groups_holding_topk_fraction_mean": m["least"], "events_in_groups_holding_topk_fraction_mean":
            m["least_events"], "pairs_needed_share": m["need"], "pairs_admitted_share": m["admit"],
            "pairs_admitted_share_window_position_bound": m["admit_window"],
            "bound_minus_reference_kth_median_in_score_std": m["slack"],
            "time_blocks_same_requests": {"pairs_needed_share": m["time_need"], "pairs_admitted_share": m["time_admit"],
                                          "blocks_admitted_at_reference_kth_fraction_mean": m["time_oracle"]},
            "equals_reference": exact}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--data", required=True, help="dataset folder (events.parquet)")
    ap.add_argument("--users", type=int, default=20, help="the longest histories")
    ap.add_argument("--candidates", nargs="+", default=["200"], help="per run: C random catalogue items, or "
                    "'own': the user's own last 20 events held out as candidates")
    ap.add_argument("--blocks", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--layout", nargs="+", choices=["time", "key"], default=["time"], help="time: the block "
                    "index's time-ordered blocks; key: each window's events grouped by semantic key (run_key)")
    ap.add_argument("--note", default="", help="where the bundle came from (recorded in the JSON)")
    add_out_arg(ap, "block_index_pruning")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from recsys.config.model import ModelConfig
    from recsys.data.sequences import load_dataset
    from recsys.models import build_model
    from service.model_state import ServingModel

    trained = ServingModel.from_bundle(args.bundle)
    cfg: ModelConfig = trained.model.config
    torch.manual_seed(0)
    untrained = ServingModel(build_model(cfg, trained.n_items, trained.n_cates), "untrained", trained.n_items,
                             trained.n_cates, trained.max_len)
    store = load_dataset(Path(args.data), splits=()).store
    users = np.argsort(-store.lengths, kind="stable")[:args.users]
    rng = np.random.default_rng(0)
    profiles, results, lengths = {}, [], {}
    for mode in args.candidates:
        real, cands = [], []
        for u in users:
            item, cate, _ = store.user_events(int(u))
            hold = 20 if mode == "own" else 0
            item, cate = item[: len(item) - hold][-trained.max_len:], cate[: len(cate) - hold][-trained.max_len:]
            real.append((item, cate))
            if mode == "own":
                ci, cc = store.user_events(int(u))[0][-20:], store.user_events(int(u))[1][-20:]
            else:
                pick = rng.integers(0, len(store.item), int(mode))   # items as often as they occur
                ci, cc = store.item[pick], store.cate[pick]
            cands.append((trained.map_ids(ci, "item")[0], trained.map_ids(cc, "cate")[0]))
        lengths[mode] = [len(i) for i, _ in real]
        shuffled = [(rng.integers(1, trained.n_items, len(i)), rng.integers(1, trained.n_cates, len(i)))
                    for i, _ in real]
        profiles[mode] = {name: position_profile(serving, real, cands, cfg.top_k)
                          for name, serving in (("trained", trained), ("untrained", untrained))}
        print(profiles[mode], file=sys.stderr)
        for block in args.blocks:
            for name, serving, hist in (("trained, real histories", trained, real),
                                        ("trained, random histories", trained, shuffled),
                                        ("untrained, real histories", untrained, real)):
                for layout in args.layout:
                    fn = run if layout == "time" else run_key
                    r = {"candidates": mode, "model_and_histories": name, **fn(serving, hist, cands, block, cfg.top_k)}
                    results.append(r)
                    print(r, file=sys.stderr)
    emit({"benchmark": "block_index_pruning",
          "inputs": {"bundle": args.bundle, "data": args.data, "users": args.users, "candidates": args.candidates,
                     "history_lengths": lengths, "top_k": cfg.top_k, "max_len": trained.max_len,
                     "pos_exact": cfg.pos_exact, "pos_buckets_per_octave": cfg.pos_buckets_per_octave,
                     "seed": "the newest block", "bundle_note": args.note,
                     **({"layouts": args.layout, "key_seed": "each candidate's highest-bound group"}
                        if args.layout != ["time"] else {})},
          "position_profile_real_histories": profiles, "results": results}, args.out)

if __name__ == "__main__":
    main()
