"""DARE / TWIN / DIN on real benchmark rows: shapes, masking, the search, coupling, serving, learning."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recsys.config.model import ModelConfig
from recsys.config.train import TrainConfig
from recsys.data.sequences import assemble, load_dataset
from recsys.metrics import auc
from recsys.models import build_model
from recsys.train.step import make_optimizers, train_step

SMALL = dict(dim_att=4, dim_rep=6, top_k=8, max_len=30, mlp=[12])


@pytest.fixture(scope="module")
def data(bench_dir):
    return load_dataset(bench_dir, splits=("train",))


@pytest.fixture(scope="module")
def batch(data):
    s = data.splits["train"]
    # histories shorter than k (the protocol's minimum is 5 events) and longer than L
    rows = np.r_[np.flatnonzero(s.pos == 5)[:4], np.flatnonzero(s.pos > 40)[:12]]
    return assemble(data.store, s, rows, 30)


def _model(name, data, seed=0, **kw):
    torch.manual_seed(seed)
    return build_model(ModelConfig(name=name, **(SMALL | kw)), data.n_items, data.n_cates)


@pytest.mark.parametrize("name", ["dare", "twin", "din"])
def test_shapes_and_padding_is_masked(name, data, batch):
    m = _model(name, data).eval()
    out = m(batch)
    B = batch.batch_size
    assert out.logit.shape == (B,)
    if name == "din":
        assert out.aux_logit is None and out.indices is None
    else:
        assert out.aux_logit.shape == (B,) and out.indices.shape == (B, 8)
        n = batch.hist_len[:, None]
        slot = torch.arange(8)[None, :]
        assert ((out.indices >= 0) == (slot < n)).all(), "a padding slot was selected or a real slot left empty"
        assert (out.indices < n).all()
    # what sits in the padding columns must not matter
    noisy = batch.hist_item.clone()
    pad = ~batch.hist_mask
    noisy[pad] = torch.randint(1, data.n_items, (int(pad.sum()),))
    from dataclasses import replace

    out2 = m(replace(batch, hist_item=noisy, hist_cate=torch.where(pad, 3, batch.hist_cate)))
    torch.testing.assert_close(out2.logit, out.logit)
    if name != "din":
        assert torch.equal(out2.indices, out.indices)


def test_search_is_the_split_scaled_brute_force_top_k(data, batch):
    """Hand computation: <q_sem,k_sem>/sqrt(2 d_a) + <q_pos,k_pos>/sqrt(d_a) from the raw tables, sorted."""
    m = _model("dare", data).eval()
    w = m.att_tables.weights()
    d = 4
    q_sem = torch.cat([w["att_item"][batch.target_item], w["att_cate"][batch.target_cate]], -1)   # [B, 2d]
    q_pos = w["att_pos"][torch.zeros_like(batch.target_item)]                                      # [B, d]
    k_sem = torch.cat([w["att_item"][batch.hist_item], w["att_cate"][batch.hist_cate]], -1)       # [B, L, 2d]
    k_pos = w["att_pos"][batch.hist_pos]                                                           # [B, L, d]
    s = (k_sem @ q_sem.unsqueeze(-1)).squeeze(-1) / math.sqrt(2 * d) + (k_pos @ q_pos.unsqueeze(-1)).squeeze(-1) / math.sqrt(d)
    idx = m(batch).indices
    for b in range(batch.batch_size):
        n = int(batch.hist_len[b])
        order = sorted(range(n), key=lambda j: (-float(s[b, j]), j))[:8]
        got = [int(i) for i in idx[b] if i >= 0]
        assert got == order, f"row {b}"


def test_twin_equals_dare_with_tied_tables(data, batch):
    twin = _model("twin", data, seed=1, dim_att=6).eval()
    dare = _model("dare", data, seed=2, dim_att=6).eval()
    tw = twin.tables.weights()
    dare.att_tables.load_weights({f"att_{f}": tw[f] for f in ("item", "cate", "pos")})
    dare.rep_tables.load_weights({f"rep_{f}": tw[f] for f in ("item", "cate", "pos")})
    dare.mlp.load_state_dict(twin.mlp.state_dict())
    dare.aux_mlp.load_state_dict(twin.aux_mlp.state_dict())
    a, b = dare(batch), twin(batch)
    torch.testing.assert_close(a.logit, b.logit)
    torch.testing.assert_close(a.aux_logit, b.aux_logit)
    assert torch.equal(a.indices, b.indices)
    # and untied they differ (the comparison above can fail)
    assert not torch.allclose(_model("dare", data, seed=2, dim_att=6).eval()(batch).logit, b.logit)


def test_only_the_kept_events_get_attention_gradient_without_aux_head(data, batch):
    """Stage 1 is a hard choice: without the auxiliary head only the k kept events' attention rows learn."""
    for aux, expect_all in ((False, False), (True, True)):
        m = _model("dare", data, aux_loss=aux, embedding_backend="dense").train()
        out = m(batch)
        (out.logit.sum() + (out.aux_logit.sum() if aux else 0)).backward()
        g = m.att_tables.collection.ec.embeddings["att_pos"].weight.grad   # position rows = history columns + 1
        kept = torch.unique(out.indices[out.indices >= 0]) + 1
        got = torch.nonzero(g.abs().sum(1) > 0).flatten()
        if expect_all:
            assert set(got.tolist()) >= set(range(1, 31))
        else:
            assert set(got.tolist()) <= set(kept.tolist()) | {0}


