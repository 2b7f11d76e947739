"""Aaren module: parallel forward vs token-by-token step, merge, empty history, layout helper."""

from __future__ import annotations

import pytest
import torch

from recsys.modules.aaren import Aaren, AarenState
from recsys.modules.seq import chronological


def make(n_layers=1, slope=True, d_in=12, seed=0):
    torch.manual_seed(seed)
    model = Aaren(d_in, d_model=16, n_heads=2, n_layers=n_layers, recency_slope=slope)
    # a larger query so that attention is far from uniform and the test can tell positions apart
    for layer in model.layers:
        torch.nn.init.normal_(layer.query, std=2.0)
    return model


def batch(B=5, L=13, d_in=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, d_in, generator=g)
    lengths = torch.tensor([L, 7, 0, 1, 10])[:B]
    x = x.masked_fill(torch.arange(L)[None, :, None] >= lengths[:, None, None], 0.0)
    return x, lengths


def replay(model, x, lengths):
    """Fold events one at a time; returns the final state and the read after every step [B, L, d]."""
    B, L, _ = x.shape
    state = model.init_state(B)
    reads = []
    for t in range(L):
        state = model.step(state, x[:, t], active=t < lengths)
        reads.append(model.read(state))
    return state, torch.stack(reads, 1)


def assert_state_close(a: AarenState, b: AarenState, tol=1e-5):
    torch.testing.assert_close(a.m, b.m, rtol=tol, atol=tol)
    torch.testing.assert_close(a.u, b.u, rtol=tol, atol=tol)
    torch.testing.assert_close(a.w, b.w, rtol=tol, atol=tol)
    torch.testing.assert_close(a.x_last, b.x_last, rtol=tol, atol=tol)
    assert torch.equal(a.n, b.n)


@pytest.mark.parametrize("n_layers,slope", [(1, True), (1, False), (2, True), (3, False)])
@torch.no_grad()
def test_step_equals_parallel_forward(n_layers, slope):
    model = make(n_layers, slope)
    x, lengths = batch()
    state, reads = replay(model, x, lengths)
    all_prefix = model.forward_all(x, lengths)                                # [B, L, d]
    valid = torch.arange(x.shape[1])[None, :] < lengths[:, None]
    torch.testing.assert_close(reads[valid], all_prefix[valid], rtol=1e-5, atol=1e-5)
    summary = model(x, lengths)
    torch.testing.assert_close(model.read(state), summary, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(all_prefix[torch.arange(5), (lengths - 1).clamp(min=0)][lengths > 0],
                               summary[lengths > 0], rtol=1e-5, atol=1e-5)
    assert_state_close(state, model.forward_state(x, lengths))


@torch.no_grad()
def test_empty_history_is_zero_in_forward_and_read():
    model = make(2)
    x, lengths = batch()
    assert torch.equal(model(x, lengths)[2], torch.zeros(16))
    assert torch.equal(model.read(model.init_state(3)), torch.zeros(3, 16))
    assert torch.equal(model.forward_all(x, lengths)[2], torch.zeros(13, 16))


@torch.no_grad()
def test_recency_slope_changes_the_summary():
    x, lengths = batch()
    with_slope = make(1, True)
    without = make(1, False)
    without.load_state_dict({k: v for k, v in with_slope.state_dict().items() if "slope" not in k})
    with_slope.layers[0].slope_raw.fill_(0.5)
    assert not torch.allclose(with_slope(x, lengths)[0], without(x, lengths)[0], atol=1e-3)


@torch.no_grad()
def test_inactive_rows_are_unchanged():
    model = make(2)
    x, lengths = batch()
    state = model.forward_state(x, lengths)
    active = torch.tensor([True, False, True, False, False])
    new = model.step(state, torch.randn(5, 12), active)
    for name in ("m", "u", "w", "x_last", "n"):
        a, b = getattr(new, name), getattr(state, name)
        assert torch.equal(a[~active], b[~active]), name
        assert not torch.equal(a[active], b[active]), name


@pytest.mark.parametrize("slope", [True, False])
@torch.no_grad()
def test_merge_of_split_states_equals_whole(slope):
    model = make(1, slope)
    x, lengths = batch(B=4, L=12)
    lengths = torch.tensor([12, 9, 3, 0])
    split = 5
    la = lengths.clamp(max=split)
    lb = (lengths - split).clamp(min=0)
    xb = torch.nn.functional.pad(x[:, split:], (0, 0, 0, split))
    merged = model.merge(model.forward_state(x[:, :split], la), model.forward_state(xb, lb))
    assert_state_close(merged, model.forward_state(x, lengths))
    torch.testing.assert_close(model.read(merged), model(x, lengths), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="n_layers == 1"):
        make(2).merge(merged, merged)


def test_gradients_flow_to_all_parameters():
    model = make(2)
    x, lengths = batch()
    model(x, lengths).square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_bad_shapes_name_the_field():
    model = make(1)
    with pytest.raises(ValueError, match="x_t"):
        model.step(model.init_state(2), torch.zeros(3, 12))
    with pytest.raises(ValueError, match="active"):
        model.step(model.init_state(2), torch.zeros(2, 12), torch.ones(2))
    with pytest.raises(ValueError, match="lengths"):
        model(torch.zeros(2, 4, 12), torch.tensor([1]))


def test_chronological_reverses_real_events_and_zeroes_padding():
    recent_first = torch.tensor([[3, 2, 1, 0], [5, 4, 0, 0], [0, 0, 0, 0], [9, 8, 7, 6]])
    lengths = torch.tensor([3, 2, 0, 4])
    out = chronological(recent_first, lengths)
    assert torch.equal(out, torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0], [0, 0, 0, 0], [6, 7, 8, 9]]))
    x = torch.randn(4, 4, 3)
    fx = chronological(x, lengths)
    assert torch.equal(fx[0, :3], x[0, [2, 1, 0]]) and torch.equal(fx[0, 3], torch.zeros(3))
    with pytest.raises(ValueError, match="lengths"):
        chronological(x, torch.tensor([5, 0, 0, 0]))
