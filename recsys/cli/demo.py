"""`recsys demo`: the whole story on embedded defaults, one stage at a time.

data -> Ray Data preprocessing (raw logs) -> Ray Train (DARE, TWIN, DIN; 2 workers) -> comparison table
-> bundle -> service on embedded Redis -> held-out events streamed through /v1/events and the worker ->
live scores checked against offline scores -> latency percentiles -> report -> clean shutdown.

Everything the run produces lands in the run folder (`runs/demo` by default), which `recsys report`
turns into one HTML page. The terminal gets progress bars and one summary line per stage; Ray's own
output (its driver log, the Train controller's and workers' lines) goes to `logs/ray.log` in the run
folder unless `verbose`.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from recsys.cli.progress import console, progress_bar, stage

MODELS = ("dare", "twin", "din")




def data_stage(data: Path | None, out: Path, small: bool) -> Path:
    """Returns the dataset folder the rest of the demo uses."""
    from recsys.data.layout import is_dataset
    from recsys.data.report import describe

    if data is None:
        from recsys.config.data import SyntheticConfig
        from recsys.data.synthetic import generate

        folder = out / "data"
        per_user = {"mean": 150.0, "min": 30, "max": 600} if small else {"mean": 500.0, "min": 50, "max": 5_000}
        # family_size 1: the rule is "this very item occurred before", which a dot product of item embeddings
        # matches from the first step; families of consecutive ids are not learnable from the ~2 training rows
        # each family gets at this size (docs/models.md, "Synthetic data: why the search missed the evidence").
        # label_noise: a ceiling below 1, so the report can say how far each model is from it.
        cfg = SyntheticConfig.model_validate({"n_users": 60 if small else 200, "events_per_user": per_user,
                                              "n_items": 2_000 if small else 20_000, "n_cates": 40 if small else 100,
                                              "family_size": 1, "label_noise": 0.1,
                                              "window": 50 if small else 200, "seed": 0})
        console.print(f"synthetic lifelong data: {cfg.n_users} users, ~{per_user['mean']:.0f} events each")
        with progress_bar("generating events") as update:
            generate(cfg, folder, progress=update)
    elif is_dataset(data):
        folder = data
        console.print(f"dataset folder: {folder}")
    else:
        from pipelines.preprocess import run_preprocess

        folder = out / "data"
        console.print(f"raw log {data}: preprocessing with Ray Data")
        meta = run_preprocess([str(data)], folder, seed=0, lenient=True)
        report = meta.get("load_report", {})
        console.print(f"load report: {json.dumps(report)}")
    stats = describe(folder)
    table = Table("users", "items", "categories", "events", "history mean / max", "train / val / test rows")
    rows = stats["rows"]
    table.add_row(*(f"{stats[k]:,}" for k in ("users", "items", "categories", "events")),
                  f"{stats['history_length']['mean']:.0f} / {stats['history_length']['max']:,}",
                  " / ".join(f"{rows.get(s, 0):,}" for s in ("train", "val", "test")))
    console.print(table)
    (out / "data_stats.json").write_text(json.dumps(stats, indent=2))
    return folder


def train_stage(folder: Path, out: Path, small: bool, workers: int = 2) -> dict[str, dict]:
    """DARE, TWIN and DIN as Ray Train jobs; returns each model's result (bundle, val, test, speed)."""
    from pipelines.train import run_train
    from recsys.config.experiment import load_experiment
    from recsys.config.presets import preset_path

    results = {}
    for name in MODELS:
        # init 0.1 and embedding lr 0.1 (the presets: 0.01, 0.01): at 0.01 the attention logits stay ~1e-3
        # within the demo's ~100 steps, so stage 2 weighs its k events uniformly (docs/models.md)
        overrides = {"data": str(folder.resolve()), "train": {"progress": False, "embedding_lr": 0.1}}
        if small:
            overrides["model"] = {"dim_att": 8, "dim_rep": 8, "top_k": 8, "max_len": 100, "mlp": [32], "init_std": 0.1}
            overrides["train"] |= {"batch_size": 256, "epochs": 1.0, "eval_every": 10, "patience": None}
        else:
            overrides["model"] = {"max_len": 1000, "init_std": 0.1}  # L = 300 left 27% of the evidence out of reach
            overrides["train"] |= {"batch_size": 512, "epochs": 2.0, "eval_every": 10}
        cfg = load_experiment(preset_path(name), overrides)
        console.print(f"[bold]{name}[/bold]: Ray Train, {workers} workers, L = {cfg.model.max_len}, "
                      f"k = {cfg.model.top_k}, {cfg.train.epochs:g} epochs")
        with progress_bar(f"  {name} steps") as update:
            r = run_train(cfg, out / "models" / name, workers=workers, progress=update)
            update(r["steps"], r["steps"])  # an early stop ends the bar at the steps taken
        results[name] = {k: v for k, v in r.items() if k != "history"}
        (out / "models" / name / "history.json").write_text(json.dumps(r.get("history", []), indent=2))
        console.print(f"  best val AUC {r['best_val']['auc']:.4f} at step {r['best_step']}; "
                      f"test AUC {r['test']['auc']:.4f}; {r['samples_per_s']:,.0f} samples/s")
    return results


