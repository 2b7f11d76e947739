"""Scores and metrics of a split: whole (one process) or per shard, merged from mergeable partials.

`split_partial` on each rank's user shard, merged by `merge_split` over the ranks' communicator, gives
every rank the metrics of the whole split, equal bit for bit to one process's (`split_metrics`, the
one-rank case of the same code): AUC, GAUC, category AUC, logloss and the synthetic data's evidence
means are exact sums rounded once (`recsys.metrics`). No rank gathers the split's count tables: the
global, category and Bayes-ceiling AUC tables are range-partitioned over the ranks (`metrics.merge_counts`),
so a rank holds about 1/world of them. Scores do not depend on the batch (eval mode, fixed-width
histories), so any split of the rows scores each row the same (up to the last bit of a matrix product
blocked by batch size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from recsys.data.sequences import assemble, batch_rows
from recsys.metrics import (
    OneRank,
    auc_counts,
    ctr_partial,
    ctr_result,
    evidence_partial,
    grouped_mean,
    merge_counts,
    merge_evidence,
)


@dataclass
class Predictions:
    probs: np.ndarray            # [R] main head
    indices: np.ndarray | None   # [R, k] retrieved history columns (DARE/TWIN)


@torch.no_grad()
def predict(model: nn.Module, dataset, split: str, max_len: int, batch_size: int = 4096, batches: int | None = None,
            indices: bool = True) -> Predictions:
    """Every row of `split` of `dataset` (a Dataset or a Shard), in order, with the model in eval mode
    (restored afterwards). `batches`: run that many forwards in all, the ones past the split's batches on
    a one-row filler whose output is dropped: a model with sharded tables makes collectives in its
    forward, so every rank must run equally many (recsys.train.loop passes the ranks' largest count).
    `indices`: keep the retrieved columns (top_k int64 per row, the largest thing held per row: only the
    evidence metrics read them)."""
    if split not in dataset.splits:
        raise KeyError(f"split {split!r} not loaded; have {sorted(dataset.splits)}")
    samples = dataset.splits[split]
    own = math.ceil(len(samples) / batch_size)
    if batches is not None and batches < own:
        raise ValueError(f"predict: {split!r} needs {own} batches of {batch_size}, asked to run {batches}")
    was_training = model.training
    model.eval()
    probs, idx = [], []
    try:
        for rows in batch_rows(len(samples), batch_size, shuffle=False):
            out = model(assemble(dataset.store, samples, rows, max_len, trim=False))
            probs.append(torch.sigmoid(out.logit).double().numpy())
            if indices and out.indices is not None:
                idx.append(out.indices.numpy())
        if batches is not None and batches > own:
            filler = next((s for s in dataset.splits.values() if len(s)), None)
            if filler is None:
                raise ValueError("predict: no row in any split to pad the scoring batches with")
            for _ in range(batches - own):
                model(assemble(dataset.store, filler, np.zeros(1, dtype=np.int64), max_len, trim=False))
    finally:
        model.train(was_training)
    probs_all = np.concatenate(probs) if probs else np.zeros(0)
    return Predictions(probs_all, np.concatenate(idx) if idx else None)


def score(model: nn.Module, dataset, split: str, max_len: int | None = None, batch_size: int = 4096) -> np.ndarray:
    """Predicted click probabilities for every row of `split`."""
    return predict(model, dataset, split, max_len or model.config.max_len, batch_size).probs


def split_partial(model: nn.Module, dataset, split: str, max_len: int, batch_size: int = 4096, batches: int | None = None) -> dict:
    """The mergeable metrics of `split` of `dataset` (a shard holding whole users, or the whole dataset);
    `batches`: see predict."""
    s = dataset.splits[split]
    pred = predict(model, dataset, split, max_len, batch_size, batches, indices=s.evidence is not None)
    part = {"ctr": ctr_partial(s.label, pred.probs, s.user, s.cate)}
    if s.evidence is not None and pred.indices is not None:
        part["k"] = pred.indices.shape[1]
        part["evidence"] = evidence_partial(pred.indices, s.pos, s.evidence, max_len)
    if s.p_label is not None:
        part["ceiling"] = auc_counts(s.label, s.p_label)
    return part


def merge_split(part: dict, comm) -> dict[str, float]:
    """ctr_metrics of the whole split, on every rank, from this rank's `split_partial` (`comm`: the ranks'
    Context, see recsys.metrics); on synthetic data also the search's recall@k / hit@k of the evidence
    within the searched window and the share of evidence rows whose evidence lies in it
    (metrics.evidence_recall), and the Bayes ceiling: the AUC of the generator's P(label | full history) on
    the same rows."""
    ctr = part["ctr"]
    tables = {"auc": ctr["auc"], "cate": ctr["cate"]} | ({"ceiling": part["ceiling"]} if "ceiling" in part else {})
    extra = {"ctr": {"gauc": ctr["gauc"], "logloss": ctr["logloss"]}} | {k: part[k] for k in ("k", "evidence") if k in part}
    groups, parts = merge_counts(tables, comm, extra)
    m = ctr_result(groups, [p["ctr"] for p in parts])
    ev = [p for p in parts if "evidence" in p]
    if ev:
        k = ev[0]["k"]
        r = merge_evidence([p["evidence"] for p in ev])
        m |= {f"recall@{k}": r["recall"], f"hit@{k}": r["hit"], "evidence_in_window": r["reach"]}
    if "ceiling" in groups:
        m["ceiling_auc"] = grouped_mean(groups["ceiling"])
    return m


def split_metrics(model: nn.Module, dataset, split: str, max_len: int, batch_size: int = 4096) -> dict[str, float]:
    """The metrics of `split` on one process (see merge_split)."""
    return merge_split(split_partial(model, dataset, split, max_len, batch_size), OneRank())
