"""Every torch CPU top-k path equals the reference exactly (indices and scores), and so does `retrieval.topk`
wherever it dispatches to them (the fused C kernel's own tests: tests/test_topk_cpu_fused.py)."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

import retrieval
from kernels.topk_attention.reference import pack_keys, topk_reference, unpack_keys
from retrieval.cpu import PATHS, topk_chunked

CASES = [  # layout, rows, L, d, k, segments
    ("serving", 5, 3000, 16, 20, [8, 8]),
    ("serving", 3, 2500, 16, 256, None),
    ("serving", 2, 0, 4, 3, None),
    ("serving", 4, 7, 4, 20, None),        # k > L
    ("training", 4, 2000, 8, 7, [4, 4]),
    ("training", 3, 5, 4, 10, None),
]


def _inputs(layout, rows, L, d, integers, gen):
    """Integer inputs make every score exact in any summation order and produce many ties."""
    def draw(*shape):
        if integers:
            return torch.randint(-2, 3, shape, generator=gen).float()
        return torch.randn(*shape, generator=gen)
    q = draw(rows, d)
    if layout == "serving":
        return q, draw(L, d), max(0, L - 3)
    return q, draw(rows, L, d), torch.randint(0, L + 1, (rows,), generator=gen)


def _run(fn, q, keys, lengths, k, segments):
    if fn is topk_chunked:  # small chunks, so the chunk merge is exercised
        return fn(q, keys, lengths, k, segments, chunk=700)
    return fn(q, keys, lengths, k, segments)


@pytest.mark.parametrize("integers", [False, True])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("path", sorted(PATHS))
def test_cpu_path_equals_reference(path, case, integers):
    layout, rows, L, d, k, segments = case
    q, keys, lengths = _inputs(layout, rows, L, d, integers, torch.Generator().manual_seed(L + k))
    scores, idx = _run(PATHS[path], q, keys, lengths, k, segments)
    ref_scores, ref_idx = topk_reference(q, keys, lengths, k, segments)
    assert torch.equal(idx, ref_idx)
    assert torch.equal(scores, ref_scores)


def test_dispatch_cpu_non_contiguous_half_inputs_no_grad():
    gen = torch.Generator().manual_seed(0)
    keys = torch.randint(-3, 4, (2, 20, 900), generator=gen).to(torch.bfloat16).transpose(1, 2)  # [B, L, d] strided
    q = torch.randint(-3, 4, (20, 2), generator=gen).float().t().requires_grad_()               # [B, d] strided
    lengths = torch.tensor([900, 13])
    # segment scales 1/2 and 1/4: exact in any summation order, so equality does not depend on the CPU
    scores, idx = retrieval.topk(q, keys, lengths, 20, [4, 16])
    ref_scores, ref_idx = topk_reference(q, keys, lengths, 20, [4, 16])
    assert torch.equal(idx, ref_idx)
    assert torch.equal(scores, ref_scores.detach())
    assert not scores.requires_grad


def test_all_ties_pick_lowest_indices():
    q = torch.ones(3, 4)
    keys = torch.ones(5000, 4)
    scores, idx = retrieval.topk(q, keys, 4000, 20)
    assert torch.equal(idx, torch.arange(20).expand(3, 20))
    assert torch.equal(scores, torch.full((3, 20), 2.0))


def test_pack_keys_orders_like_the_reference():
    s = torch.tensor([float("-inf"), -2.5, -0.0, 0.0, 1e-30, 3.0, float("inf"), 3.0])
    i = torch.arange(8)
    keys = pack_keys(s, i)
    order = torch.argsort(keys, descending=True)
    assert torch.equal(order, torch.sort(s, descending=True, stable=True).indices)
    back_s, back_i = unpack_keys(keys)
    assert torch.equal(back_i, i) and torch.equal(back_s, s + 0.0)


def test_bad_lengths_are_named():
    with pytest.raises(ValueError, match="lengths"):
        retrieval.topk(torch.randn(3, 4), torch.randn(3, 10, 4), torch.tensor([1, 2]), 2)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 6), L=st.integers(0, 400), k=st.integers(1, 40), d=st.sampled_from([1, 4, 16]),
    serving=st.booleans(), seed=st.integers(0, 2**16),
)
def test_property_dispatch_equals_reference(rows, L, k, d, serving, seed):
    """Up to 6 queries: the training layout (exact torch paths) and a few serving candidates against a short
    history (the fused kernel). Integer inputs and scales 1/sqrt(d) that are powers of two make every score
    exact in any summation order (d = 5 is not: its scores depend on the BLAS kernel's order, which differs
    between CPUs), so the ties are real ties and every path must break them as the reference does."""
    gen = torch.Generator().manual_seed(seed)
    q, keys, lengths = _inputs("serving" if serving else "training", rows, L, d, True, gen)
    scores, idx = retrieval.topk(q, keys, lengths, k)
    ref_scores, ref_idx = topk_reference(q, keys, lengths, k)
    assert torch.equal(idx, ref_idx) and torch.equal(scores, ref_scores)
    for name, fn in PATHS.items():
        assert torch.equal(_run(fn, q, keys, lengths, k, None)[1], ref_idx), name


def test_dispatch_runs_the_path_it_chooses(monkeypatch):
    """`retrieval.topk` returns exactly what the chosen backend returns (the fixed rule here; the measured
    choice: tests/test_dispatch_autotune.py)."""
    from retrieval import dispatch

    monkeypatch.setenv(dispatch.AUTOTUNE_ENV, "0")
    gen = torch.Generator().manual_seed(5)
    keys = torch.randn(3_000, 16, generator=gen)
    long_keys = torch.randn(dispatch.FUSED_MAX_FEW // 16 + 1, 16, generator=gen)
    many, few = torch.randn(dispatch.FUSED_MIN_ROWS, 16, generator=gen), torch.randn(2, 16, generator=gen)
    for q, k, n in [(many, keys, 2_990), (few, keys, 2_990), (few, long_keys, 16_000)]:
        got, want = retrieval.topk(q, k, n, 20), dispatch.CANDIDATES["serving"][dispatch.choose(q, k, n, 20)](q, k, n, 20)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    q, hist, n = torch.randn(4, 16, generator=gen), torch.randn(4, 900, 16, generator=gen), torch.tensor([900, 5, 0, 400])
    got, want = retrieval.topk(q, hist, n, 20), topk_chunked(q, hist, n, 20)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
