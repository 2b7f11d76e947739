"""Single-process training: the ONE training loop (`recsys.train.loop`) on one rank, seeded, validated
every N steps in eval mode, best-by-val-AUC, resumable.

`train(config, out_dir) -> RunResult` writes into out_dir:
  log.jsonl        one JSON line per validation (step, epoch, loss, val metrics): the learning curve
  checkpoint/      latest state for `resume=True`: model.safetensors, optim.safetensors, state.json
                   (fused tables: also tables/ and tables_optim/, their shards and row-wise Adagrad state
                   through torch.distributed.checkpoint, recsys.checkpoint)
  best/            weights of the best validation AUC so far (a weights folder, recsys.checkpoint)
  bundle/          the exported model bundle of the best weights (recsys.bundle)
`evaluate(bundle_dir, split) -> metrics` and `score(model, dataset, split) -> probabilities`.
Resume replays the same data order (it depends on seed and epoch only), so an interrupted run that
resumes ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import resource
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from recsys.config.experiment import load_experiment
from recsys.data.sequences import Dataset, load_dataset
from recsys.data.shards import whole
from recsys.train.evaluation import Predictions, predict, score, split_metrics
from recsys.train.loop import Context, OnStep, plain_model, run_loop

__all__ = ["Predictions", "RunResult", "evaluate", "predict", "score", "split_metrics", "train", "user_subset"]


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


class LocalContext(Context):
    """The one-process context: checkpoint/ replaced atomically, log.jsonl, a progress bar."""

    def __init__(self, out: Path, resume: bool, bar) -> None:
        self.out, self.resume, self.bar = out, resume, bar
        self.ckpt, self.log = out / "checkpoint", out / "log.jsonl"

    @contextmanager
    def resume_dir(self) -> Iterator[str | None]:
        if self.resume and self.ckpt.is_dir():
            step = json.loads((self.ckpt / "state.json").read_text())["step"]
            _truncate_log(self.log, step)
            self.bar.update(step)
            yield str(self.ckpt)
            return
        if self.log.exists():
            self.log.unlink()
        yield None

    def save(self, write: Callable[[str], None], record: dict, metrics: dict) -> None:
        with self.log.open("a") as f:
            f.write(json.dumps(record) + "\n")
        _replace_dir(self.ckpt, write)

    def stepped(self, step: int, total: int, loss: float) -> None:
        self.bar.total = total
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}")


def _replace_dir(path: Path, write: Callable[[str], None]) -> None:
    """Write to a temp folder then rename, so a crash never leaves a half-written checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # a crash's half-written one
    tmp.mkdir(parents=True)
    write(str(tmp))
    if path.exists():
        old = path.with_name(path.name + ".old")
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old)  # sharded tables: a checkpoint holds folders
    else:
        tmp.rename(path)


def train(
    config,
    out_dir: str | Path,
    resume: bool = False,
    dataset: Dataset | None = None,
    evaluate_test: bool = True,
    on_step: OnStep | None = None,
) -> RunResult:
    """Train `config` (an ExperimentConfig or a YAML path) into `out_dir`; see the module docstring.

    `dataset`: an already loaded dataset (else `config.data` is loaded). `evaluate_test`: score the test
    split with the best-by-validation weights at the end (reporting only; selection uses val).
    `on_step(rank, step)`: called before each step (tests inject faults with it).
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
    t_start = time.perf_counter()
    bar = tqdm(total=None, disable=not tc.progress, desc=f"{mc.name} seed {tc.seed}", unit="step")
    try:
        r = run_loop(cfg, whole(ds), LocalContext(out, resume, bar), out, evaluate_test=evaluate_test, on_step=on_step)
    finally:
        bar.close()
    metrics = {"best_step": r["best_step"], "val": r["best_val"]} | ({"test": r["test"]} if r["test"] else {})
    bundle_dir = export_bundle(plain_model(cfg, out / "best", ds.n_items, ds.n_cates), cfg, out / "bundle", metrics, ds)
    result = RunResult(
        out_dir=str(out),
        bundle_dir=str(bundle_dir),
        steps=r["steps"],
        best_step=r["best_step"],
        best_val=r["best_val"],
        test=r["test"],
        train_samples_per_s=r["samples_per_s"],
        wall_s=time.perf_counter() - t_start,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        stopped_early=r["stopped_early"],
    )
    (out / "result.json").write_text(json.dumps(result.to_json(), indent=2))
    return result


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
        return replace(s, user=s.user[m], pos=s.pos[m], item=s.item[m], cate=s.cate[m], label=s.label[m], evidence=ev,
                       p_label=s.p_label[m] if s.p_label is not None else None)

    return replace(dataset, splits={k: keep(s) for k, s in dataset.splits.items()})
