"""Lazy Adam on the embedding tables' row gradients: torch.optim.SparseAdam with the row update fused.

torch's SparseAdam gathers each touched row's two moments, scatters three sparse updates (moments, weight)
and allocates temporaries in between; at Taobao-sized tables (~400k random rows per item table per step)
that was half the training step. `FusedSparseAdam` keeps SparseAdam's arguments, state layout (`step`, a
python int, `exp_avg`, `exp_avg_sq` per table) and state_dict, so checkpoints are unchanged, and does each
row in one pass (kernels/sparse_rows: the C kernel, or its torch form without a compiler). Same elementwise
operations in the same order: the moments are bitwise torch.optim.SparseAdam's, the weights are too but for
the square root's rounding (correctly rounded here, MKL's in torch: kernels/sparse_rows/reference.py).
"""

from __future__ import annotations

import math

import torch

from kernels.sparse_rows import cpu, reference


def _rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A sparse row gradient -> (strictly increasing row ids, their summed gradients). The tables' backward
    emits each row once, in order, without marking the tensor coalesced: checked in O(n) instead of
    coalescing (a sort); anything else is coalesced as SparseAdam does."""
    idx = grad._indices()[0]
    if not grad.is_coalesced() and not bool((idx[1:] > idx[:-1]).all()):
        grad = grad.coalesce()
        idx = grad._indices()[0]
    return idx, grad._values()


class FusedSparseAdam(torch.optim.SparseAdam):
    """torch.optim.SparseAdam (same arguments, state and results) for dense parameters with row gradients
    (sparse over dim 0, as nn.Embedding(sparse=True) emits)."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr = float(group["lr"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise RuntimeError("SparseAdam does not support dense gradients, please consider Adam instead")
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                grad = -p.grad if group["maximize"] else p.grad
                if grad.sparse_dim() != 1:
                    raise ValueError(f"FusedSparseAdam: a parameter of shape {tuple(p.shape)} has a gradient sparse "
                                     f"over {grad.sparse_dim()} dims; it updates row gradients (sparse over dim 0)")
                rows, values = _rows(grad)
                if rows.numel() == 0:
                    continue
                t = state["step"]
                step_size = lr * math.sqrt(1 - beta2**t) / (1 - beta1**t)  # SparseAdam's, in float64
                if not state["exp_avg"].shape == state["exp_avg_sq"].shape == p.shape:
                    raise ValueError(f"FusedSparseAdam: state of a parameter of shape {tuple(p.shape)} has exp_avg "
                                     f"{tuple(state['exp_avg'].shape)}, exp_avg_sq {tuple(state['exp_avg_sq'].shape)}")
                w, m, v = (x.view(p.shape[0], -1) for x in (p, state["exp_avg"], state["exp_avg_sq"]))
                update = cpu.update_rows if cpu.supports(w, m, v) else reference.update_rows
                update(rows, values.reshape(rows.numel(), -1), w, m, v, 1 - beta1, 1 - beta2, group["eps"], -step_size)
        return loss
