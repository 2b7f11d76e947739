"""SyncBatchNorm1d over 2 gloo processes equals BatchNorm1d on the concatenated batch: output, running
statistics, input gradient, and weight/bias gradients once summed over ranks (as DDP does)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from dist_support import leave_group
from recsys.models.layers import MLP
from recsys.net import free_port
from recsys.models.sync_batchnorm import SyncBatchNorm1d, convert_sync_batchnorm

# Unequal parts (the strided split of an odd global batch) and a 3-d input [N, C, L] case.
SPLITS = (7, 4)
C, L = 5, 3
STEPS = 3  # running statistics after several updates (momentum and the cumulative average)


def _data(dtype: torch.dtype, shape: tuple[int, ...], step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(sum(SPLITS), *shape, generator=g, dtype=dtype) * 3 + 1.5   # offset: the variance is not E[x^2]
    dy = torch.randn(sum(SPLITS), *shape, generator=g, dtype=dtype)
    return x, dy


def _bn(cls, momentum, dtype):
    torch.manual_seed(0)
    bn = cls(C, momentum=momentum).to(dtype)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    return bn


def _run(bn, x: torch.Tensor, dy: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    bn.zero_grad()
    y = bn(x)
    y.backward(dy)
    return {"y": y.detach(), "dx": x.grad, "dw": bn.weight.grad.clone(), "db": bn.bias.grad.clone(),
            "rm": bn.running_mean.clone(), "rv": bn.running_var.clone(), "n": bn.num_batches_tracked.clone()}


def _cases():
    for dtype in (torch.float32, torch.float64):
        for shape, momentum in (((C,), 0.1), ((C, L), None)):
            yield dtype, shape, momentum


def _worker(rank: int, port: int, out: list) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    lo = sum(SPLITS[:rank])
    part = slice(lo, lo + SPLITS[rank])
    results = []
    for dtype, shape, momentum in _cases():
        bn = _bn(SyncBatchNorm1d, momentum, dtype)
        steps = []
        for step in range(STEPS):
            x, dy = _data(dtype, shape, step)
            r = _run(bn, x[part], dy[part])
            for k in ("dw", "db"):  # DDP's share: the local parameter gradients summed over ranks
                dist.all_reduce(r[k])
            steps.append(r)
        bn.eval()
        x, _ = _data(dtype, shape, STEPS)
        steps.append({"eval": bn(x[part]).detach()})
        results.append(steps)
    torch.save(results, out[rank])
    leave_group()


def test_two_process_sync_bn_equals_batchnorm_on_the_whole_batch(tmp_path):
    out = [str(tmp_path / f"rank{r}.pt") for r in range(2)]
    mp.spawn(_worker, args=(free_port(), out), nprocs=2, join=True)
    got = [torch.load(p) for p in out]
    for case, (dtype, shape, momentum) in enumerate(_cases()):
        tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-11, "atol": 1e-11}
        ref_bn = _bn(nn.BatchNorm1d, momentum, dtype)
        for step in range(STEPS):
            x, dy = _data(dtype, shape, step)
            ref = _run(ref_bn, x, dy)
            for rank in range(2):
                r, lo = got[rank][case][step], sum(SPLITS[:rank])
                part = slice(lo, lo + SPLITS[rank])
                where = f"{dtype} {shape} step {step} rank {rank}"
                torch.testing.assert_close(r["y"], ref["y"][part], **tol, msg=lambda m: f"y {where}: {m}")
                torch.testing.assert_close(r["dx"], ref["dx"][part], **tol, msg=lambda m: f"dx {where}: {m}")
                for k in ("dw", "db", "rm", "rv"):
                    torch.testing.assert_close(r[k], ref[k], **tol, msg=lambda m: f"{k} {where}: {m}")
                assert int(r["n"]) == int(ref["n"]) == step + 1
        ref_bn.eval()
        x, _ = _data(dtype, shape, STEPS)
        for rank in range(2):
            lo = sum(SPLITS[:rank])
            torch.testing.assert_close(got[rank][case][STEPS]["eval"], ref_bn(x)[lo : lo + SPLITS[rank]].detach(), **tol)
    # the reference really differs from per-rank BatchNorm (else the test could not fail)
    x, dy = _data(torch.float32, (C,), 0)
    local = _run(_bn(nn.BatchNorm1d, 0.1, torch.float32), x[: SPLITS[0]], dy[: SPLITS[0]])
    assert (local["y"] - got[0][0][0]["y"]).abs().max() > 0.1


def test_convert_keeps_weights_buffers_and_state_dict_keys():
    torch.manual_seed(0)
    mlp = MLP(6, [8, 4])
    mlp.train()
    mlp(torch.randn(16, 6))                       # running statistics away from their init
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    tensors = {k: v.data_ptr() for k, v in mlp.state_dict().items()}
    conv = convert_sync_batchnorm(mlp)
    assert conv is mlp
    assert sum(isinstance(m, SyncBatchNorm1d) for m in conv.modules()) == 2
    assert not any(type(m) is nn.BatchNorm1d for m in conv.modules())
    sd = conv.state_dict()
    assert list(sd) == list(before)
    assert {k: v.data_ptr() for k, v in sd.items()} == tensors  # the same tensors (the optimizer's too)
    for k in before:
        assert torch.equal(sd[k], before[k]), k
    plain = MLP(6, [8, 4])
    plain.load_state_dict(sd)                     # a converted model's weights load into the plain one
    x = torch.randn(16, 6)
    for mode in (True, False):                    # one process, no group: exactly BatchNorm1d
        conv.train(mode)
        plain.train(mode)
        assert torch.equal(conv(x), plain(x))