@pytest.mark.parametrize("name", ["dare", "twin", "din"])
def test_serving_entry_point_equals_batch_forward(name, data, batch):
    m = _model(name, data)
    opt = make_optimizers(m, TrainConfig())
    for _ in range(2):  # move BatchNorm statistics and weights off their initial values
        train_step(m, batch, opt, 1.0)
    m.eval()
    b = int(torch.argmax(batch.hist_len))
    L = int(batch.hist_len[b])
    C = 7
    cand_item = torch.randint(1, data.n_items, (C,))
    cand_cate = torch.randint(1, data.n_cates, (C,))
    from dataclasses import replace

    rep = lambda x: x[b : b + 1].expand(C, *x.shape[1:]).clone()  # noqa: E731
    rows = replace(batch, user=rep(batch.user), target_item=cand_item, target_cate=cand_cate, hist_item=rep(batch.hist_item),
                   hist_cate=rep(batch.hist_cate), hist_pos=rep(batch.hist_pos), hist_len=rep(batch.hist_len), label=torch.zeros(C))
    want = m(rows)
    got = m.score_candidates(batch.hist_item[b, :L], batch.hist_cate[b, :L], cand_item, cand_cate)
    torch.testing.assert_close(got.logit, want.logit, rtol=1e-5, atol=1e-6)
    if name != "din":
        assert torch.equal(got.indices, want.indices)
        torch.testing.assert_close(got.aux_logit, want.aux_logit, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="max_len"):
        m.score_candidates(torch.ones(31, dtype=torch.long), torch.ones(31, dtype=torch.long), cand_item, cand_cate)
    if name != "din":   # served without the auxiliary head (service.model_state drops it): the same logits
        m.aux_mlp = None
        served = m.score_candidates(batch.hist_item[b, :L], batch.hist_cate[b, :L], cand_item, cand_cate)
        assert torch.equal(served.logit, got.logit) and torch.equal(served.indices, got.indices)


@pytest.mark.parametrize("name", ["dare", "din"])
def test_tiny_model_overfits_a_tiny_real_subset(name, data):
    s = data.splits["train"]
    rows = np.arange(0, 20_000, 40)  # 500 real rows from many users
    b = assemble(data.store, s, rows, 30)
    m = _model(name, data)
    opt = make_optimizers(m, TrainConfig(lr=0.01, embedding_lr=0.02))
    for _ in range(120):
        train_step(m, b, opt, 1.0)
    m.eval()
    with torch.no_grad():
        p = torch.sigmoid(m(b).logit).numpy()
    assert auc(b.label.numpy(), p) > 0.95


