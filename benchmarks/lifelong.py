"""Synthetic lifelong benchmark: does searching far back find the evidence, and how far below the Bayes
ceiling does each model sit, per evidence distance?

Data: the seeded synthetic generator (recsys.data.synthetic) with label noise, so the ceiling is below 1:
`p_label` = P(label | full history, target) is the Bayes-optimal score and its AUC the ceiling. For half of
the positives the family's most recent occurrence lies more than `window` events back. Models: DARE, TWIN,
DIN and DARE + Titans memory (`dare+titans`: model flag titans), each trained by the single-process
trainer (checkpoint selected on validation AUC only) at every history length L of --lengths, scored on the
test split. Per evidence distance (events between the target and its family's most recent occurrence,
bucketed; negatives travel with their target) it reports AUC, the ceiling AUC and the gap, the search's
recall@k / hit@k of the evidence within the searched window (metrics.evidence_recall) and the share of
targets whose evidence lies within L at all. The first bucket (evidence recent) is the control where
every model should be close to the ceiling.

    .venv/bin/python benchmarks/lifelong.py --quick                       # minutes: small data, L 100 / 1000
    .venv/bin/python benchmarks/lifelong.py --out results/lifelong.json   # 10k-100k events per user, L up to 10k
    .venv/bin/python benchmarks/lifelong.py --models dare --lengths 10000 --pos-exact 100 \
        --data-dir /tmp/lifelong-data --bundles /tmp/lifelong-bundles   # keep data and the trained bundles

`--bundles DIR` keeps each run's exported bundle (the best validation checkpoint) as DIR/<model>-L<L>-s<seed>,
e.g. for benchmarks/block_index_pruning.py; `--pos-exact E` gives every model log-distance position buckets
beyond recency E (ModelConfig.pos_exact; default: one position row per recency up to L).

Prints one JSON object (inputs, machine, per model and L: overall and per-distance figures).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _machine import add_out_arg, emit  # noqa: E402

# Evidence distance buckets (events back from the target to the most recent evidence), upper bounds.
BUCKETS = (200, 1_000, 10_000, 10**9)

FULL = {
    "data": {"n_users": 50, "events_per_user": {"mean": 12_000.0, "sigma": 0.5, "min": 10_000, "max": 100_000},
             "n_items": 100_000, "n_cates": 200, "family_size": 1, "window": 1_000, "far_fraction": 0.5,
             "target_rate": 0.006, "label_noise": 0.1, "chunk_events": 2_000_000, "seed": 0},
    "lengths": [200, 2_000, 10_000],
    "din_max_len": 2_000,   # DIN's MLP attention over every event: beyond this it is hours on a CPU
    # Titans runs each batch's users over their whole timelines (~12k events each): hours here on a CPU
    "models": "dare,twin,din",
    "train": {"batch_size": 512, "epochs": 4.0, "eval_every": 10, "embedding_lr": 0.1},
}
QUICK = {
    "data": {"n_users": 100, "events_per_user": {"mean": 2_000.0, "sigma": 0.6, "min": 1_000, "max": 8_000},
             "n_items": 40_000, "n_cates": 100, "family_size": 1, "window": 200, "far_fraction": 0.5,
             "target_rate": 0.02, "label_noise": 0.1, "seed": 0},
    "lengths": [100, 1_000],
    "din_max_len": 1_000,
    "models": "dare,twin,din,dare+titans",
    "train": {"batch_size": 512, "epochs": 4.0, "eval_every": 10, "embedding_lr": 0.1},
}
# With the presets' N(0, 0.01) init and embedding lr 0.01 the attention logits stay ~1e-3 over a few hundred
# steps and stage 2 weighs its k events uniformly (docs/models.md); both 0.1 here, for every model alike.
MODEL_DEFAULTS = {"init_std": 0.1}


def bucket_of(distance: np.ndarray) -> np.ndarray:
    return np.searchsorted(np.asarray(BUCKETS), distance, side="left")


def bucket_names() -> list[str]:
    lo = (0,) + BUCKETS[:-1]
    return [f"({a}, {b}]" if b < 10**9 else f"> {a}" for a, b in zip(lo, BUCKETS)]


def target_distance(samples) -> np.ndarray:
    """Per row: the distance from its target to the most recent evidence of the target's rule-positive row
    (the same for the target's negatives; -1 where the target has no evidence, which the generator never
    writes)."""
    key = samples.user.astype(np.int64) * (int(samples.pos.max()) + 1) + samples.pos  # loaded ids are int32
    last = np.array([e[-1] if len(e) else -1 for e in samples.evidence])
    d_row = np.where(last >= 0, samples.pos - last, -1)
    _, inv = np.unique(key, return_inverse=True)
    d_target = np.full(inv.max() + 1, -1)
    np.maximum.at(d_target, inv, d_row)
    return d_target[inv]


def figures(samples, probs, indices, max_len: int) -> dict:
    from recsys.metrics import auc, evidence_recall

    dist = target_distance(samples)
    b = bucket_of(dist)
    out = {}
    for i, name in enumerate(["all"] + bucket_names()):
        rows = np.flatnonzero(dist >= 0) if i == 0 else np.flatnonzero((b == i - 1) & (dist >= 0))
        y = samples.label[rows]
        if len(rows) == 0 or y.min() == y.max():
            continue
        f = {"rows": int(len(rows)), "auc": auc(y, probs[rows]), "ceiling_auc": auc(y, samples.p_label[rows])}
        f["gap"] = f["ceiling_auc"] - f["auc"]
        if indices is not None:
            ev = [samples.evidence[r] for r in rows]
            r = evidence_recall(indices[rows], samples.pos[rows], ev, max_len)
            f |= {"recall": r["recall"], "hit": r["hit"], "evidence_in_L": r["reach"]}
        out[name] = {k: (None if isinstance(v, float) and np.isnan(v) else round(v, 4) if isinstance(v, float) else v)
                     for k, v in f.items()}
    return out


def run_one(name: str, max_len: int, ds, folder: Path, train_over: dict, threads: int, seed: int, work: Path,
            model_defaults: dict, bundles: Path | None) -> dict:
    from recsys.bundle import load_bundle
    from recsys.config.experiment import load_experiment
    from recsys.config.presets import preset_path
    from recsys.train.trainer import predict, train

    base, *flags = name.split("+")
    model = model_defaults | {"max_len": max_len} | {f: True for f in flags}
    cfg = load_experiment(preset_path(base), {"data": str(folder), "model": model,
                                              "train": train_over | {"progress": False, "threads": threads, "seed": seed,
                                                                     "patience": None}})
    t0 = time.perf_counter()
    r = train(cfg, work / f"{name}-L{max_len}-s{seed}", dataset=ds, evaluate_test=False)
    m = load_bundle(r.bundle_dir).model
    pred = predict(m, ds, "test", max_len, cfg.train.eval_batch_size)
    kept = {}
    if bundles is not None:
        dst = bundles / f"{name}-L{max_len}-s{seed}"
        shutil.copytree(r.bundle_dir, dst, dirs_exist_ok=True)
        kept = {"bundle": str(dst)}
    return {"model": name, "max_len": max_len, "seed": seed, "steps": r.steps, "best_step": r.best_step,
            "best_val_auc": round(r.best_val["auc"], 4), "train_wall_s": round(time.perf_counter() - t0, 1),
            **kept, "test": figures(ds.splits["test"], pred.probs, pred.indices, max_len)}


def markdown(result: dict) -> str:
    """The README table of a result JSON: per model and L, AUC (gap to the ceiling) and hit@k per evidence
    distance."""
    names = ["all"] + bucket_names()
    ceil = {}
    for r in result["results"]:
        for b in names:
            if b in r.get("test", {}):
                ceil.setdefault(b, r["test"][b]["ceiling_auc"])
    head = ["model", "L"] + [f"{b}: AUC (gap) / hit" for b in names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
             "| Bayes ceiling | | " + " | ".join(f"{ceil[b]:.3f}" if b in ceil else "-" for b in names) + " |"]
    for r in result["results"]:
        if "diverged" in r:
            lines.append(f"| {r['model'].upper()} | {r['max_len']:,} | diverged: {r['diverged']} |")
            continue
        cells = []
        for b in names:
            f = r["test"].get(b)
            if f is None:
                cells.append("-")
                continue
            hit = f" / {f['hit']:.2f}" if f.get("hit") is not None else (" / -" if "hit" in f else "")
            cells.append(f"{f['auc']:.3f} ({f['gap']:+.3f}){hit}")
        lines.append(f"| {r['model'].upper()} | {r['max_len']:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small data and lengths (minutes)")
    ap.add_argument("--models", default=None, help="comma-separated (default: the preset's; dare+titans = DARE with "
                    "the Titans memory)")
    ap.add_argument("--lengths", default=None, help="comma-separated L (default: the preset's)")
    ap.add_argument("--seeds", default="1")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-dir", type=Path, default=None, help="keep the generated data here (reused if present)")
    ap.add_argument("--bundles", type=Path, default=None, help="keep each run's exported bundle here")
    ap.add_argument("--pos-exact", type=int, default=None, help="model.pos_exact for every model (log-distance "
                    "position buckets beyond this recency)")
    ap.add_argument("--table", type=Path, default=None, help="print the markdown table of this result JSON and exit")
    add_out_arg(ap, "lifelong")
    a = ap.parse_args()
    if a.table:
        print(markdown(json.loads(a.table.read_text())))
        return
    import torch

    torch.set_num_threads(a.threads)
    from recsys.config.data import SyntheticConfig
    from recsys.data.sequences import load_dataset
    from recsys.data.synthetic import generate

    preset = QUICK if a.quick else FULL
    lengths = [int(x) for x in a.lengths.split(",")] if a.lengths else preset["lengths"]
    cfg = SyntheticConfig.model_validate(preset["data"])
    model_defaults = MODEL_DEFAULTS | ({"pos_exact": a.pos_exact} if a.pos_exact is not None else {})
    results = []
    with tempfile.TemporaryDirectory(prefix="recsys-lifelong-") as tmp:
        folder = a.data_dir or Path(tmp) / "data"
        meta_path = folder / "meta.json"
        if not (meta_path.is_file() and json.loads(meta_path.read_text())["config"] == cfg.model_dump()):
            generate(cfg, folder)
        meta = json.loads(meta_path.read_text())
        ds = load_dataset(folder)
        for L in lengths:
            for name in (a.models or preset["models"]).split(","):
                if name == "din" and L > preset["din_max_len"]:
                    continue
                for seed in (int(s) for s in a.seeds.split(",")):
                    try:
                        res = run_one(name, L, ds, folder, preset["train"], a.threads, seed, Path(tmp) / "runs",
                                      model_defaults, a.bundles)
                    except ValueError as e:  # a run that diverges (non-finite scores) is a result, not a crash
                        if "not finite" not in str(e):
                            raise
                        res = {"model": name, "max_len": L, "seed": seed, "diverged": str(e)}
                    print(json.dumps(res), file=sys.stderr, flush=True)
                    results.append(res)
                    if a.out:  # what has run so far survives a sweep stopped before its end
                        a.out.write_text(json.dumps({"benchmark": "lifelong", "partial": True, "results": results}, indent=1))
    emit({
        "benchmark": "lifelong",
        "inputs": {"preset": "quick" if a.quick else "full", "data": preset["data"], "lengths": lengths,
                   "models": a.models or preset["models"],
                   "train": preset["train"], "model_defaults": model_defaults, "seeds": a.seeds,
                   "buckets_evidence_distance": bucket_names(), "split_scored": "test (selection on val)"},
        "data": {k: meta[k] for k in ("n_events", "history_length", "rows", "far_positive_share", "ceiling_auc")},
        "results": results,
    }, a.out)


if __name__ == "__main__":
    main()
