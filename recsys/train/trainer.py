"""Single-process training: seeded, validated every N steps in eval mode, best-by-val-AUC, resumable.

`train(config, out_dir) -> RunResult` writes into out_dir:
  log.jsonl        one JSON line per validation (step, epoch, loss, val metrics): the learning curve
  checkpoint/      latest state for `resume=True`: model.safetensors, optim.safetensors, state.json
  best/            weights of the best validation AUC so far
  bundle/          the exported model bundle of the best weights (recsys.bundle)
`evaluate(bundle_dir, split) -> metrics` and `score(model, dataset, split) -> probabilities`.
Resume replays the same data order (it depends on seed and epoch only), so an interrupted run that
resumes ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from recsys.checkpoint import load_state_tensors, state_tensors
from recsys.config.experiment import ExperimentConfig, load_experiment
from recsys.data.sequences import Dataset, assemble, batch_rows, load_dataset
from recsys.embeddings import table_sets
from recsys.metrics import ctr_metrics
from recsys.models import build_model
from recsys.train.step import Optimizers, load_optimizer_state, make_optimizers, optimizer_state, train_step


@dataclass
class RunResult:
    out_dir: str
    bundle_dir: str
    steps: int
    best_step: int
    best_val: dict[str, float]
    test: dict[str, float] | None
    train_samples_per_s: float   # median steady-state step rate (first 10 steps excluded), validation excluded
    wall_s: float
    peak_rss_mb: float
    stopped_early: bool

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Predictions:
    probs: np.ndarray            # [R] main head
    indices: np.ndarray | None   # [R, k] retrieved history columns (DARE/TWIN)


@torch.no_grad()
def predict(model: nn.Module, dataset: Dataset, split: str, max_len: int, batch_size: int = 4096) -> Predictions:
    """Every row of `split`, in order, with the model in eval mode (restored afterwards)."""
    if split not in dataset.splits:
        raise KeyError(f"split {split!r} not loaded; have {sorted(dataset.splits)}")
    samples = dataset.splits[split]
    was_training = model.training
    model.eval()
    probs, idx = [], []
    try:
        for rows in batch_rows(len(samples), batch_size, shuffle=False):
            out = model(assemble(dataset.store, samples, rows, max_len, trim=False))
            probs.append(torch.sigmoid(out.logit).double().numpy())
            if out.indices is not None:
                idx.append(out.indices.numpy())
    finally:
        model.train(was_training)
    return Predictions(np.concatenate(probs), np.concatenate(idx) if idx else None)


def score(model: nn.Module, dataset: Dataset, split: str, max_len: int | None = None, batch_size: int = 4096) -> np.ndarray:
    """Predicted click probabilities for every row of `split`."""
    return predict(model, dataset, split, max_len or model.config.max_len, batch_size).probs


def split_metrics(model: nn.Module, dataset: Dataset, split: str, max_len: int, batch_size: int = 4096) -> dict[str, float]:
    """ctr_metrics; on synthetic data also the search's recall@k / hit@k of the evidence within the searched
    window and the share of evidence rows whose evidence lies in it (metrics.evidence_recall), and the
    Bayes ceiling: the AUC of the generator's P(label | full history) on the same rows."""
    from recsys.metrics import auc, evidence_recall

    pred = predict(model, dataset, split, max_len, batch_size)
    s = dataset.splits[split]
    m = ctr_metrics(s.label, pred.probs, s.user, s.cate)
    if s.evidence is not None and pred.indices is not None:
        k = pred.indices.shape[1]
        r = evidence_recall(pred.indices, s.pos, s.evidence, max_len)
        m |= {f"recall@{k}": r["recall"], f"hit@{k}": r["hit"], "evidence_in_window": r["reach"]}
    if s.p_label is not None:
        m["ceiling_auc"] = auc(s.label, s.p_label)
    return m


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def _save_checkpoint(path: Path, model: nn.Module, opt: Optimizers, state: dict) -> None:
    """Write to a temp folder then rename, so a crash never leaves a half-written checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(state_tensors(model), tmp / "model.safetensors")
    tensors, meta = optimizer_state(opt)
    save_file(tensors, tmp / "optim.safetensors")
    (tmp / "state.json").write_text(json.dumps(state | {"optimizers": meta}))
    if path.exists():
        old = path.with_name(path.name + ".old")
        path.rename(old)
        tmp.rename(path)
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    else:
        tmp.rename(path)


def train(
    config: ExperimentConfig | str | Path,
    out_dir: str | Path,
    resume: bool = False,
    dataset: Dataset | None = None,
    evaluate_test: bool = True,
) -> RunResult:
    """Train `config` (an ExperimentConfig or a YAML path) into `out_dir`; see the module docstring.

    `dataset`: an already loaded dataset (else `config.data` is loaded). `evaluate_test`: score the test
    split with the best-by-validation weights at the end (reporting only; selection uses val).
    """
    from tqdm.auto import tqdm

    from recsys.bundle import export_bundle

    cfg = load_experiment(config)
    tc, mc = cfg.train, cfg.model
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    ds = dataset or load_dataset(cfg.data_path())
    train_rows = ds.splits["train"]
    t_start = time.perf_counter()

    _seed(tc.seed)
    model = build_model(mc, ds.n_items, ds.n_cates)
    if mc.embedding_backend == "fused":
        for tables in table_sets(model).values():
            tables.shard(lr=tc.embedding_lr)
    opt = make_optimizers(model, tc)

    steps_per_epoch = math.ceil(len(train_rows) / tc.batch_size)
    total_steps = math.ceil(tc.epochs * steps_per_epoch)
    state = {"step": 0, "best_auc": -1.0, "best_step": 0, "best_val": {}, "bad": 0, "stopped_early": False}
    ckpt = out / "checkpoint"
    log_path = out / "log.jsonl"
    if resume and ckpt.is_dir():
        if mc.embedding_backend == "fused":
            raise NotImplementedError("resume: the fused backend keeps its optimizer state inside fbgemm; resume a sparse/dense run")
        load_state_tensors(model, load_file(ckpt / "model.safetensors"))
        saved = json.loads((ckpt / "state.json").read_text())
        load_optimizer_state(opt, load_file(ckpt / "optim.safetensors"), saved.pop("optimizers"))
        state = saved
        _truncate_log(log_path, state["step"])
    elif log_path.exists():
        log_path.unlink()

    model.train()
    step_times: list[float] = []
    bar = tqdm(total=total_steps, initial=state["step"], disable=not tc.progress, desc=f"{mc.name} seed {tc.seed}", unit="step")
    last_loss = float("nan")
    while state["step"] < total_steps and not state["stopped_early"]:
        epoch, skip = divmod(state["step"], steps_per_epoch)
        for i, rows in enumerate(batch_rows(len(train_rows), tc.batch_size, shuffle=True, seed=tc.seed * 100_003 + epoch)):
            if i < skip:
                continue
            batch = assemble(ds.store, train_rows, rows, mc.max_len)
            t0 = time.perf_counter()
            last_loss = train_step(model, batch, opt, mc.aux_weight if mc.aux_loss else 0.0)
            step_times.append((time.perf_counter() - t0) / len(rows))
            state["step"] += 1
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.4f}")
            if state["step"] % tc.eval_every == 0 or state["step"] == total_steps:
                _validate(model, ds, cfg, state, out, epoch, last_loss, log_path)
                _save_checkpoint(ckpt, model, opt, state)
                if state["stopped_early"]:
                    break
            if state["step"] >= total_steps:
                break
    bar.close()

    best = load_file(out / "best" / "model.safetensors")
    load_state_tensors(model, best)
    model.eval()
    test = split_metrics(model, ds, "test", mc.max_len, tc.eval_batch_size) if evaluate_test and "test" in ds.splits else None
    metrics = {"best_step": state["best_step"], "val": state["best_val"]} | ({"test": test} if test else {})
    bundle_dir = export_bundle(model, cfg, out / "bundle", metrics, ds)
    rates = [1.0 / t for t in step_times[10:]] or [1.0 / t for t in step_times]
    result = RunResult(
        out_dir=str(out),
        bundle_dir=str(bundle_dir),
        steps=state["step"],
        best_step=state["best_step"],
        best_val=state["best_val"],
        test=test,
        train_samples_per_s=float(np.median(rates)) if rates else float("nan"),
        wall_s=time.perf_counter() - t_start,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        stopped_early=bool(state["stopped_early"]),
    )
    (out / "result.json").write_text(json.dumps(result.to_json(), indent=2))
    return result


def _validate(model: nn.Module, ds: Dataset, cfg: ExperimentConfig, state: dict, out: Path, epoch: int, loss: float, log_path: Path) -> None:
    val = split_metrics(model, ds, "val", cfg.model.max_len, cfg.train.eval_batch_size)
    improved = val["auc"] > state["best_auc"]
    if improved:
        state.update(best_auc=val["auc"], best_step=state["step"], best_val=val, bad=0)
        (out / "best").mkdir(exist_ok=True)
        save_file(state_tensors(model), out / "best" / "model.safetensors.tmp")
        (out / "best" / "model.safetensors.tmp").replace(out / "best" / "model.safetensors")
    else:
        state["bad"] += 1
        if cfg.train.patience is not None and state["bad"] >= cfg.train.patience:
            state["stopped_early"] = True
    with log_path.open("a") as f:
        f.write(json.dumps({"step": state["step"], "epoch": epoch, "train_loss": loss, "improved": improved} | {f"val_{k}": v for k, v in val.items()}) + "\n")


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (a crash between log and checkpoint)."""
    if path.exists():
        lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in lines))