def test_optional_branches_join_the_tower_and_serve_like_the_batch(data, batch):
    """aaren / titans flags: the summaries widen the MLP input, learn, and serving from the user's streamed
    states equals the batch forward over the user's timeline."""
    from recsys.data.sequences import Samples
    from recsys.models.dare import MemoryReads
    from recsys.modules import state_codec

    for flags in ({"aaren": True}, {"titans": True}, {"aaren": True, "titans": True}):
        m = _model("dare", data, **flags)
        branches = [x for x in (m.aaren, m.titans) if x is not None]
        assert m.mlp.net[0].in_features == 9 * 6 + sum(x.d_out for x in branches)
        assert all(x.d_in == 2 * 6 for x in branches)  # item + category representations, no position
        opt = make_optimizers(m, TrainConfig())
        before = [p.detach().clone() for x in branches for p in x.parameters()]
        train_step(m, batch, opt, 1.0)
        assert all(not torch.equal(a, p) for a, p in zip(before, (p for x in branches for p in x.parameters())))
        m.eval()
        b = int(torch.argmax(batch.hist_len))
        L = int(batch.hist_len[b])
        C = 3
        ci, cc = batch.target_item[:C].clone(), batch.target_cate[:C].clone()
        u, pos = int(batch.user[b]), int(batch.timeline().row_prefix[b])
        rows = Samples(np.full(C, u), np.full(C, pos), ci.numpy(), cc.numpy(), np.zeros(C, np.float32))
        want = m(assemble(data.store, rows, np.arange(C), 30)).logit
        # the user's states, streamed one event at a time over the events before the target
        item, cate, _ = data.store.user_events(u)
        with torch.no_grad():
            x = m.memory_features(torch.from_numpy(item[:pos]), torch.from_numpy(cate[:pos]), grad=False)
            sa = m.aaren.init_state(1) if m.aaren is not None else None
            st = m.titans.init_state(1) if m.titans is not None else None
            for t in range(pos):
                sa = m.aaren.step(sa, x[t:t + 1]) if sa is not None else None
                st = m.titans.step(st, x[t:t + 1]) if st is not None else None
            sa, st = (None if s_ is None else state_codec.split(s_)[0] for s_ in (sa, st))
        memory = MemoryReads.from_states(m, sa, st)
        got = m.score_candidates(batch.hist_item[b, :L], batch.hist_cate[b, :L], ci, cc, memory)
        torch.testing.assert_close(got.logit, want, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="memory"):
            m.score_candidates(batch.hist_item[b, :L], batch.hist_cate[b, :L], ci, cc)
    with pytest.raises(NotImplementedError, match="titans"):
        _model("din", data, titans=True)


def test_attention_weights_are_a_softmax_over_the_kept_events(bench_dataset):
    """Explanation weights: one distribution per row over the retrieved events, zero on empty slots."""
    import numpy as np
    import torch

    from recsys.config.model import ModelConfig
    from recsys.data.sequences import assemble
    from recsys.models import build_model

    ds = bench_dataset
    model = build_model(ModelConfig(name="dare", dim_att=4, dim_rep=4, top_k=8, max_len=20, mlp=[8]), ds.n_items, ds.n_cates).eval()
    batch = assemble(ds.store, ds.splits["test"], np.arange(0, 3000, 100), 20)
    w = model.attention_weights(batch)
    idx = model(batch).indices
    assert w.shape == idx.shape
    assert torch.allclose(w.sum(-1), torch.ones(len(w)), atol=1e-6)
    assert (w[idx < 0] == 0).all() and (w[idx >= 0] > 0).all()