def comparison_table(results: dict[str, dict]) -> str:
    """The terminal table and its markdown (comparison.md); on synthetic data with the search's recall@k and
    hit@k of the evidence and the Bayes ceiling of the test AUC."""
    search = sorted({k for r in results.values() for k in r["test"] if k.startswith(("recall@", "hit@"))})
    ceiling = next((r["test"]["ceiling_auc"] for r in results.values() if "ceiling_auc" in r["test"]), None)
    head = ["model", "val AUC", "test AUC", "test GAUC", "test logloss", *(f"test {k}" for k in search), "samples/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    table = Table(*head)
    for name, r in results.items():
        v, t = r["best_val"], r["test"]
        cells = [name.upper(), f"{v['auc']:.4f}", f"{t['auc']:.4f}", f"{t['gauc']:.4f}", f"{t['logloss']:.4f}",
                 *(f"{t[k]:.3f}" if k in t else "-" for k in search), f"{r['samples_per_s']:,.0f}"]
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    console.print(table)
    if ceiling is not None:
        console.print(f"Bayes ceiling of the test AUC (the generator's P(label | full history)): {ceiling:.4f}")
        lines.append(f"\nBayes ceiling of the test AUC: {ceiling:.4f}")
    return "\n".join(lines) + "\n"


def run_demo(data: Path | None, out: Path, small: bool, verbose: bool = False) -> dict:
    from pipelines.runtime import ray_log_file

    out.mkdir(parents=True, exist_ok=True)
    log = None if verbose else out / "logs" / "ray.log"
    if log is not None:
        log.unlink(missing_ok=True)  # this run's log only
        console.print(f"Ray's own log lines go to {log} (--verbose shows them here)")
    with ray_log_file(log):
        summary = _run_demo(data, out, small)
    if log is not None:
        summary["ray_log"] = str(log)
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _run_demo(data: Path | None, out: Path, small: bool) -> dict:
    summary: dict = {"small": small, "data_arg": str(data) if data else None}
    with stage("1/5 data"):
        folder = data_stage(data, out, small)
        summary["dataset"] = str(folder)
    with stage("2/5 train DARE, TWIN, DIN (Ray Train)"):
        results = train_stage(folder, out, small)
        summary["models"] = results
    with stage("3/5 evaluate and export"):
        (out / "comparison.md").write_text(comparison_table(results))
        best = results["dare"]["bundle_dir"]
        summary["bundle"] = best
        console.print(f"bundle served next: {best}")
    with stage("4/5 serve, stream and score"):
        from recsys.cli.demo_service import service_stage

        summary["service"] = service_stage(Path(best), folder, out, small)
    with stage("5/5 report"):
        from recsys.cli.report import write_report

        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        summary["report"] = str(write_report(out))
        console.print(f"report: {summary['report']}")
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
