"""Titans neural memory: chunked closed-form updates against plain per-token / per-chunk loops,
outer-parameter gradients against autograd of the loop, and step/read against the parallel forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from recsys.modules.titans import MemoryState, NeuralMemory

D_IN, D_Q = 10, 6
CLIP = 2.0


def make(chunk_size, depth=2, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    # theta near 0.5 so that the memory moves a lot and a wrong update cannot hide; the clip bites on
    # about half of the events (test_the_clip_bites_on_some_events), so both of its branches are checked
    mem = NeuralMemory(D_IN, d_key=8, d_hidden=12, depth=depth, chunk_size=chunk_size, d_query=D_Q,
                       gate_bias=(1.0, 0.0, -2.0), max_lr=1.0, max_grad_norm=CLIP, backprop_clip=float("inf"))
    return mem.to(dtype)   # the backward's clip has its own test (test_backprop_clip_...)


def batch(dtype=torch.float64, B=4, L=11, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, D_IN, generator=g, dtype=dtype)
    lengths = torch.tensor([L, 6, 0, 9])[:B]
    query = torch.randn(B, 3, D_Q, generator=g, dtype=dtype)
    return x, lengths, query


def mlp(weights, k):
    h = k
    for j, w in enumerate(weights):
        h = h @ w
        if j < len(weights) - 1:
            h = F.silu(h)
    return h


def loop_oracle(mem: NeuralMemory, x, length, query, chunk, norms=None, committed=True):
    """One user, plain Python: for each chunk, every gradient (autograd) at the chunk-start weights,
    clipped to norm <= max_grad_norm, then S and M updated token by token. chunk=1 is the per-token
    sequential update of the paper. The read sees full chunks only (`committed`; the clip test also looks
    at the open chunk's events). `norms` (a list) collects each event's unclipped gradient norm."""
    weights = list(mem.init_weights)
    momentum = [torch.zeros_like(w) for w in weights]
    for c in range(0, length - length % chunk if committed else length, chunk):
        start = weights
        grads, gates = [], []
        for t in range(c, min(c + chunk, length)):
            k = F.normalize(mem.to_k(x[t]), dim=-1)
            v = F.normalize(mem.to_v(x[t]), dim=-1)
            loss = (mlp(start, k) - v).square().sum()
            g = torch.autograd.grad(loss, start, create_graph=True)
            norm = torch.sqrt(sum(gj.square().sum() for gj in g))
            if norms is not None:
                norms.append(float(norm.detach()))
            grads.append([gj * torch.clamp(mem.max_grad_norm / norm, max=1.0) for gj in g])
            eta, theta, alpha = torch.sigmoid(mem.gates(x[t]))
            gates.append((eta, mem.max_lr * theta, alpha))
        for g, (eta, theta, alpha) in zip(grads, gates):
            momentum = [eta * s - theta * gj for s, gj in zip(momentum, g)]
            weights = [(1 - alpha) * w + s for w, s in zip(weights, momentum)]
    return mlp(weights, F.normalize(mem.to_q(query), dim=-1))


def oracle_batch(mem, x, lengths, query, chunk):
    return torch.stack([loop_oracle(mem, x[b], int(lengths[b]), query[b], chunk) for b in range(x.shape[0])])


@pytest.mark.parametrize("chunk,depth", [(1, 2), (4, 2), (3, 3), (5, 2)])
def test_chunked_forward_equals_loop(chunk, depth):
    mem = make(chunk, depth)
    x, lengths, query = batch()
    with torch.no_grad():
        got = mem(x, lengths, query)
    want = oracle_batch(mem, x, lengths, query, chunk).detach()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    empty = mem.read_memory([w[None] for w in mem.init_weights], query[2:3])[0]
    assert not torch.allclose(got[0], empty, atol=1e-3)  # the memory did move


def test_the_clip_bites_on_some_events():
    """The oracle tests above check the clip's two branches only if both occur."""
    x, lengths, query = batch()
    for chunk in (1, 4):
        mem, norms = make(chunk), []
        for b in range(x.shape[0]):
            loop_oracle(mem, x[b], int(lengths[b]), query[b], chunk, norms, committed=False)
        clipped = sum(n > CLIP for n in norms) / len(norms)
        assert 0.1 < clipped < 0.9, (chunk, clipped)
        unclipped = NeuralMemory(D_IN, d_key=8, d_hidden=12, chunk_size=chunk, d_query=D_Q, gate_bias=(1.0, 0.0, -2.0),
                                 max_lr=1.0, max_grad_norm=float("inf")).double()
        unclipped.load_state_dict(mem.state_dict())
        with torch.no_grad():
            assert not torch.allclose(mem(x, lengths, query), unclipped(x, lengths, query), atol=1e-3)


def test_chunk_size_changes_the_function():
    x, lengths, query = batch()
    with torch.no_grad():
        a = make(1)(x, lengths, query)
        b = make(4)(x, lengths, query)
    assert not torch.allclose(a[0], b[0], atol=1e-4)


@pytest.mark.parametrize("chunk", [1, 4])
def test_outer_gradients_match_autograd_of_the_loop(chunk):
    mem = make(chunk)
    x, lengths, query = batch(B=3, L=9)
    r = torch.randn(3, 3, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    params = list(mem.parameters())
    got = torch.autograd.grad((mem(x, lengths, query) * r).sum(), params)
    want = torch.autograd.grad((oracle_batch(mem, x, lengths, query, chunk) * r).sum(), params)
    for (name, _), a, b in zip(mem.named_parameters(), got, want):
        assert a.abs().sum() > 0, name
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=name)


def test_unit_normalize_equals_f_normalize_with_its_gradient():
    """The hand-written backward of the keys'/values' normalisation against autograd of F.normalize, rows of
    zeros (padding events: the clamped branch) included."""
    from recsys.modules.titans import _unit

    x = torch.randn(5, 7, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x[1, 2] = 0.0
    x[4] = 0.0
    g = torch.randn_like(x)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = _unit(a), F.normalize(b, dim=-1)
    torch.testing.assert_close(ya, yb, rtol=1e-15, atol=0)
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(_unit, (torch.randn(3, 4, dtype=torch.float64, requires_grad=True),))


def assert_state_close(a: MemoryState, b: MemoryState, tol=1e-5):
    for x, y in zip(a.weights + a.momentum, b.weights + b.momentum):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)
    torch.testing.assert_close(a.buffer, b.buffer, rtol=0, atol=0)
    assert torch.equal(a.count, b.count) and torch.equal(a.n, b.n)


@pytest.mark.parametrize("inplace", [False, True])
@torch.no_grad()
def test_step_replay_equals_parallel_forward_fp32(inplace):
    mem = make(4, dtype=torch.float32)
    x, lengths, query = batch(torch.float32, L=13)
    lengths = torch.tensor([13, 6, 0, 8])
    B = 4
    # users arrive out of lockstep: a random active pattern, each user's events in order
    g = torch.Generator().manual_seed(3)
    state = mem.init_state(B)
    sent = torch.zeros(B, dtype=torch.int64)
    while bool((sent < lengths).any()):
        active = (torch.rand(B, generator=g) < 0.6) & (sent < lengths)
        x_t = x[torch.arange(B), sent.clamp(max=12)]
        new = mem.step(state, x_t, active, inplace=inplace)
        assert (new is state) == inplace
        state = new
        sent += active
        if int(sent[1]) == 3:  # a mid-stream read agrees with the forward on the prefix
            torch.testing.assert_close(mem.read(state, query)[1], mem(x[1:2], sent[1:2], query[1:2])[0],
                                       rtol=1e-5, atol=1e-5)
    assert_state_close(state, mem.forward_state(x, lengths))
    torch.testing.assert_close(mem.read(state, query), mem(x, lengths, query), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mem.read(state, query[:, 0]), mem(x, lengths, query[:, 0]), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_inactive_rows_are_unchanged():
    mem = make(2, dtype=torch.float32)
    x, lengths, _ = batch(torch.float32)
    state = mem.forward_state(x, torch.tensor([3, 1, 0, 5]))   # counts 1, 1, 0, 1: the next event fills
    active = torch.tensor([True, False, True, False])
    new = mem.step(state, torch.randn(4, D_IN), active)
    for a, b in zip(new.weights + new.momentum + [new.buffer, new.count, new.n],
                    state.weights + state.momentum + [state.buffer, state.count, state.n]):
        assert torch.equal(a[~active], b[~active])
    assert not torch.equal(new.weights[0][0], state.weights[0][0])   # user 0 committed a chunk
    assert torch.equal(new.count, torch.tensor([0, 1, 1, 1]))


def random_events(kind, B, L, d, seed=0):
    """Events of norm uniform in [1, 10]: independent directions, or one event repeated (every key of a
    chunk aligned: the chunk's steps add up, the hardest case for the inner gradient descent)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, d, generator=g)
    if kind == "repeated":
        x = x[:, :1].expand(B, L, d)
    return F.normalize(x, dim=-1) * (1 + 9 * torch.rand(B, L, 1, generator=g)), torch.randn(B, d, generator=g)


@pytest.mark.parametrize("kind", ["independent", "repeated"])
@torch.no_grad()
def test_untrained_memory_stays_bounded_over_5000_events(kind):
    """Default settings (max_lr, clip, unit keys and values), d_in = 48 like DARE's event vectors: the read
    after 5,000 events of norm 1..10 is finite and O(1) (values are unit vectors); the same memory without
    the bounds runs away on the same events, so the bound is what this checks."""
    B, L, d = 4, 5000, 48
    x, query = random_events(kind, B, L, d)
    lengths = torch.tensor([L, L - 1, 3001, 17])
    torch.manual_seed(0)
    mem = NeuralMemory(d, d_query=d)
    state = mem.forward_state(x, lengths)
    y = mem.read(state, query)
    assert all(bool(t.isfinite().all()) for t in state.weights + state.momentum)
    assert bool(y.isfinite().all()) and float(y.norm(dim=-1).max()) < 3.0
    torch.testing.assert_close(y, mem(x, lengths, query), rtol=1e-4, atol=1e-5)
    loose = NeuralMemory(d, d_query=d, max_lr=1.0, max_grad_norm=float("inf"))
    loose.load_state_dict(mem.state_dict())
    runaway = loose(x, lengths, query).norm(dim=-1)
    assert not bool((runaway < 3.0).all())   # inf/NaN/huge


def test_dare_with_titans_trains_at_long_history():
    """A tiny DARE with the Titans branch at L = 2,000, embeddings of norm ~4 (init_std 0.5, growing
    further under lr 0.05): logits and every gradient stay finite over a few Adam steps."""
    from recsys.config.model import ModelConfig
    from recsys.config.train import TrainConfig
    from recsys.data.batch import HistoryBatch
    from recsys.models import build_model
    from recsys.train.step import make_optimizers, train_step

    B, L, n_items, n_cates = 6, 2000, 500, 20
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = build_model(ModelConfig(dim_att=4, dim_rep=16, top_k=4, max_len=L, mlp=[16], titans=True, init_std=0.5),
                        n_items, n_cates)
    opt = make_optimizers(model, TrainConfig(lr=0.05, embedding_lr=0.05))
    lengths = torch.tensor([L, L - 7, 1500, 999, 16, 1])
    real = torch.arange(L)[None, :] < lengths[:, None]
    ids = lambda n, shape: torch.randint(1, n, shape, generator=g)  # noqa: E731
    b = HistoryBatch(user=torch.arange(B), target_item=ids(n_items, (B,)), target_cate=ids(n_cates, (B,)),
                     hist_item=ids(n_items, (B, L)) * real, hist_cate=ids(n_cates, (B, L)) * real,
                     hist_pos=(torch.arange(L) + 1)[None, :] * real, hist_len=lengths,
                     label=torch.tensor([1.0, 0, 1, 0, 1, 0])).rows_as_timelines()
    for _ in range(4):
        loss = train_step(model, b, opt, 1.0)
        assert torch.isfinite(torch.tensor(loss))
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(bool(torch.isfinite(gr.to_dense() if gr.is_sparse else gr).all()) for gr in grads)
        assert float(model.titans.to_k.weight.grad.abs().sum()) > 0   # the branch takes part
    with torch.no_grad():
        out = model(b)
    assert all(bool(torch.isfinite(t).all()) for t in vars(out).values() if torch.is_tensor(t))


def test_bad_input_names_the_field():
    mem = make(2)
    with pytest.raises(ValueError, match="depth"):
        NeuralMemory(4, depth=1)
    with pytest.raises(ValueError, match="max_lr"):
        NeuralMemory(4, max_lr=0.0)
    with pytest.raises(ValueError, match="x_t"):
        mem.step(mem.init_state(2), torch.zeros(2, D_IN + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="query"):
        mem(torch.zeros(2, 3, D_IN, dtype=torch.float64), torch.tensor([1, 2]), torch.zeros(2, D_Q + 1))


@pytest.mark.parametrize("depth", [2, 3])
def test_chunk_update_backward_equals_autograd(depth):
    """The written-out backward of one chunk update (second derivatives of the memory MLP included)
    against autograd of the same update written as plain tensor ops, in float64, with the clip biting on
    some events and not on others, and padding events in the chunk."""
    from recsys.modules.titans import _silu_grad

    mem = make(5, depth=depth)
    gen = torch.Generator().manual_seed(11)
    B, b = 3, 5
    x = torch.randn(B, b, D_IN, dtype=torch.float64, generator=gen)
    real = torch.ones(B, b, dtype=torch.bool)
    real[1, 3:] = False
    weights = [w.detach() + 0.1 * torch.randn(B, *w.shape, dtype=torch.float64, generator=gen) for w in mem.init_weights]
    momentum = [0.1 * torch.randn_like(w) for w in weights]

    def plain(weights, momentum, c):
        hs, zs = [c.k], []
        for j, w in enumerate(weights):
            zs.append(hs[-1] @ w)
            if j < len(weights) - 1:
                hs.append(F.silu(zs[-1]))
        deltas = [2 * (zs[-1] - c.v)]
        for j in range(len(weights) - 1, 0, -1):
            deltas.append((deltas[-1] @ weights[j].transpose(1, 2)) * _silu_grad(zs[j - 1]))
        deltas.reverse()
        g_sq = sum(h.square().sum(-1) * d.square().sum(-1) for h, d in zip(hs, deltas))
        clipped = g_sq > mem.max_grad_norm ** 2
        theta = c.theta * torch.rsqrt((g_sq / mem.max_grad_norm ** 2).clamp(min=1.0))
        out_w = [c.keep_all[:, None, None] * w + c.s0_to_m[:, None, None] * s
                 - (h * (c.to_m * theta)[..., None]).transpose(1, 2) @ d for w, s, h, d in zip(weights, momentum, hs, deltas)]
        out_s = [c.e_all[:, None, None] * s - (h * (c.to_s * theta)[..., None]).transpose(1, 2) @ d
                 for s, h, d in zip(momentum, hs, deltas)]
        return out_w, out_s, clipped

    leaves = [x] + weights + momentum
    for t in leaves:
        t.requires_grad_()
    outs = {}
    for name in ("fast", "plain"):
        c = mem.chunks(x, real)
        if name == "fast":
            w2, s2 = mem.chunk_update(weights, momentum, c)
        else:
            w2, s2, clipped = plain(weights, momentum, c)
        got = w2 + s2
        r = [torch.randn(t.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i, t in enumerate(got)]
        loss = sum((t * ri).sum() for t, ri in zip(got, r))
        outs[name] = ([t.detach() for t in got], torch.autograd.grad(loss, leaves + [mem.to_k.weight, mem.to_v.weight, mem.gates.weight, mem.gates.bias]))
    assert bool(clipped[real].any()) and not bool(clipped[real].all())
    for a, b_ in zip(outs["fast"][0], outs["plain"][0]):
        torch.testing.assert_close(a, b_, rtol=1e-12, atol=1e-12)
    for a, b_ in zip(outs["fast"][1], outs["plain"][1]):
        assert b_.abs().sum() > 0
        torch.testing.assert_close(a, b_, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-11), (torch.float32, 1e-4)])
def test_c_chunk_loop_equals_the_torch_form(monkeypatch, dtype, tol):
    """kernels/titans_memory (C) against the torch form of the same chunk loop, values and every gradient
    (float64: elementwise; float32: relative to each tensor's norm, as rounding compounds over a dozen
    chunks with the inner step at its largest), on a ragged timeline of chunks of 16 events with 32 x 32 layers (the shape the kernel compiles for)
    and of 5 events with 8 x 12 layers (its general path). The C build must exist here: CI runs it."""
    from kernels.titans_memory import cpu as titans_cpu
    from recsys.modules.seq import TimelineBlocks

    assert titans_cpu.load() is not None
    for chunk, d_key, d_hidden in ((16, 32, 32), (5, 8, 12)):
        torch.manual_seed(0)
        mem = NeuralMemory(D_IN, d_key=d_key, d_hidden=d_hidden, chunk_size=chunk, d_query=D_Q, max_lr=1.0,
                           max_grad_norm=CLIP).to(dtype)
        g = torch.Generator().manual_seed(1)
        offsets = torch.tensor([0, 7 * chunk + 3, 7 * chunk + 3, 10 * chunk, 12 * chunk + 1]).cumsum(0)
        x = torch.randn(int(offsets[-1]), D_IN, generator=g, dtype=dtype)
        blocks = TimelineBlocks.of(offsets, chunk)
        outs = {}
        for path in ("c", "torch"):
            monkeypatch.setattr(titans_cpu, "supports", lambda *a, c=path == "c": c)
            xi = x.clone().requires_grad_()
            bnd = mem._chunk_boundaries(xi, blocks, len(offsets) - 1)
            r = [torch.randn(t.shape, generator=torch.Generator().manual_seed(i), dtype=dtype) for i, t in enumerate(bnd)]
            loss = sum((t * ri).sum() for t, ri in zip(bnd, r))
            params = [p for n, p in mem.named_parameters() if not n.startswith("to_q")]   # the read's, unused here
            outs[path] = [t.detach() for t in bnd] + list(torch.autograd.grad(loss, [xi] + params))
        for a, b in zip(outs["c"], outs["torch"]):
            assert b.abs().sum() > 0
            if dtype == torch.float64:
                torch.testing.assert_close(a, b, rtol=tol, atol=tol)
            else:
                assert float((a - b).norm()) <= tol * float(b.norm())


def test_shapes_past_the_c_scratch_bound_take_the_torch_form():
    """The C kernel keeps its per-user scratch on the stack; a chunk of 128 events x 32 dims is past its bound
    and must run (on the torch form), not fail."""
    from kernels.titans_memory import cpu as titans_cpu

    mem = NeuralMemory(D_IN, d_key=32, d_hidden=32, chunk_size=128, d_query=D_Q)
    x = torch.randn(2, 300, D_IN)
    c = mem.chunks(x[:, :128], torch.ones(2, 128, dtype=torch.bool))
    w, s = mem._initial(2)
    assert not titans_cpu.supports(list(vars(c).values()) + w + s, 2)
    small = mem.chunks(x[:, :16], torch.ones(2, 16, dtype=torch.bool))
    assert titans_cpu.supports(list(vars(small).values()) + w + s, 2)
    out = mem(x, torch.tensor([300, 140]), torch.randn(2, D_Q))
    assert out.shape == (2, 32) and bool(torch.isfinite(out).all())


class _JointClip(torch.autograd.Function):
    """Identity whose backward scales each user's gradient over all the given tensors to norm <= A: the
    backprop clip's definition, written independently of recsys.modules.titans."""

    @staticmethod
    def forward(ctx, A, norms, *ts):
        ctx.A, ctx.norms = A, norms
        return tuple(t.clone() for t in ts)

    @staticmethod
    def backward(ctx, *gs):
        norm = torch.sqrt(sum((g * g).sum(tuple(range(1, g.dim()))) for g in gs))
        ctx.norms.extend(norm.tolist())
        scale = torch.where(norm > ctx.A, ctx.A / norm, torch.ones_like(norm))
        return (None, None, *(g * scale.view(-1, *[1] * (g.dim() - 1)) for g in gs))


@pytest.mark.parametrize("path", ["c", "torch"])
def test_backprop_clip_equals_a_chunk_by_chunk_oracle(monkeypatch, path):
    """The timeline node with backprop_clip = A equals a chain of single-chunk updates without the clip,
    each boundary passed through an identity that clips each user's complete gradient to A; reads at
    every boundary. A is set so that it bites at some boundaries and not at others (checked)."""
    from kernels.titans_memory import cpu as titans_cpu
    from recsys.modules.seq import TimelineBlocks

    monkeypatch.setattr(titans_cpu, "supports", lambda *a, c=path == "c": c and titans_cpu.load() is not None)
    chunk, A = 4, 5.0
    torch.manual_seed(0)
    mem = NeuralMemory(D_IN, d_key=8, d_hidden=12, chunk_size=chunk, d_query=D_Q, gate_bias=(1.0, 0.0, -2.0),
                       max_lr=1.0, max_grad_norm=CLIP, backprop_clip=A).double()
    n_chunks = 6
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, n_chunks * chunk, D_IN, generator=g, dtype=torch.float64)
    q = torch.randn(2, n_chunks, D_Q, generator=g, dtype=torch.float64)
    leaves = [x] + list(mem.parameters())

    def loss_of(states):   # states[i]: (weights, momentum) per user after chunk i + 1
        return sum((mem.read_memory(w, q[:, i]) ** 2).sum() * (i + 1) for i, (w, _) in enumerate(states))

    # the timeline node: users of equal length, one row per (user, chunk) boundary
    xi = x.clone().requires_grad_()
    blocks = TimelineBlocks.of(torch.tensor([0, n_chunks * chunk, 2 * n_chunks * chunk]), chunk)
    bnd = mem._chunk_boundaries(xi.reshape(-1, D_IN), blocks, 2)
    n = len(bnd) // 2
    states = [([t[2 * (i + 1):2 * (i + 2)] for t in bnd[:n]], None) for i in range(n_chunks)]
    got = torch.autograd.grad(loss_of(states), [xi] + leaves[1:], allow_unused=True)

    # the oracle: one chunk at a time without the node's clip, the clip as an identity between chunks
    mem.backprop_clip = float("inf")
    xo = x.clone().requires_grad_()
    w, s = mem._initial(2)
    norms, states = [], []
    for i in range(n_chunks):
        c = mem.chunks(xo[:, i * chunk:(i + 1) * chunk], torch.ones(2, chunk, dtype=torch.bool))
        w, s = mem.chunk_update(w, s, c)
        out = _JointClip.apply(A, norms, *w, *s)
        w, s = list(out[:len(w)]), list(out[len(w):])
        states.append((w, s))
    want = torch.autograd.grad(loss_of(states), [xo] + leaves[1:], allow_unused=True)
    assert any(v > A for v in norms) and any(v < A for v in norms), norms
    for name, a, b in zip(["x"] + [nm for nm, _ in mem.named_parameters()], got, want):
        if b is None:
            assert a is None or not a.abs().sum(), name
            continue
        assert b.abs().sum() > 0, name
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)