def _one_block(m, b):
    """The plain forward: every row padded to the batch's longest history, no grouping."""
    from recsys.models import ModelOutput
    from recsys.models.layers import ctr_input

    if m.config.name == "din":
        v_t, e = m._embed({"item": b.target_item, "cate": b.target_cate}, {"item": b.hist_item, "cate": b.hist_cate})
        return ModelOutput(m.mlp(ctr_input(v_t, m.attend(v_t, e, b.hist_mask))).squeeze(-1), None, None)
    target = {"item": b.target_item, "cate": b.target_cate, "pos": torch.zeros_like(b.target_item)}
    memory = m.memory_reads(b) if m.has_memory else None
    return m.heads(target, {"item": b.hist_item, "cate": b.hist_cate, "pos": b.hist_pos}, b.hist_len, memory)


@pytest.mark.parametrize("name,flags", [("dare", {}), ("twin", {}), ("din", {}), ("dare", {"aaren": True, "titans": True})])
def test_length_groups_give_the_one_padded_block_results(name, flags, data):
    """Processing rows in length groups (each padded to its own longest history) is the same function as
    the whole [B, L] block: logits, retrieved columns and every gradient, with BatchNorm in train mode."""
    s = data.splits["train"]
    rows = np.r_[np.flatnonzero(s.pos == 5)[:6], np.flatnonzero(s.pos == 12)[:6], np.flatnonzero(s.pos > 60)[:12]]
    rows = np.random.default_rng(0).permutation(rows)
    b = assemble(data.store, s, rows, 60)
    assert int(b.hist_len.min()) < 8 < 60 == b.max_len
    runs = []
    for grouped in (True, False):
        m = _model(name, data, max_len=60, group_rows=5, **flags)
        out = m(b) if grouped else _one_block(m, b)
        loss = out.logit.sum() + (out.aux_logit.sum() if out.aux_logit is not None else 0)
        loss.backward()
        grads = {n: p.grad.to_dense() if p.grad.is_sparse else p.grad for n, p in m.named_parameters() if p.grad is not None}
        runs.append((out, grads))
    (grouped, g1), (whole, g2) = runs
    torch.testing.assert_close(grouped.logit, whole.logit, rtol=1e-5, atol=1e-6)
    if whole.indices is not None:
        assert torch.equal(grouped.indices, whole.indices)
        torch.testing.assert_close(grouped.aux_logit, whole.aux_logit, rtol=1e-5, atol=1e-6)
    assert g1.keys() == g2.keys() and len(g1) > 3
    # atol: a bias right before BatchNorm has a gradient of exactly 0 in theory, float noise in practice.
    # With Aaren and Titans the first MLP layer's gradient also carries the memory's second-order terms:
    # 2.3e-6 of the largest gradient between the two paddings on one CPU (its BLAS kernels), under 1e-6 on
    # another; a wrong grouping differs by O(1).
    atol = (1e-5 if flags else 1e-6) * max(float(g.abs().max()) for g in g2.values())
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], rtol=1e-4, atol=atol, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("layout", ["serving", "training"])
def test_stage1_position_fold_equals_the_split_scaled_search(layout):
    """Stage 1 folds the position segment into one key column (every target at position 0): the same top k
    as the reference on the unfolded [item, category, position] keys, scores equal to fp32 rounding; a
    query set whose position rows differ is searched unfolded."""
    from kernels.topk_attention.reference import topk_reference
    from recsys.models.attention import stage1_inputs

    g = torch.Generator().manual_seed(3)
    C, L, d = 9, 700, 16
    shape = (L, d) if layout == "serving" else (C, L, d)
    target = [torch.randn(C, d, generator=g), torch.randn(C, d, generator=g), torch.randn(1, d, generator=g).expand(C, d)]
    events = [torch.randn(*shape, generator=g) for _ in range(3)]
    lengths = L if layout == "serving" else torch.randint(1, L + 1, (C,), generator=g)
    q, x, segs = stage1_inputs(target, events, [2 * d, d])
    assert segs == [2 * d, 1] and q.shape[-1] == x.shape[-1] == 2 * d + 1
    want_s, want_i = topk_reference(torch.cat(target, -1), torch.cat(events, -1), lengths, 20, [2 * d, d])
    got_s, got_i = topk_reference(q, x, lengths, 20, segs)
    assert torch.equal(got_i, want_i)
    torch.testing.assert_close(got_s, want_s, rtol=1e-5, atol=1e-5)
    import retrieval

    assert torch.equal(retrieval.topk(q, x, lengths, 20, segs)[1], want_i)
    target[-1] = torch.randn(C, d, generator=g)                 # per-target position rows: no fold
    q, x, segs = stage1_inputs(target, events, [2 * d, d])
    assert segs == [2 * d, d] and torch.equal(q, torch.cat(target, -1))


