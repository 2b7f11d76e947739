"""One short training run on the demo's synthetic data with overrides; appends one JSON line of validation
diagnostics (AUC, the Bayes ceiling, recall@k / hit@k of the evidence, the share of evidence within L, and
how stage 2 weighs the retrieved evidence against the other retrieved events). The runs behind
docs/models.md "Synthetic data: why the search missed the evidence" and the demo's seed spread.

    .venv/bin/python benchmarks/synthetic_run.py --model dare --data '{"family_size": 1}' \\
        --m '{"init_std": 0.1}' --t '{"embedding_lr": 0.1, "seed": 2}' --out results/demo_seeds.jsonl

--data overrides the demo's SyntheticConfig (200 users, ~500 events each, 20k items, 100 categories,
window 200, seed 0); --m / --t override the model preset and the demo's training settings (L = 300,
batch 512, 2 epochs, validation every 10 steps). Single process, one thread by default; the validation split
only (nothing here looks at test).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _machine import machine  # noqa: E402

DATA = {"n_users": 200, "events_per_user": {"mean": 500.0, "min": 50, "max": 5000}, "n_items": 20000, "n_cates": 100,
        "window": 200, "seed": 0}
MODEL = {"max_len": 300}
TRAIN = {"batch_size": 512, "epochs": 2.0, "eval_every": 10, "progress": False}


def stage2_weights(model, ds, max_len: int, n: int = 2000) -> dict:
    """On val rows with evidence: median (mean weight on retrieved evidence / mean weight on the other
    retrieved events), and the median largest weight (uniform = 1/k)."""
    import torch

    from recsys.data.sequences import assemble

    s = ds.splits["val"]
    rows = np.flatnonzero(np.array([len(e) > 0 for e in s.evidence]))[:n]
    b = assemble(ds.store, s, rows, max_len, trim=False)
    with torch.no_grad():
        w = model.attention_weights(b).numpy()
        idx = model(b).indices.numpy()
    ratio = []
    for i, r in enumerate(rows):
        ev = set(s.evidence[r].tolist())
        on = np.array([j >= 0 and int(s.pos[r] - 1 - j) in ev for j in idx[i]])
        other = ~on & (idx[i] >= 0)
        if on.any() and other.any():
            ratio.append(w[i][on].mean() / w[i][other].mean())
    return {"weight_ratio_evidence_vs_other": round(float(np.median(ratio)), 3) if ratio else None,
            "max_weight_median": round(float(np.median(w.max(axis=1))), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dare")
    ap.add_argument("--data", default="{}", help="JSON overrides of the synthetic data config")
    ap.add_argument("--m", default="{}", help="JSON overrides of the model config")
    ap.add_argument("--t", default="{}", help="JSON overrides of the training config")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "recsys-synthetic-runs")
    ap.add_argument("--out", type=Path, default=None, help="append the JSON line here")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    from recsys.checkpoint import load_state_tensors
    from recsys.config.data import SyntheticConfig
    from recsys.config.experiment import load_experiment
    from recsys.config.presets import preset_path
    from recsys.data.sequences import load_dataset
    from recsys.data.synthetic import generate
    from recsys.models import build_model
    from recsys.train.trainer import train
    from safetensors.torch import load_file

    d = DATA | json.loads(a.data)
    cfg = SyntheticConfig.model_validate(d)
    folder = a.cache / hashlib.sha1(json.dumps(cfg.model_dump(), sort_keys=True).encode()).hexdigest()[:12]
    if not (folder / "meta.json").is_file():
        generate(cfg, folder)
    ds = load_dataset(folder)
    over = {"data": str(folder), "model": MODEL | json.loads(a.m), "train": TRAIN | {"threads": a.threads} | json.loads(a.t)}
    exp = load_experiment(preset_path(a.model), over)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as run:
        r = train(exp, run, dataset=ds, evaluate_test=False)
        model = build_model(exp.model, ds.n_items, ds.n_cates)
        load_state_tensors(model, load_file(Path(run) / "best" / "model.safetensors"))
    model.eval()
    out = {"model": a.model, "data": json.loads(a.data), "model_overrides": json.loads(a.m), "train_overrides": json.loads(a.t),
           "val": {k: round(v, 4) for k, v in r.best_val.items() if isinstance(v, float)},
           "steps": r.steps, "best_step": r.best_step, "wall_s": round(time.perf_counter() - t0, 1)}
    if hasattr(model, "attention_weights"):
        out |= stage2_weights(model, ds, exp.model.max_len)
    m = machine()
    out["machine"] = {k: m[k] for k in ("cpu", "cores", "torch_threads", "commit", "dirty", "load_avg_at_end")}
    line = json.dumps(out)
    print(line, flush=True)
    if a.out:
        with open(a.out, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
