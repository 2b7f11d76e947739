"""BatchNorm over the global batch of a data-parallel job on CPU (gloo).

Under DDP each worker sees only its part of the global batch, so a plain BatchNorm1d normalises with that
part's statistics and the N-worker step differs from the single-process step on the whole batch. torch's
`nn.SyncBatchNorm` fixes that on GPUs only (its kernels are CUDA's). `SyncBatchNorm1d` is a BatchNorm1d
that, in training mode under an initialised process group of more than one rank, all-reduces the
per-feature sum, sum of squares and row count (one packed all_reduce), so its output and its running
statistics are those of BatchNorm1d on the concatenated batch; its backward all-reduces the two per-feature
gradient sums the input gradient needs (sum dy, sum dy * (x - mean)). Everywhere else (eval mode, one
process, no process group) it is BatchNorm1d itself.

Gradients of weight and bias are left local: DDP averages them like any parameter's. Statistics are
accumulated in float64, as ATen's CPU BatchNorm does, so they differ from the single-process ones by
float rounding only. It subclasses BatchNorm1d and keeps its parameter and buffer names, so state dicts
load unchanged into the plain model (bundles stay single-process models).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def _distributed_world(group) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


class SyncBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training-mode statistics span every rank of `process_group` (None: the default group)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        use_batch_stats = self.training or self.running_mean is None
        if not use_batch_stats or _distributed_world(self.process_group) == 1:
            return super().forward(x)
        self._check_input_dim(x)
        momentum = self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if momentum is None:  # cumulative moving average, as BatchNorm1d
                momentum = 1.0 / float(self.num_batches_tracked)
        # [N, C] or [N, C, L]: statistics per channel over every other dimension
        flat = x if x.dim() == 2 else x.transpose(1, 2).reshape(-1, x.shape[1])
        update = self.training and self.track_running_stats
        y = _SyncBatchNormFn.apply(flat, self.weight, self.bias, self.running_mean if update else None,
                                   self.running_var if update else None, self.eps, momentum or 0.0, self.process_group)
        return y if x.dim() == 2 else y.reshape(x.shape[0], x.shape[2], x.shape[1]).transpose(1, 2)


class _SyncBatchNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps: float, momentum: float, group):
        C = x.shape[1]
        xd = x.double()
        packed = torch.cat([xd.sum(0), (xd * xd).sum(0), xd.new_tensor([x.shape[0]])])
        dist.all_reduce(packed, group=group)
        count = packed[-1]
        n = int(count.item())
        if n <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got a global batch of {n} rows")
        mean = packed[:C] / count
        var = (packed[C : 2 * C] / count - mean * mean).clamp(min=0.0)   # biased, as BatchNorm normalises with
        invstd = torch.rsqrt(var + eps)
        if running_mean is not None:
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
                running_var.mul_(1 - momentum).add_((var * n / (n - 1)).to(running_var.dtype), alpha=momentum)
        xhat = ((xd - mean) * invstd).to(x.dtype)
        y = xhat if weight is None else torch.addcmul(bias, xhat, weight)
        ctx.save_for_backward(xhat, invstd.to(x.dtype), weight)
        ctx.count, ctx.group = count, group
        return y

    @staticmethod
    def backward(ctx, dy):
        xhat, invstd, weight = ctx.saved_tensors
        C = dy.shape[1]
        dyd = dy.double()
        local = torch.cat([dyd.sum(0), (dyd * xhat.double()).sum(0)])   # sum dy, sum dy * xhat (local rows)
        grad_weight = local[C:].to(dy.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = local[:C].to(dy.dtype) if weight is not None and ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            glob = local.clone()
            dist.all_reduce(glob, group=ctx.group)
            mean_dy, mean_dy_xhat = glob[:C] / ctx.count, glob[C:] / ctx.count
            scale = invstd if weight is None else invstd * weight
            grad_x = ((dyd - mean_dy - xhat.double() * mean_dy_xhat) * scale.double()).to(dy.dtype)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """`module` with every BatchNorm1d replaced by a SyncBatchNorm1d holding the same weights and buffers
    (the same tensors, not copies) under the same names. Returns the converted module (the same object
    unless `module` itself is a BatchNorm1d)."""
    if isinstance(module, nn.BatchNorm1d) and not isinstance(module, SyncBatchNorm1d):
        out = SyncBatchNorm1d(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats, process_group)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
        return out
    for name, child in module.named_children():
        new = convert_sync_batchnorm(child, process_group)
        if new is not child:
            setattr(module, name, new)
    return module
