"""The serving-layout top-k (`retrieval.serving.topk_shared`) and DARE's serving forward built on it:
exactly the reference's result, ties included, at histories long enough for the pruned path to run."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from kernels.topk_attention.reference import topk_reference
from recsys.config.model import ModelConfig
from recsys.data.batch import HistoryBatch
from recsys.models import build_model
from retrieval.serving import topk_shared


@pytest.mark.parametrize("L", [25, 41, 400, 999, 4_096, 10_007])
@pytest.mark.parametrize("C", [1, 13])
def test_equals_the_reference(L, C):
    g = torch.Generator().manual_seed(L * 31 + C)
    q, keys = torch.randn(C, 12, generator=g), torch.randn(L, 12, generator=g)
    got = topk_shared(q, keys, 20, [8, 4], chunk=3_000)  # several chunks at the larger L
    want = topk_reference(q, keys, L, 20, [8, 4])
    assert torch.equal(got[1], want[1])
    assert torch.equal(got[0], want[0])  # the reference's own arithmetic: bit-identical scores


@pytest.mark.parametrize("L", [300, 5_000])
def test_ties_across_the_cut_keep_the_reference_order(L):
    """Scores from {-1, 0, 1} vectors tie in crowds: the k-th score is shared by entries inside and
    outside the kept blocks, so the exactness check must send rows to the plain path (ties -> lower index)."""
    g = torch.Generator().manual_seed(L)
    q = torch.randint(-1, 2, (40, 3), generator=g).float()
    keys = torch.randint(-1, 2, (L, 3), generator=g).float()
    got = topk_shared(q, keys, 16, [2, 1], chunk=2_048)
    want = topk_reference(q, keys, L, 16, [2, 1])
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    cut = topk_reference(q, keys, L, 17, [2, 1])[0]
    assert cut[:, 15].eq(cut[:, 16]).all()  # every row ties across the cut: the check must catch each


def test_k_above_the_history_pads_like_the_reference():
    q, keys = torch.randn(5, 6), torch.randn(7, 6)
    got, want = topk_shared(q, keys, 10), topk_reference(q, keys, 7, 10)
    assert torch.equal(got[1], want[1]) and (got[1][:, 7:] == -1).all()


@pytest.mark.parametrize("name,aux", [("dare", False), ("dare", True), ("twin", True)])
def test_serving_forward_equals_the_batch_forward_on_a_long_history(name, aux):
    """L = 3,000: the pruned search runs (tests/test_models.py covers short histories and branches)."""
    L, C = 3_000, 24
    torch.manual_seed(0)
    m = build_model(ModelConfig(name=name, max_len=L, aux_loss=aux, init_std=0.3, mlp=[16]), 5_000, 50).eval()
    hist_item, hist_cate = torch.randint(1, 5_000, (L,)), torch.randint(1, 50, (L,))
    cand_item, cand_cate = torch.randint(1, 5_000, (C,)), torch.randint(1, 50, (C,))
    rows = HistoryBatch(user=torch.zeros(C, dtype=torch.int64), target_item=cand_item, target_cate=cand_cate,
                        hist_item=hist_item.expand(C, L).clone(), hist_cate=hist_cate.expand(C, L).clone(),
                        hist_pos=torch.arange(1, L + 1).expand(C, L).clone(), hist_len=torch.full((C,), L),
                        label=torch.zeros(C))
    with torch.no_grad():
        want = m(rows)
        got = m.score_candidates(hist_item, hist_cate, cand_item, cand_cate)
    assert torch.equal(got.indices, want.indices)
    torch.testing.assert_close(got.logit, want.logit, rtol=1e-5, atol=1e-6)
    if aux:
        torch.testing.assert_close(got.aux_logit, want.aux_logit, rtol=1e-5, atol=1e-6)
    # and a shorter history of the same model: the rows' own length, not max_len
    short = replace(rows, hist_len=torch.full((C,), 700))
    with torch.no_grad():
        want = m(short)
        got = m.score_candidates(hist_item[:700], hist_cate[:700], cand_item, cand_cate)
    assert torch.equal(got.indices, want.indices)
    torch.testing.assert_close(got.logit, want.logit, rtol=1e-5, atol=1e-6)


def test_served_position_bias_is_kept_per_table_and_follows_reloads_and_edits():
    """The serving forward keeps the folded position field per table row across requests (DARE.position_bias):
    a reload (load_state_dict) or an in-place edit of the position table must refresh it, and a copy of the
    model must not carry it; every result bit-identical to a model computing it afresh."""
    import copy

    L, C = 2_000, 9
    cfg = ModelConfig(max_len=L, init_std=0.3, mlp=[16])

    def served(seed: int):
        torch.manual_seed(seed)
        m = build_model(cfg, 3_000, 40).eval()
        m.aux_mlp = None                                   # as service.model_state serves it
        return m

    a, b = served(0), served(1)
    hist_item, hist_cate = torch.randint(1, 3_000, (L,)), torch.randint(1, 40, (L,))
    cand_item, cand_cate = torch.randint(1, 3_000, (C,)), torch.randint(1, 40, (C,))

    def score(m):
        with torch.inference_mode():                       # as service.scoring runs it
            return m.score_candidates(hist_item, hist_cate, cand_item, cand_cate)

    def same(x, y):
        return torch.equal(x.logit, y.logit) and torch.equal(x.indices, y.indices)

    first = score(a)
    entry = a.position_bias._entry
    assert entry is not None and same(score(a), first) and a.position_bias._entry is entry   # kept, same numbers
    want = score(b)
    a.load_state_dict(b.state_dict())
    reloaded = score(a)
    assert a.position_bias._entry is not entry and same(reloaded, want) and not same(reloaded, first)
    with torch.no_grad():                                  # row 0 (the targets', so the query) unchanged
        a.att_tables.weights()["att_pos"][1:] *= -1.0
    edited = score(a)
    fresh = copy.deepcopy(a)
    assert fresh.position_bias._entry is None
    assert same(edited, score(fresh)) and not torch.equal(edited.indices, reloaded.indices)
    with torch.no_grad():                                  # outside inference mode, reading the kept entry
        assert same(a.score_candidates(hist_item, hist_cate, cand_item, cand_cate), edited)
