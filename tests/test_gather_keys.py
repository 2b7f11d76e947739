"""The stage-1 key gather (kernels/gather_keys): the C kernel against its torch form bit for bit (a gather is
a copy, NaN payloads included), bad ids raising before any row is read through them, and
recsys.models.attention.stage1_from_tables the same with the kernel on and off.
"""

from __future__ import annotations

import pytest
import torch

from kernels.gather_keys import cpu, reference


def _fields(g: torch.Generator, L: int, shapes: list[tuple[int, ...]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Tables of `shapes` ([rows, d] or [rows]) and ids [L] into each, with the first and the last row read
    (where L allows)."""
    tables = [torch.randn(*s, generator=g) for s in shapes]
    ids = []
    for t in tables:
        i = torch.randint(0, t.shape[0], (L,), generator=g)
        if L >= 2:
            i[torch.randint(0, L, (1,), generator=g)] = 0
            i[torch.randint(0, L, (1,), generator=g)] = t.shape[0] - 1
        ids.append(i)
    return tables, ids


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32)


SHAPES = [
    [(3_000, 16), (50, 16), (9_000,)],   # DARE's: item, category, the position number per row
    [(3_000, 16), (50, 16)],             # no position column
    [(500, 32), (40,)],                  # the other unrolled layouts (cpu.c's LAYOUT)
    [(20, 64), (7, 64), (9,)],
    [(1, 5), (7, 3), (2, 1), (11,)],     # odd widths, a one-row table: the general loop
    [(100,)],
]


@pytest.mark.parametrize("shapes", SHAPES)
@pytest.mark.parametrize("L", [0, 1, 2, 15, 17, 1_001])
def test_equals_reference_bitwise(shapes, L):
    assert cpu.load() is not None   # a C compiler is there: the kernel must not silently fall back
    g = torch.Generator().manual_seed(L * 7 + len(shapes))
    tables, ids = _fields(g, L, shapes)
    # non-finite values with payloads: a copy keeps their bits, arithmetic would not
    tables[0].view(-1)[:3] = torch.tensor([0x7FC00123, 0x7F800000, -0x00400001], dtype=torch.int32).view(torch.float32)[: tables[0].numel()]
    want = reference.gather_keys(tables, ids)
    assert want.shape == (L, sum(t.shape[1] if t.dim() == 2 else 1 for t in tables))
    assert cpu.supports(tables, ids)
    for ahead in (0, 1, 16, 5_000):   # none, one, the default, past the end
        assert torch.equal(_bits(cpu.gather_keys(tables, ids, ahead)), _bits(want))
    out = torch.full_like(want, float("nan"))
    assert cpu.gather_keys(tables, ids, out=out) is out and torch.equal(_bits(out), _bits(want))


@pytest.mark.parametrize("event", ["first", "middle", "last"])
@pytest.mark.parametrize("bad", ["rows", "negative"])
def test_out_of_range_id_raises_naming_the_field(event, bad):
    g = torch.Generator().manual_seed(3)
    L = 100
    tables, ids = _fields(g, L, SHAPES[0])
    j = {"first": 0, "middle": 40, "last": L - 1}[event]
    for f, t in enumerate(tables):
        bad_ids = [i.clone() for i in ids]
        bad_ids[f][j] = t.shape[0] if bad == "rows" else -1
        with pytest.raises(IndexError, match=rf"ids\[{f}\]\[{j}\] = {int(bad_ids[f][j])} is out of range"):
            cpu.gather_keys(tables, bad_ids)
        with pytest.raises(IndexError):   # torch's form raises the same type
            reference.gather_keys(tables, bad_ids)


def test_falls_back_to_torch_where_the_kernel_does_not_run(monkeypatch):
    g = torch.Generator().manual_seed(5)
    tables, ids = _fields(g, 300, SHAPES[0])
    want = reference.gather_keys(tables, ids)
    strided = [torch.randn(t.shape[0], 32, generator=g)[:, ::2].copy_(t) if t.dim() == 2 else t for t in tables]
    cases = {
        "int32 ids": (tables, [i.int() for i in ids]),
        "strided table": (strided, ids),
        "strided ids": (tables, [torch.stack([i, i], 1)[:, 0] for i in ids]),   # the kernel runs a copy
    }
    for name, (ts, ix) in cases.items():
        assert cpu.supports(ts, ix) == (name == "strided ids"), name
        assert torch.equal(cpu.gather_keys(ts, ix), want), name
    grad = [t.clone().requires_grad_() for t in tables]
    assert not cpu.supports(grad, ids)            # torch's form records (or refuses) what autograd needs
    with torch.no_grad():
        assert cpu.supports(grad, ids)
    monkeypatch.setenv(cpu.SWITCH_ENV, "0")
    assert not cpu.supports(tables, ids) and torch.equal(cpu.gather_keys(tables, ids), want)


@pytest.mark.parametrize("L", [0, 1, 4_097])
def test_stage1_from_tables_same_with_the_kernel_on_and_off(monkeypatch, L):
    """The served search's keys come from the kernel; with it switched off (torch's gather), the same bits."""
    from recsys.models.attention import RowBias, stage1_from_tables

    g = torch.Generator().manual_seed(L)
    d, C = 16, 9
    tables, ids = _fields(g, L, [(3_000, d), (50, d), (900, d)])
    target = [torch.randn(C, d, generator=g) for _ in range(2)] + [tables[2][:1].expand(C, d)]
    assert cpu.supports([*tables[:2], tables[2][:, 0].contiguous()], ids)
    on = stage1_from_tables(target, tables, ids, [2 * d, d], RowBias())
    monkeypatch.setenv(cpu.SWITCH_ENV, "0")
    off = stage1_from_tables(target, tables, ids, [2 * d, d], RowBias())
    assert on[2] == off[2] == [2 * d, 1]
    assert torch.equal(on[0], off[0]) and torch.equal(on[1], off[1]) and on[1].shape == (L, 2 * d + 1)