def evaluate(bundle_dir: str | Path, split: str = "test", data: str | Path | None = None, batch_size: int = 4096) -> dict[str, float]:
    """Metrics of a saved bundle on `split` of its dataset (or of the dataset folder `data`)."""
    from recsys.bundle import load_bundle

    b = load_bundle(bundle_dir)
    ds = load_dataset(Path(data) if data else b.config.data_path(), splits=(split,))
    if ds.n_items > b.id_space["n_items"] or ds.n_cates > b.id_space["n_cates"]:
        raise ValueError(f"{bundle_dir}: dataset ids (items {ds.n_items}, cates {ds.n_cates}) exceed the bundle's id space {b.id_space}")
    return split_metrics(b.model, ds, split, b.config.model.max_len, batch_size)


def user_subset(dataset: Dataset, n_users: int) -> Dataset:
    """The rows of users 0..n_users-1 (their full histories stay): quick runs and tests on real data."""
    from dataclasses import replace

    def keep(s):
        m = s.user < n_users
        ev = [e for e, k in zip(s.evidence, m) if k] if s.evidence is not None else None
        return replace(s, user=s.user[m], pos=s.pos[m], item=s.item[m], cate=s.cate[m], label=s.label[m], evidence=ev)

    return replace(dataset, splits={k: keep(s) for k, s in dataset.splits.items()})