def test_stage1_from_tables_equals_stage1_inputs_on_the_gathered_rows():
    """Serving builds the search's keys straight from the tables; the numbers are the ones stage1_inputs makes
    from the gathered rows, bit for bit (the block index and the batch forward search those)."""
    from recsys.models.attention import stage1_from_tables, stage1_inputs

    g = torch.Generator().manual_seed(4)
    d, L, C = 16, 5_000, 11
    tables = [torch.randn(rows, d, generator=g) for rows in (3_000, 50, 9_000)]
    ids = [torch.randint(0, t.shape[0], (L,), generator=g) for t in tables]
    for shared in (True, False):
        target = [torch.randn(C, d, generator=g) for _ in range(2)]
        target.append(tables[2][:1].expand(C, d) if shared else torch.randn(C, d, generator=g))
        got = stage1_from_tables(target, tables, ids, [2 * d, d])
        want = stage1_inputs(target, [t.index_select(0, i) for t, i in zip(tables, ids)], [2 * d, d])
        assert got[2] == want[2] == ([2 * d, 1] if shared else [2 * d, d])
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_serving_folds_the_towers_batchnorm_into_its_linears():
    """ServingModel's towers: BatchNorm folded into the Linear before it, the same function within float32
    rounding of the tower with BatchNorm (running statistics far from 0 / 1, so a wrong fold shows)."""
    import copy

    from recsys.models.layers import MLP, fold_batchnorm
    from service.model_state import ServingModel

    torch.manual_seed(3)
    tower = MLP(10, [16, 8])
    for bn in [m for m in tower.net if isinstance(m, torch.nn.BatchNorm1d)]:
        bn.running_mean.uniform_(-2, 2)
        bn.running_var.uniform_(0.1, 4)
        bn.weight.data.uniform_(0.5, 2)
        bn.bias.data.uniform_(-1, 1)
    with pytest.raises(ValueError, match="training mode"):
        fold_batchnorm(tower)
    tower.eval()
    x = torch.randn(64, 10)
    want = tower(x)
    folded = copy.deepcopy(tower)
    assert fold_batchnorm(folded) == 2
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in folded.modules())
    torch.testing.assert_close(folded(x), want, rtol=1e-5, atol=1e-6)

    model = build_model(ModelConfig(name="dare", aux_loss=False, **SMALL), 50, 6).eval()
    g = torch.Generator().manual_seed(0)
    hist_item, hist_cate = torch.randint(1, 50, (30,), generator=g), torch.randint(1, 6, (30,), generator=g)
    cand_item, cand_cate = torch.randint(1, 50, (9,), generator=g), torch.randint(1, 6, (9,), generator=g)
    for bn in [m for m in model.mlp.net if isinstance(m, torch.nn.BatchNorm1d)]:
        bn.running_mean.uniform_(-1, 1, generator=g)
        bn.running_var.uniform_(0.5, 2, generator=g)
    want = model.score_candidates(hist_item, hist_cate, cand_item, cand_cate)
    served = ServingModel(copy.deepcopy(model), "fold-v1", 50, 6, 30).model
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in served.modules())
    got = served.score_candidates(hist_item, hist_cate, cand_item, cand_cate)
    assert torch.equal(got.indices, want.indices)
    torch.testing.assert_close(got.logit, want.logit, rtol=1e-5, atol=1e-6)
