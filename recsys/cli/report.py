"""`recsys report RUN_DIR`: one self-contained HTML page (plots embedded as PNG data, also written as files).

Reads what `recsys demo` leaves in the run folder:
- `summary.json`: per-model results (best val, test metrics incl. recall@k on synthetic data, samples/s);
- `models/<name>/history.json`: the validation log (step, val AUC, loss, ...), for learning curves;
- `service.json`: serving latencies (ms) and, for a sample user, the events the search retrieved for a
  candidate with their attention weights.
A section whose input is missing is left out and listed as such on the page.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _load(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def learning_curves(run: Path, names: list[str]) -> str | None:
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    drawn = False
    for name in names:
        hist = _load(run / "models" / name / "history.json")
        if not hist:
            continue
        steps = [h["step"] for h in hist]
        auc = [h.get("val_auc", h.get("auc")) for h in hist]
        ax.plot(steps, auc, marker="o", ms=3, label=name.upper())
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set(xlabel="training step", ylabel="validation AUC", title="Learning curves")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, run / "learning_curves.png")


def recall_plot(run: Path, models: dict) -> str | None:
    pts = {n: (k, v) for n, r in models.items() for k, v in (r.get("test") or {}).items() if k.startswith("recall@")}
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.2))
    names = list(pts)
    ax.bar([n.upper() for n in names], [pts[n][1] for n in names], color="#4c72b0")
    ax.set(ylabel=f"test {pts[names[0]][0]}", ylim=(0, 1), title="Search stage: recall of the true evidence")
    for i, n in enumerate(names):
        ax.text(i, pts[n][1] + 0.02, f"{pts[n][1]:.3f}", ha="center")
    return _save(fig, run / "recall.png")


def latency_plot(run: Path, service: dict) -> str | None:
    lat = service.get("latency_ms") if service else None
    if not lat:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.hist(lat, bins=40, color="#55a868")
    p = service.get("latency_percentiles_ms", {})
    for q, style in (("p50", "--"), ("p99", ":")):
        if q in p:
            ax.axvline(p[q], color="k", ls=style, label=f"{q} {p[q]:.2f} ms")
    ax.set(xlabel="POST /v1/score latency (ms)", ylabel="requests", title="Serving latency")
    ax.legend()
    return _save(fig, run / "latency.png")


def attention_plot(run: Path, service: dict) -> str | None:
    ex = service.get("explanation") if service else None
    if not ex or not ex.get("events"):
        return None
    ev = ex["events"]
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    labels = [f"#{e['position']} item {e['item_id']}" for e in ev]
    weights = [e.get("weight", 0.0) for e in ev]
    marked = any("evidence" in e for e in ev)
    colors = ["#c44e52" if e.get("evidence") else "#8c8c8c" for e in ev] if marked else "#c44e52"
    ax.barh(range(len(ev)), weights, color=colors)
    ax.set_yticks(range(len(ev)), labels, fontsize=7)
    ax.invert_yaxis()
    if marked:  # synthetic data: the generator knows which events make the label
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(color="#c44e52", label="evidence (generator)"), Patch(color="#8c8c8c", label="other")],
                  fontsize=7, loc="lower right")
    ax.set(xlabel="attention weight", title=f"User {ex['user_id']}, candidate item {ex['candidate_item']}: retrieved events")
    return _save(fig, run / "attention.png")


def _img(run: Path, name: str | None) -> str:
    data = base64.b64encode((run / name).read_bytes()).decode()
    return f'<img alt="{html.escape(name)}" src="data:image/png;base64,{data}"/>'


def write_report(run_dir: str | Path) -> Path:
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: run folder not found")
    summary = _load(run / "summary.json") or {}
    models = summary.get("models", {})
    service = _load(run / "service.json") or {}
    plots = {
        "Learning curves": learning_curves(run, list(models)),
        "Search recall@k (synthetic ground truth)": recall_plot(run, models),
        "Serving latency": latency_plot(run, service),
        "What the search retrieved for a sample user": attention_plot(run, service),
    }
    parts = ["<!doctype html><meta charset='utf-8'><title>recsys run report</title>",
             "<style>body{font-family:sans-serif;max-width:900px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}img{max-width:100%}</style>",
             f"<h1>Run report: {html.escape(str(run))}</h1>"]
    if models:
        nan = float("nan")
        # synthetic data: the search's recall / hit of the evidence and the Bayes ceiling (metrics.py)
        search = sorted({k for r in models.values() for k in (r.get("test") or {}) if k.startswith(("recall@", "hit@"))})
        ceiling = next((r["test"]["ceiling_auc"] for r in models.values() if "ceiling_auc" in (r.get("test") or {})), None)
        parts.append("<h2>Model comparison</h2><table><tr><th>model</th><th>val AUC</th><th>test AUC</th>"
                     + ("<th>gap to ceiling</th>" if ceiling is not None else "")
                     + "<th>test GAUC</th><th>test logloss</th>" + "".join(f"<th>test {html.escape(k)}</th>" for k in search)
                     + "<th>train samples/s</th></tr>")
        for name, r in models.items():
            v, t = r.get("best_val", {}), r.get("test") or {}
            gap = f"<td>{ceiling - t.get('auc', nan):.4f}</td>" if ceiling is not None else ""
            cells = "".join(f"<td>{t[k]:.3f}</td>" if k in t else "<td>-</td>" for k in search)
            parts.append(f"<tr><td>{html.escape(name.upper())}</td><td>{v.get('auc', nan):.4f}</td>"
                         f"<td>{t.get('auc', nan):.4f}</td>{gap}<td>{t.get('gauc', nan):.4f}</td>"
                         f"<td>{t.get('logloss', nan):.4f}</td>{cells}<td>{r.get('samples_per_s', 0):,.0f}</td></tr>")
        parts.append("</table>")
        if ceiling is not None:
            parts.append(f"<p>Bayes ceiling (test AUC of the generator's P(label | full history)): {ceiling:.4f}. "
                         "recall@k: evidence events retrieved / min(k, evidence events within the searched window); "
                         "hit@k: share of targets with at least one evidence event retrieved.</p>")
    if service:
        keys = ("latency_percentiles_ms", "qps", "events_streamed", "events_applied", "parity_max_abs_diff")
        facts = {k: service[k] for k in keys if k in service}
        parts.append(f"<h2>Service</h2><pre>{html.escape(json.dumps(facts, indent=2))}</pre>")
    missing = []
    for title, name in plots.items():
        if name is None:
            missing.append(title)
            continue
        parts.append(f"<h2>{html.escape(title)}</h2>{_img(run, name)}")
    if missing:
        parts.append("<h2>Not in this run</h2><ul>" + "".join(f"<li>{html.escape(m)}</li>" for m in missing) + "</ul>")
    out = run / "report.html"
    out.write_text("\n".join(parts))
    return out
