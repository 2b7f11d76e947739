"""The sparse table backend's row kernels (kernels/sparse_rows): the lookup's gradient sum against torch's
index_add_, and recsys.train.sparse_adam.FusedSparseAdam against torch.optim.SparseAdam on both of its paths,
the C kernel (cpu.c) and its torch form (reference.py, the path without a compiler).

The moments (exp_avg, exp_avg_sq) and the step count must equal torch's bitwise. The weights equal torch's
up to the rounding of the square root: ours is correctly rounded, torch's float32 sqrt on CPU is MKL's vector
math, 1 ulp off for a share of inputs; that changes a row's update by ~1 ulp and so its weight by at most
one rounding of the sum (1 ulp of the weight) per step. The two paths of ours must agree bitwise.
"""

from __future__ import annotations

import pytest
import torch

from kernels.sparse_rows import cpu, reference
from recsys.train.sparse_adam import FusedSparseAdam
from recsys.train.step import Optimizers, load_optimizer_state, optimizer_state

N, D, STEPS, LR = 40, 4, 6, 0.01


def _grads(seed: int, n_rows: int = N, dim: int = D, n_ids: int = 25) -> list[torch.Tensor]:
    """Row gradients of STEPS steps: unsorted ids with repeats; step 2 touches rows < 10 only (the others are
    left alone, moments not decayed); step 3 is sorted, unique and not marked coalesced (what the tables'
    backward emits); step 4 touches no row (the step count still advances)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in range(STEPS):
        if s == 3:
            ids = torch.randperm(n_rows, generator=g)[: n_rows // 2].sort().values
        elif s == 4:
            ids = torch.zeros(0, dtype=torch.int64)
        else:
            ids = torch.randint(0, 10 if s == 2 else n_rows, (n_ids,), generator=g)
        # magnitudes from 1e-4 to 10: the second moment's update spans small and large squares
        vals = torch.randn(len(ids), dim, generator=g) * 10.0 ** torch.randint(-4, 2, (len(ids), 1), generator=g)
        out.append(torch.sparse_coo_tensor(ids[None], vals, (n_rows, dim)))
    assert not out[3].is_coalesced() and bool((out[0]._indices()[0][1:] <= out[0]._indices()[0][:-1]).any())
    return out


def _run(opt_class, path: str, monkeypatch, grads: list[torch.Tensor], w0: torch.Tensor, **kw):
    monkeypatch.setattr(cpu, "supports", lambda *a: path == "c" and cpu.load() is not None)
    p = torch.nn.Parameter(w0.clone())
    q = torch.nn.Parameter(w0.clone())   # a second group, maximizing: SparseAdam negates its gradients
    opt = opt_class([{"params": [p]}, {"params": [q], "maximize": True}], lr=LR, **kw)
    for g in grads:
        p.grad, q.grad = g, g
        opt.step()
    return (p, q), opt


def _check_against_torch(ours, ours_opt, theirs, theirs_opt):
    for a, b in zip(ours, theirs):
        sa, sb = ours_opt.state[a], theirs_opt.state[b]
        assert sa["step"] == sb["step"] == STEPS and isinstance(sa["step"], int)
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
        ulp = torch.finfo(torch.float32).eps * b.detach().abs().clamp(min=LR)
        assert bool(((a - b).abs() <= STEPS * ulp).all()), float((a - b).abs().max())


@pytest.mark.parametrize("path", ["c", "torch"])
def test_fused_step_equals_torch_sparse_adam(monkeypatch, path):
    if path == "c":
        assert cpu.load() is not None   # CI builds the kernel: the C path must not silently fall back
    w0 = torch.randn(N, D, generator=torch.Generator().manual_seed(0))
    grads = _grads(1)
    theirs, theirs_opt = _run(torch.optim.SparseAdam, path, monkeypatch, grads, w0, betas=(0.8, 0.99), eps=1e-6)
    ours, ours_opt = _run(FusedSparseAdam, path, monkeypatch, grads, w0, betas=(0.8, 0.99), eps=1e-6)
    _check_against_torch(ours, ours_opt, theirs, theirs_opt)
    untouched = torch.ones(N, dtype=torch.bool)
    for g in grads:
        untouched[g._indices()[0]] = False
    assert bool(untouched.any()) and torch.equal(ours[0].detach()[untouched], w0[untouched])
    assert not torch.equal(ours[0].detach(), w0)


def test_c_kernel_equals_its_torch_form_bitwise(monkeypatch):
    """Also over two OpenMP threads (the kernel splits rows over threads from 16,384 rows on)."""
    assert cpu.load() is not None
    n_rows = 50_000
    w0 = torch.randn(n_rows, 8, generator=torch.Generator().manual_seed(2))
    grads = _grads(3, n_rows, 8, n_ids=60_000)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        c, _ = _run(FusedSparseAdam, "c", monkeypatch, grads, w0)
    finally:
        torch.set_num_threads(threads)
    t, _ = _run(FusedSparseAdam, "torch", monkeypatch, grads, w0)
    assert all(torch.equal(a, b) for a, b in zip(c, t))


def test_resumes_from_torch_sparse_adam_state_through_the_checkpoint_form(monkeypatch):
    """Checkpoints store SparseAdam's state_dict as tensors + JSON (recsys.train.step.optimizer_state): one
    written by torch.optim.SparseAdam resumes in FusedSparseAdam, and ours reloads into itself, the
    continuation bitwise equal to the uninterrupted run."""
    w0 = torch.randn(N, D, generator=torch.Generator().manual_seed(4))
    grads = _grads(5)
    full, full_opt = _run(FusedSparseAdam, "c", monkeypatch, grads, w0)
    for writer in (torch.optim.SparseAdam, FusedSparseAdam):
        part, part_opt = _run(writer, "c", monkeypatch, grads[:3], w0)
        tensors, meta = optimizer_state(Optimizers(part_opt, None))
        resumed_opt = FusedSparseAdam([{"params": [part[0]]}, {"params": [part[1]]}], lr=LR)
        load_optimizer_state(Optimizers(resumed_opt, None), tensors, meta)
        for g in grads[3:]:
            part[0].grad, part[1].grad = g, g
            resumed_opt.step()
        if writer is FusedSparseAdam:
            assert all(torch.equal(a, b) for a, b in zip(part, full))
        _check_against_torch(part, resumed_opt, full, full_opt)


def test_lookup_gradient_sum_equals_index_add_bitwise():
    """recsys.embeddings' lookup backward: each row's gradients summed in lookup order, bitwise as index_add_
    (its torch form) does (many repeats of few rows, as for a position table, and rows never looked up)."""
    assert cpu.load() is not None
    g = torch.Generator().manual_seed(6)
    for n_rows, n in ((7, 5_000), (3_000, 2_000)):
        index = torch.randint(0, n_rows - 1, (n,), generator=g)            # the last row is never looked up
        src = torch.randn(n, 16, generator=g) * 10.0 ** torch.randint(-3, 3, (n, 1), generator=g)
        out, ref = torch.zeros(n_rows, 16), torch.zeros(n_rows, 16)
        cpu.index_add_rows(out, index, src)
        reference.index_add_rows(ref, index, src)
        assert torch.equal(out, ref) and not bool(out[-1].any()) and bool(out[index[0]].any())


def test_gradients_it_cannot_update_are_named():
    p = torch.nn.Parameter(torch.zeros(4, 2))
    opt = FusedSparseAdam([p])
    p.grad = torch.ones(4, 2)
    with pytest.raises(RuntimeError, match="dense gradients"):
        opt.step()
    p.grad = torch.sparse_coo_tensor(torch.tensor([[0, 1], [1, 0]]), torch.ones(2), (4, 2))
    with pytest.raises(ValueError, match=r"shape \(4, 2\) has a gradient sparse over 2 dims"):
        opt.step()
    # a checkpoint's state that does not fit its parameter must not reach the C kernel
    opt.load_state_dict({"state": {0: {"step": 1, "exp_avg": torch.zeros(3, 2), "exp_avg_sq": torch.zeros(3, 2)}},
                         "param_groups": opt.state_dict()["param_groups"]})
    p.grad = torch.sparse_coo_tensor(torch.tensor([[3]]), torch.ones(1, 2), (4, 2))
    with pytest.raises(ValueError, match=r"shape \(4, 2\) has exp_avg \(3, 2\)"):
        opt.step()
