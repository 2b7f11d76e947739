"""Offline accuracy on the fixed benchmark: DIN, TWIN and DARE, several seeds, next to the original DARE code.

Each (model, seed) trains in its own subprocess (clean peak memory) from the <model> preset with
--max-len / --epochs / --seed overrides, selects its checkpoint on validation AUC only, and scores
every test row in eval mode. Writes <out>/results.json and <out>/results.md after every run (partial
results survive an interrupted sweep) and prints one JSON object at the end. A (model, seed) whose
summary.json already exists under --out is read, not retrained (--fresh retrains): an interrupted sweep
resumes, and sweeps split over several processes are joined by one last call with every model and seed.

    .venv/bin/python benchmarks/offline_accuracy.py --models dare,twin --seeds 1,2,3 --out results/acc-L200
    .venv/bin/python benchmarks/offline_accuracy.py --max-len full ...   # L = the longest history
    .venv/bin/python benchmarks/offline_accuracy.py --quick              # seconds: 60 users, tiny run
    .venv/bin/python benchmarks/offline_accuracy.py --models dare,dare+aaren,dare+titans,dare+aaren+titans --max-len full
                                    # the Aaren / Titans ablation: `+branch` switches a branch on
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_model, machine  # noqa: E402

# ../shared/benchmarks/README.md: the original thuml/DARE code on ml-latest-small, L = 200, seeds 1-3.
ORIGINAL = {
    "dare": {"val_auc": (0.8108, 0.0026), "test_auc": (0.7952, 0.0014), "test_gauc": (0.7847, 0.0013),
             "test_logloss": (0.556, 0.015), "train_samples_per_s": 3330, "wall_s": 211},
    "twin": {"val_auc": (0.8119, 0.0017), "test_auc": (0.7948, 0.0034), "test_gauc": (0.7835, 0.0038),
             "test_logloss": (0.534, 0.005), "train_samples_per_s": 3470, "wall_s": 198},
}


BRANCHES = ("aaren", "titans")


def parse_model(spec: str) -> tuple[str, dict[str, bool]]:
    """'dare+aaren+titans' -> ('dare', {'aaren': True, 'titans': True})."""
    name, *flags = spec.split("+")
    bad = [f for f in flags if f not in BRANCHES]
    if bad or name not in ("dare", "twin", "din") or (flags and name == "din"):
        raise SystemExit(f"--models: {spec!r}: expected din, twin or dare, DARE/TWIN optionally +aaren / +titans")
    return name, {f: True for f in flags}


def run_one(model: str, seed: int, max_len: str, epochs: float | None, out: Path, quick: bool, threads: int) -> dict:
    import torch

    from recsys.config.experiment import load_experiment
    from recsys.config.presets import preset_path
    from recsys.data.sequences import load_dataset, max_history
    from recsys.train.trainer import train, user_subset

    torch.set_num_threads(threads)
    name, flags = parse_model(model)
    base = load_experiment(preset_path("tiny" if quick else name))
    ds = load_dataset(base.data_path())
    L = max_history(ds.store) if max_len == "full" else int(max_len)
    over: dict = {"model": {"name": name, "max_len": L} | flags, "train": {"seed": seed, "progress": False, "threads": threads}}
    if name == "din":
        over["model"]["aux_loss"] = False
    if epochs is not None:
        over["train"]["epochs"] = float(epochs)
    if quick:
        ds = user_subset(ds, 60)
        over["model"]["max_len"] = min(L, 20)
    cfg = load_experiment(base, over)
    res = train(cfg, out, dataset=ds)
    return res.to_json() | {"model": model, "seed": seed, "max_len": cfg.model.max_len, "epochs": cfg.train.epochs}


def _mean_std(xs: list[float]) -> list[float]:
    return [statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0]


def summarise(runs: list[dict]) -> dict:
    out: dict = {}
    for m in sorted({r["model"] for r in runs}):
        rs = [r for r in runs if r["model"] == m]
        out[m] = {
            "seeds": [r["seed"] for r in rs],
            "val_auc": _mean_std([r["best_val"]["auc"] for r in rs]),
            "test_auc": _mean_std([r["test"]["auc"] for r in rs]),
            "test_gauc": _mean_std([r["test"]["gauc"] for r in rs]),
            "test_logloss": _mean_std([r["test"]["logloss"] for r in rs]),
            "test_cate_auc": _mean_std([r["test"]["cate_auc"] for r in rs]),
            "train_samples_per_s": statistics.median(r["train_samples_per_s"] for r in rs),
            "wall_s": statistics.median(r["wall_s"] for r in rs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
            "best_step": [r["best_step"] for r in rs],
            "steps": [r["steps"] for r in rs],
        }
    return out


def paired(runs: list[dict]) -> dict:
    """Each branch model against its base model (dare+aaren -> dare) on the SAME seeds: seed-to-seed spread
    is larger than the branch effects, so the per-seed difference is the fair comparison."""
    by = {(r["model"], r["seed"]): r for r in runs}
    out: dict = {}
    for m in sorted({r["model"] for r in runs if "+" in r["model"]}):
        base = m.split("+")[0]
        seeds = sorted(s for (mm, s) in by if mm == m and (base, s) in by)
        if not seeds:
            continue
        diff = {key: [pick(by[(m, s)]) - pick(by[(base, s)]) for s in seeds] for key, pick in (
            ("test_auc", lambda r: r["test"]["auc"]), ("test_gauc", lambda r: r["test"]["gauc"]),
            ("test_logloss", lambda r: r["test"]["logloss"]), ("val_auc", lambda r: r["best_val"]["auc"]))}
        out[m] = {"base": base, "seeds": seeds} | {k: _mean_std(v) + [v] for k, v in diff.items()}
    return out


def markdown(summary: dict, max_len: int | str, epochs, pairs: dict | None = None) -> str:
    f = lambda ms, n=4: f"{ms[0]:.{n}f} +- {ms[1]:.{n}f}"  # noqa: E731
    lines = [
        f"L = {max_len}, top-k 20, 16 dims per field, batch 2048, up to {epochs} epochs, best val AUC checkpoint; "
        "mean +- std (sample) over seeds; every row scored in eval mode.",
        "",
        "| model | seeds | val AUC | test AUC | test GAUC | test logloss | train samples/s | wall per run | peak RSS |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m, s in summary.items():
        lines.append(
            f"| {m.upper()} (ours) | {','.join(map(str, s['seeds']))} | {f(s['val_auc'])} | {f(s['test_auc'])} | {f(s['test_gauc'])} "
            f"| {f(s['test_logloss'], 3)} | {s['train_samples_per_s']:,.0f} | {s['wall_s']:.0f} s | {s['peak_rss_mb'] / 1024:.2f} GB |"
        )
    for m, o in ORIGINAL.items():
        lines.append(
            f"| {m.upper()} (original code, L = 200) | 1,2,3 | {f(o['val_auc'])} | {f(o['test_auc'])} | {f(o['test_gauc'])} "
            f"| {f(o['test_logloss'], 3)} | ~{o['train_samples_per_s']:,} | {o['wall_s']} s | 2.9 GB |"
        )
    if pairs:
        lines += ["", "Paired with the base model on the same seeds (branch minus base; mean +- std, then per seed):", "",
                  "| model | base | seeds | test AUC | test GAUC | test logloss | val AUC |", "|---|---|---|---|---|---|---|"]
        g = lambda d, n=4: f"{d[0]:+.{n}f} +- {d[1]:.{n}f} ({', '.join(f'{x:+.{n}f}' for x in d[2])})"  # noqa: E731
        for m, p in pairs.items():
            lines.append(f"| {m.upper()} | {p['base'].upper()} | {','.join(map(str, p['seeds']))} | {g(p['test_auc'])} "
                         f"| {g(p['test_gauc'])} | {g(p['test_logloss'], 3)} | {g(p['val_auc'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="din,twin,dare")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--max-len", default="200", help="history length L, or 'full' for the longest history")
    p.add_argument("--epochs", type=float, default=None, help="override the presets' epochs")
    p.add_argument("--out", default=str(REPO / "results" / "offline_accuracy"))
    p.add_argument("--quick", action="store_true", help="60 users, the tiny preset: a seconds-long smoke run")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fresh", action="store_true", help="retrain runs whose summary.json already exists under --out")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: summarise the runs already under --out, listing the missing ones")
    p.add_argument("--one", nargs=2, metavar=("MODEL", "SEED"), help=argparse.SUPPRESS)
    a = p.parse_args()
    out = Path(a.out)

    if a.one:
        model, seed = a.one[0], int(a.one[1])
        run_dir = out / "runs" / f"{model}-L{a.max_len}-s{seed}"
        res = run_one(model, seed, a.max_len, a.epochs, run_dir, a.quick, a.threads)
        res |= {"threads": a.threads, "cpu": cpu_model()}  # a sweep may join runs made elsewhere: each says where
        (run_dir / "summary.json").write_text(json.dumps(res, indent=2))
        return

    models, seeds = a.models.split(","), [int(s) for s in a.seeds.split(",")]
    for m in models:
        parse_model(m)
    out.mkdir(parents=True, exist_ok=True)
    runs, missing, t0 = [], [], time.time()

    def write() -> dict:  # after every run, so an interrupted sweep leaves its partial results
        summary = summarise(runs)
        result = {
            "benchmark": "offline_accuracy",
            "inputs": {"models": models, "seeds": seeds, "max_len": a.max_len, "epochs": a.epochs, "quick": a.quick, "threads": a.threads},
            "machine": machine(),
            "run_threads": sorted({r.get("threads", "not recorded") for r in runs}, key=str),
            "summary": summary,
            "original": ORIGINAL,
            "ratio_test_auc_vs_original": {m: s["test_auc"][0] / ORIGINAL[m]["test_auc"][0] for m, s in summary.items() if m in ORIGINAL},
            "ratio_samples_per_s_vs_original": {m: s["train_samples_per_s"] / ORIGINAL[m]["train_samples_per_s"] for m, s in summary.items() if m in ORIGINAL},
            "paired_with_base": paired(runs),
            "runs": runs,
            "missing": missing,
            "wall_s": time.time() - t0,
        }
        (out / "results.json").write_text(json.dumps(result, indent=2))
        (out / "results.md").write_text(markdown(summary, a.max_len, a.epochs or "preset", result["paired_with_base"]))
        return result

    for seed in seeds:
        for model in models:
            done = out / "runs" / f"{model}-L{a.max_len}-s{seed}" / "summary.json"
            if a.report_only and not done.exists():
                missing.append(f"{model} seed {seed}")
                continue
            if a.fresh or not done.exists():  # an interrupted or split sweep resumes where it stopped
                cmd = [sys.executable, __file__, "--one", model, str(seed), "--max-len", a.max_len, "--out", str(out), "--threads", str(a.threads)]
                cmd += (["--epochs", str(a.epochs)] if a.epochs is not None else []) + (["--quick"] if a.quick else [])
                subprocess.run(cmd, check=True, env=os.environ | {"PYTHONUNBUFFERED": "1"})
            runs.append(json.loads(done.read_text()))
            write()
    result = write()
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}))

if __name__ == "__main__":
    main()
