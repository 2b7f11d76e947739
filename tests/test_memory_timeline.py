"""Memory branches on timelines: each user's memory runs once over its chronological events and every row
reads it just before its target. Checked against the streaming loop (the state after events 1..t, folded
one event at a time, is what serving stores), and for causality: no row sees its own or a later event."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recsys.config.model import ModelConfig
from recsys.data.sequences import SequenceStore, Samples, assemble
from recsys.models import build_model
from recsys.models.dare import MemoryReads
from recsys.modules.titans import NeuralMemory

CHUNK = 4


def _ragged(seed: int, lengths: list[int], d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> x [N, d] (CSR: the users' events one after another), offsets [U + 1]."""
    g = torch.Generator().manual_seed(seed)
    offsets = torch.tensor([0] + lengths).cumsum(0)
    return torch.randn(int(offsets[-1]), d, generator=g), offsets


def test_titans_prefix_reads_equal_the_streamed_state_at_every_prefix():
    torch.manual_seed(0)
    mem = NeuralMemory(d_in=6, d_key=8, d_hidden=8, chunk_size=CHUNK, d_query=5).eval()
    x, offsets = _ragged(1, [0, 3, 4, 9, 17, 8], 6)
    lengths = offsets[1:] - offsets[:-1]
    # every prefix of every user, rows in shuffled order (a user's rows need not be adjacent)
    rows = [(u, p) for u in range(len(lengths)) for p in range(int(lengths[u]) + 1)]
    rows = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]
    row_user = torch.tensor([u for u, _ in rows])
    row_prefix = torch.tensor([p for _, p in rows])
    q = torch.randn(len(rows), 5)
    with torch.no_grad():
        got = mem.read_memory(mem.prefix_weights(x, offsets, row_user, row_prefix), q)
        for i, (u, p) in enumerate(rows):
            state = mem.init_state(1)
            for t in range(p):
                state = mem.step(state, x[int(offsets[u]) + t][None])
            torch.testing.assert_close(got[i:i + 1], mem.read(state, q[i:i + 1]), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="exceeds"):
        mem.prefix_weights(x, offsets, torch.tensor([1]), torch.tensor([4]))



def test_titans_prefix_reads_gradients_equal_a_run_per_row():
    """Training's one run per user (the chunk loop as one autograd node with its backward written out)
    gives every parameter and every event the gradient that a separate run per row gives (float64: the
    same function, summed in another order)."""
    torch.manual_seed(0)
    # no backprop clip: clipping a sum is not the sum of the clipped runs (its own test: tests/test_titans.py)
    mem = NeuralMemory(d_in=6, d_key=8, d_hidden=8, chunk_size=CHUNK, d_query=5, max_lr=1.0,
                       backprop_clip=float("inf")).double()
    x, offsets = _ragged(2, [0, 3, 9, 17, 13], 6)
    x = x.double().requires_grad_()
    row_user = torch.tensor([1, 2, 2, 3, 3, 3, 4, 4])
    row_prefix = torch.tensor([3, 4, 9, 0, 8, 17, 13, 5])
    q = torch.randn(len(row_user), 5, dtype=torch.float64)
    leaves = [x] + list(mem.parameters())
    got = torch.autograd.grad(mem.read_memory(mem.prefix_weights(x, offsets, row_user, row_prefix), q).sum(), leaves,
                              allow_unused=True)
    per_row = []
    for i, (u, p) in enumerate(zip(row_user.tolist(), row_prefix.tolist())):
        events = x[int(offsets[u]):int(offsets[u]) + p][None]
        per_row.append(mem(events, torch.tensor([p]), q[i:i + 1]))
    want = torch.autograd.grad(torch.cat(per_row).sum(), leaves, allow_unused=True)
    for (name, a, b) in zip(["x"] + [n for n, _ in mem.named_parameters()], got, want):
        assert b is not None and b.abs().sum() > 0, name
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=name)

def _store(lengths: list[int], seed: int) -> SequenceStore:
    rng = np.random.default_rng(seed)
    n = sum(lengths)
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int64)
    return SequenceStore(offsets, rng.integers(1, 40, n), rng.integers(1, 6, n), np.arange(n, dtype=np.int64))


def _model(**flags):
    torch.manual_seed(0)
    cfg = ModelConfig(dim_att=4, dim_rep=4, top_k=3, max_len=8, mlp=[8], init_std=0.3, titans_chunk_size=CHUNK, **flags)
    return build_model(cfg, 40, 6).eval()


