"""Stage 2's attention over the kept events (kernels/kept_attention): the C kernel and its torch form both
against the same function computed in float64 (the two sum in different orders, so neither is the other's
bits: each is held to float32 rounding of the exact value), holes and rows without events, bad ids raising
before any row is read through them, and the served DARE scores the same with the kernel on and off.
"""

from __future__ import annotations

import pytest
import torch

from kernels.kept_attention import cpu, reference


def _inputs(g: torch.Generator, C: int, k: int, att_shapes, rep_shapes, holes: float = 0.25):
    att = [torch.randn(*s, generator=g) for s in att_shapes]
    rep = [torch.randn(*s, generator=g) for s in rep_shapes]
    rows = [min(a.shape[0], r.shape[0]) for a, r in zip(att, rep)]
    ids = [torch.randint(0, n, (C * k,), generator=g) for n in rows]
    for i, n in zip(ids, rows):   # the first and the last row read
        if C * k >= 2:
            i[0], i[-1] = 0, n - 1
    valid = torch.rand(C, k, generator=g) >= holes
    if C >= 2:
        valid[1] = False          # a target whose search kept nothing
    dq = sum(1 if a.dim() == 1 else a.shape[1] for a in att)
    return torch.randn(C, dq, generator=g), att, rep, ids, valid


def _exact(query, att, rep, ids, valid) -> torch.Tensor:
    """The function in float64, step by step as the docstring states it."""
    C, k = valid.shape
    col = lambda t: t.double().unsqueeze(1) if t.dim() == 1 else t.double()  # noqa: E731
    keys = torch.cat([col(t)[i] for t, i in zip(att, ids)], 1).view(C, k, -1)
    reps = torch.cat([col(t)[i] for t, i in zip(rep, ids)], 1).view(C, k, -1)
    s = (keys * query.double().unsqueeze(1)).sum(-1).masked_fill(~valid, float("-inf"))
    w = torch.nan_to_num(torch.softmax(s, -1), nan=0.0)
    return (w.unsqueeze(-1) * reps).sum(1)


SHAPES = [
    ([(3_000, 16), (50, 16), (9_000,)], [(3_000, 16), (50, 16), (9_000, 16)]),   # DARE's folded keys
    ([(300, 32), (50, 32), (900,)], [(300, 16), (50, 16), (900, 16)]),           # another unrolled layout
    ([(300, 16), (50, 8), (900,)], [(300, 16), (50, 16), (900, 16)]),            # DARE's but for one width
    ([(400, 32), (40,)], [(400, 8), (40, 24)]),
    ([(30, 20), (7, 3), (11,)], [(30, 1), (7, 5), (11, 17)]),                     # widths off the 16 lanes
]


@pytest.mark.parametrize("shapes", SHAPES)
@pytest.mark.parametrize("C,k", [(1, 1), (3, 20), (200, 20), (17, 33)])
def test_kernel_and_reference_equal_the_float64_function(shapes, C, k):
    assert cpu.load() is not None   # a C compiler is there: the kernel must not silently fall back
    g = torch.Generator().manual_seed(C * 31 + k)
    query, att, rep, ids, valid = _inputs(g, C, k, *shapes)
    assert cpu.supports(query, att, rep, ids, valid)
    want = _exact(query, att, rep, ids, valid).float()
    got, ref = cpu.attend(query, att, rep, ids, valid), reference.attend(query, att, rep, ids, valid)
    assert got.shape == ref.shape == (C, sum(1 if r.dim() == 1 else r.shape[1] for r in rep))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ref, want, rtol=1e-5, atol=1e-6)
    if C >= 2:   # no event: exactly 0, not the mean of the holes' rows
        assert torch.equal(got[1], torch.zeros_like(got[1])) and torch.equal(ref[1], got[1])
    for ahead in (1, 5_000):   # the prefetch distance changes no bit
        assert torch.equal(cpu.attend(query, att, rep, ids, valid, ahead=ahead), got)


def test_holes_weigh_nothing_whatever_their_rows():
    g = torch.Generator().manual_seed(5)
    query, att, rep, ids, valid = _inputs(g, 40, 20, *SHAPES[0])
    moved = [i.clone() for i in ids]
    for i, t in zip(moved, att):
        i[~valid.flatten()] = torch.randint(0, t.shape[0], (int((~valid).sum()),), generator=g)
    assert torch.equal(cpu.attend(query, att, rep, moved, valid), cpu.attend(query, att, rep, ids, valid))


@pytest.mark.parametrize("table", ["attention", "representation"])
@pytest.mark.parametrize("bad", [-1, 10**9])
def test_a_bad_id_raises_naming_the_table_and_the_slot(table, bad):
    g = torch.Generator().manual_seed(9)
    query, att, rep, ids, valid = _inputs(g, 4, 5, *SHAPES[3])
    if table == "representation":   # a representation table shorter than the attention one; the id in range
        rep = [rep[0][:100].contiguous(), rep[1]]   # of the attention table only (-1 is out of both: attention's)
        ids[0] %= 100
        bad = 300 if bad > 0 else bad
        table = "representation" if bad > 0 else "attention"
    ids[0][13] = bad
    with pytest.raises(IndexError, match=rf"ids\[0\]\[13\] = {bad} \(target 2, slot 3\) is out of range for field 0's {table}"):
        cpu.attend(query, att, rep, ids, valid)


def test_the_switch_and_autograd_keep_the_reference(monkeypatch):
    g = torch.Generator().manual_seed(11)
    query, att, rep, ids, valid = _inputs(g, 8, 6, *SHAPES[0])
    want = reference.attend(query, att, rep, ids, valid)
    monkeypatch.setenv(cpu.SWITCH_ENV, "0")
    assert not cpu.supports(query, att, rep, ids, valid)
    assert torch.equal(cpu.attend(query, att, rep, ids, valid), want)
    monkeypatch.delenv(cpu.SWITCH_ENV)
    att[0].requires_grad_(True)
    assert not cpu.supports(query, att, rep, ids, valid)
    with torch.no_grad():
        assert cpu.supports(query, att, rep, ids, valid)


def test_served_dare_scores_with_the_kernel_on_and_off(monkeypatch):
    """The served forward (stage 2 through folded_kept_attention) within rounding of itself on the torch form,
    and the kernel really ran (its calls counted)."""
    from recsys.config.model import ModelConfig
    from recsys.models import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(max_len=300, aux_loss=False), 500, 20).eval()   # served: no aux head
    g = torch.Generator().manual_seed(1)
    hist_item, hist_cate = torch.randint(1, 500, (300,), generator=g), torch.randint(1, 20, (300,), generator=g)
    cand_item, cand_cate = torch.randint(1, 500, (64,), generator=g), torch.randint(1, 20, (64,), generator=g)
    calls = []
    real = cpu.load().kept_attention_f32
    monkeypatch.setattr(cpu, "load", lambda: type("Lib", (), {"kept_attention_f32": lambda *a: calls.append(1) or real(*a)}))
    on = model.score_candidates(hist_item, hist_cate, cand_item, cand_cate)
    assert calls, "the served stage 2 did not run the kernel"
    monkeypatch.setenv(cpu.SWITCH_ENV, "0")
    off = model.score_candidates(hist_item, hist_cate, cand_item, cand_cate)
    assert torch.equal(on.indices, off.indices)
    torch.testing.assert_close(on.logit, off.logit, rtol=1e-5, atol=1e-6)
