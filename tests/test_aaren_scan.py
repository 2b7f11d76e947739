"""Aaren scan: the reference and the Triton kernel against masked causal softmax attention."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

from kernels.aaren_scan.reference import aaren_reduce_reference, aaren_scan_reference, combine, identity

NEG_INF = float("-inf")


def softmax_oracle(s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """o[n, t] = softmax(s[n, :t+1]) @ v[n, :t+1] over unmasked events, 0 if none: plain O(L^2)."""
    L = s.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool).tril()                     # [t, i]
    sc = s[:, None, :].masked_fill(~causal, NEG_INF)                         # [N, t, i]
    empty = torch.isneginf(sc).all(-1, keepdim=True)                        # nothing seen yet -> 0
    p = torch.softmax(sc.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    return p @ v


def random_case(N=4, L=37, D=5, dtype=torch.float64, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(N, L, generator=g) * scale).to(dtype)
    v = torch.randn(N, L, D, generator=g).to(dtype)
    s[1, L // 2:] = NEG_INF      # padded tail
    s[2, :L // 6] = NEG_INF      # nothing seen at first
    s[0, L // 3] = NEG_INF       # a hole
    s[3, :] = NEG_INF            # empty row
    return s, v


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_scan_equals_masked_causal_softmax(dtype, tol):
    s, v = random_case(dtype=dtype)
    o, m, u = aaren_scan_reference(s, v)
    torch.testing.assert_close(o, softmax_oracle(s, v), rtol=tol, atol=tol)
    assert torch.equal(m, torch.cummax(s, 1).values)
    assert torch.equal(o[3], torch.zeros_like(o[3]))


def test_reduce_is_last_element_of_scan():
    s, v = random_case()
    o, m, u = aaren_scan_reference(s, v)
    mr, ur, wr = aaren_reduce_reference(s, v)
    torch.testing.assert_close(mr, m[:, -1], rtol=0, atol=0)
    torch.testing.assert_close(ur, u[:, -1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(wr, o[:, -1] * u[:, -1, None], rtol=1e-12, atol=1e-12)


def _random_state(g, n=6, d=3):
    m = torch.randn(n, generator=g, dtype=torch.float64) * 5
    m[0] = NEG_INF
    u = torch.rand(n, generator=g, dtype=torch.float64) + 0.1
    u[0] = 0.0
    w = torch.randn(n, d, generator=g, dtype=torch.float64)
    w[0] = 0.0
    return m, u, w


def test_combine_is_associative_with_identity():
    g = torch.Generator().manual_seed(1)
    a, b, c = (_random_state(g) for _ in range(3))
    left = combine(combine(a, b), c)
    right = combine(a, combine(b, c))
    for x, y in zip(left, right):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
    e = identity((6,), 3, torch.float64)
    for x, y, z in zip(combine(e, a), combine(a, e), a):
        torch.testing.assert_close(x, z, rtol=0, atol=0)
        torch.testing.assert_close(y, z, rtol=0, atol=0)


def test_reference_gradients_match_softmax_oracle():
    s, v = random_case(L=19)
    s = s.requires_grad_()
    v = v.requires_grad_()
    go = torch.randn(v.shape, dtype=v.dtype, generator=torch.Generator().manual_seed(3))
    got = torch.autograd.grad((aaren_scan_reference(s, v)[0] * go).sum(), (s, v))
    want = torch.autograd.grad((softmax_oracle(s, v) * go).sum(), (s, v))
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_extreme_scores_stay_finite():
    s, v = random_case(dtype=torch.float32, scale=500.0)
    s = s.requires_grad_()
    o, m, u = aaren_scan_reference(s, v)
    assert torch.isfinite(o).all() and torch.isfinite(u).all()
    torch.testing.assert_close(o, softmax_oracle(s.double(), v.double()).float(), rtol=1e-5, atol=1e-5)
    (g,) = torch.autograd.grad(o.sum(), s)
    assert torch.isfinite(g).all()


@pytest.fixture
def triton_scan(monkeypatch):
    """The Triton module decorated in interpreter mode, even if an earlier test imported it without."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    name = "kernels.aaren_scan.triton"
    mod = importlib.reload(sys.modules[name]) if name in sys.modules else importlib.import_module(name)
    assert type(mod._scan_fwd).__name__ == "InterpretedFunction"
    yield mod.aaren_scan_triton
    # leave no interpreter-mode kernels behind for a later CUDA user in this process
    sys.modules.pop(name, None)


@pytest.mark.parametrize("L,D,scale", [(37, 5, 3.0), (70, 20, 3.0), (70, 4, 500.0), (1, 3, 1.0)])
def test_triton_forward_backward_match_reference(triton_scan, L, D, scale):
    s, v = random_case(N=4, L=L, D=D, dtype=torch.float32, scale=scale, seed=L + D)
    s.requires_grad_()
    v.requires_grad_()
    go = torch.randn(v.shape, generator=torch.Generator().manual_seed(7))
    o, m, u = triton_scan(s, v)
    ro, rm, ru = aaren_scan_reference(s, v)
    torch.testing.assert_close(o, ro, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m, rm, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(u, ru, rtol=1e-5, atol=1e-5)
    got = torch.autograd.grad((o * go).sum(), (s, v))
    # with one event the output is v itself: the reference graph never touches s
    want = torch.autograd.grad((ro * go).sum(), (s, v), allow_unused=True, materialize_grads=True)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