@pytest.mark.parametrize("flags", [{"aaren": True}, {"titans": True}, {"aaren": True, "titans": True}])
def test_rows_read_the_memory_before_their_target_and_nothing_later(flags):
    """Perturbing events at or after a row's target leaves its memory read unchanged (exactly: the same
    computation on the same inputs); perturbing the last event a branch can see changes it: for Aaren the
    event just before the target, for Titans the last event of the last full chunk (the open chunk's
    events are not read until the chunk commits, and perturbing them leaves the read unchanged). Rows of
    one user at several positions share the user's one timeline run."""
    m = _model(**flags)
    lengths = [30, 11, 23]
    store = _store(lengths, 0)
    user = np.array([0, 0, 0, 1, 2, 2])
    pos = np.array([0, 9, 25, 10, 5, 22])
    rows = Samples(user, pos, np.full(6, 3), np.full(6, 2), np.zeros(6, np.float32))
    branches = [b for b in ("aaren", "titans") if flags.get(b)]               # the order of `summaries`

    def reads(st: SequenceStore) -> list[torch.Tensor]:
        batch = assemble(st, rows, np.arange(6), 8)
        tl = batch.timeline()
        assert tl.row_prefix.tolist() == pos.tolist() and tl.length.tolist() == [25, 10, 22]
        with torch.no_grad():
            mem = m.memory_reads(batch)
            v_t = torch.randn(6, 12, generator=torch.Generator().manual_seed(3))
            return [s for s in mem.summaries(m, v_t)]

    def perturbed(u: int, events: slice) -> SequenceStore:
        st = SequenceStore(store.offsets, store.item.copy(), store.cate.copy(), store.ts)
        a = store.offsets[u]
        st.item[a + events.start:a + events.stop] = 39 - st.item[a + events.start:a + events.stop]
        st.cate[a + events.start:a + events.stop] = 1 + st.cate[a + events.start:a + events.stop] % 5
        return st

    base = reads(store)
    for r in range(len(user)):
        u, p = user[r], pos[r]
        for want, got in zip(base, reads(perturbed(u, slice(p, lengths[u])))):   # the target's event and after
            assert torch.equal(got[r], want[r]), f"row {r} saw an event at or after its target"
        for name, want, got_open in zip(branches, base, reads(perturbed(u, slice(p // CHUNK * CHUNK, p)))):
            seen = p if name == "aaren" else p // CHUNK * CHUNK                 # events the read covers
            if seen:
                got = reads(perturbed(u, slice(seen - 1, seen)))[branches.index(name)]
                assert not torch.allclose(got[r], want[r]), f"{name}: row {r} did not see its last event"
            if name == "titans":
                assert torch.equal(got_open[r], want[r]), f"row {r} read events of its open chunk"


def test_offline_reads_equal_reads_from_streamed_states():
    m = _model(aaren=True, titans=True)
    store = _store([19, 7], 1)
    user, pos = np.array([0, 0, 1]), np.array([13, 19, 7])
    batch = assemble(store, Samples(user, pos, np.full(3, 3), np.full(3, 2), np.zeros(3, np.float32)), np.arange(3), 8)
    v_t = torch.randn(3, 12)
    with torch.no_grad():
        offline = m.memory_reads(batch).summaries(m, v_t)
        for r in range(3):
            item, cate, _ = (a[store.offsets[user[r]]:store.offsets[user[r]] + pos[r]] for a in (store.item, store.cate, store.ts))
            x = m.memory_features(torch.from_numpy(item), torch.from_numpy(cate), grad=False)
            sa, st = m.aaren.init_state(1), m.titans.init_state(1)
            for t in range(len(x)):
                sa, st = m.aaren.step(sa, x[t:t + 1]), m.titans.step(st, x[t:t + 1])
            online = MemoryReads.from_states(m, sa, st).summaries(m, v_t[r:r + 1])
            for a, b in zip(offline, online):
                torch.testing.assert_close(a[r:r + 1], b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_layers", [1, 2])
def test_aaren_prefix_reads_equal_the_streamed_state_at_every_prefix(n_layers):
    """Blocks of 4 events (so users span zero, one and several full blocks, with partial ones), the
    recency slope on: every prefix's read equals the state folded one event at a time. Two layers take
    the padded scan."""
    from recsys.modules.aaren import Aaren

    torch.manual_seed(0)
    aaren = Aaren(d_in=6, d_model=8, n_heads=2, n_layers=n_layers).eval()
    x, offsets = _ragged(2, [0, 3, 4, 9, 17, 8], 6)
    lengths = offsets[1:] - offsets[:-1]
    rows = [(u, p) for u in range(len(lengths)) for p in range(int(lengths[u]) + 1)]
    rows = [rows[i] for i in np.random.default_rng(1).permutation(len(rows))]
    with torch.no_grad():
        got = aaren.prefix_reads(x, offsets, torch.tensor([u for u, _ in rows]), torch.tensor([p for _, p in rows]),
                                 block=4)
        for i, (u, p) in enumerate(rows):
            state = aaren.init_state(1)
            for t in range(p):
                state = aaren.step(state, x[int(offsets[u]) + t][None])
            torch.testing.assert_close(got[i:i + 1], aaren.read(state), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grad", [True, False])
def test_rows_without_events_read_the_empty_memory(grad):
    """Rows at position 0 (no event before the target; a cold user when serving): Aaren reads 0, Titans its
    initial memory, as `read` of a fresh state gives; with and without gradient (training, scoring)."""
    m = _model(aaren=True, titans=True)
    batch = assemble(_store([4, 6], 2), Samples(np.array([0, 1]), np.array([0, 0]), np.full(2, 3), np.full(2, 2),
                                                np.zeros(2, np.float32)), np.arange(2), 8)
    v_t = torch.randn(2, 12)
    with torch.set_grad_enabled(grad):
        got = m.memory_reads(batch).summaries(m, v_t)
        empty = MemoryReads.from_states(m, m.aaren.init_state(2), m.titans.init_state(2)).summaries(m, v_t)
    for a, b in zip(got, empty):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
