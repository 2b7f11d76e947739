"""The ONE training step (single-process trainer and the Ray Train job both call it), its optimizers,
and their state as plain tensors + JSON (never pickle).

Dense weights: Adam with L2 as weight decay (the original's recipe). Embedding tables, by backend:
`sparse` -> SparseAdam (fused: recsys/train/sparse_adam.py) on the rows of the batch; `dense` -> Adam on
every row (the original); `fused` -> none here, fbgemm applies row-wise Adagrad inside backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from recsys.config.train import TrainConfig
from recsys.data.batch import HistoryBatch
from recsys.embeddings import table_sets
from recsys.models.output import bce_loss
from recsys.train.sparse_adam import FusedSparseAdam


@dataclass
class Optimizers:
    dense: torch.optim.Optimizer
    tables: torch.optim.Optimizer | None

    def all(self) -> dict[str, torch.optim.Optimizer]:
        return {"dense": self.dense} | ({"tables": self.tables} if self.tables is not None else {})


def dense_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter outside the embedding tables (these get Adam with L2)."""
    table_ids = {id(p) for t in table_sets(model).values() for p in t.parameters()}
    return [p for p in model.parameters() if id(p) not in table_ids]


def make_optimizers(model: nn.Module, train: TrainConfig) -> Optimizers:
    dense = torch.optim.Adam(dense_parameters(model), lr=train.lr, weight_decay=train.l2)
    params = [p for t in table_sets(model).values() for p in t.dense_parameters()]
    backends = {t.backend for t in table_sets(model).values()}
    if not params:
        return Optimizers(dense, None)
    if backends == {"sparse"}:
        return Optimizers(dense, FusedSparseAdam(params, lr=train.embedding_lr))
    return Optimizers(dense, torch.optim.Adam(params, lr=train.embedding_lr))


def train_step(model: nn.Module, batch: HistoryBatch, opt: Optimizers, aux_weight: float) -> float:
    """Forward, loss (main + weighted auxiliary head), backward, update. Returns the loss."""
    for o in opt.all().values():
        o.zero_grad(set_to_none=True)
    out = model(batch)
    loss = bce_loss(out, batch.label, aux_weight)
    loss.backward()
    for o in opt.all().values():
        o.step()
    return float(loss.detach())


def optimizer_state(opt: Optimizers) -> tuple[dict[str, torch.Tensor], dict]:
    """-> (tensors for safetensors, JSON-able rest). Parameters are referred to by their index."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict = {}
    for name, o in opt.all().items():
        sd = o.state_dict()
        meta[name] = {"param_groups": sd["param_groups"], "state": {}}
        for idx, st in sd["state"].items():
            keys, scalars = [], {}
            for key, val in st.items():
                if torch.is_tensor(val):
                    tensors[f"{name}.{idx}.{key}"] = val.detach().contiguous()
                    keys.append(key)
                else:  # e.g. SparseAdam's python-int step: kept a python number, as the optimizer's math expects
                    scalars[key] = val
            meta[name]["state"][str(idx)] = {"tensors": keys, "scalars": scalars}
    return tensors, meta


def load_optimizer_state(opt: Optimizers, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    if set(meta) != set(opt.all()):
        raise ValueError(f"checkpoint optimizers {sorted(meta)} do not match this run's {sorted(opt.all())}")
    for name, o in opt.all().items():
        state = {
            int(idx): {key: tensors[f"{name}.{idx}.{key}"] for key in st["tensors"]} | st["scalars"]
            for idx, st in meta[name]["state"].items()
        }
        o.load_state_dict({"state": state, "param_groups": meta[name]["param_groups"]})
