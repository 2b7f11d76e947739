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

    .venv/bin/python benchmarks/block_index_pruning.py --bundle runs/dare/bundle --data benchmarks/ml-latest-small \
        [--users 20] [--candidates 200 own] [--blocks 64 256] [--out results/block_index_pruning.json]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--data", required=True, help="dataset folder (events.parquet)")
    ap.add_argument("--users", type=int, default=20, help="the longest histories")
    ap.add_argument("--candidates", nargs="+", default=["200"], help="per run: C random catalogue items, or "
                    "'own': the user's own last 20 events held out as candidates")
    ap.add_argument("--blocks", type=int, nargs="+", default=[64, 256])
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
                r = {"candidates": mode, "model_and_histories": name, **run(serving, hist, cands, block, cfg.top_k)}
                results.append(r)
                print(r, file=sys.stderr)
    emit({"benchmark": "block_index_pruning",
          "inputs": {"bundle": args.bundle, "data": args.data, "users": args.users, "candidates": args.candidates,
                     "history_lengths": lengths, "top_k": cfg.top_k, "max_len": trained.max_len,
                     "pos_exact": cfg.pos_exact, "pos_buckets_per_octave": cfg.pos_buckets_per_octave,
                     "seed": "the newest block", "bundle_note": args.note},
          "position_profile_real_histories": profiles, "results": results}, args.out)

if __name__ == "__main__":
    main()
