"""Titans neural long-term memory ("Titans: Learning to Memorize at Test Time", Behrouz et al. 2024).

Per user, a small MLP memory M (depth >= 2 linear maps, SiLU between, no biases) is written at test time
by gradient steps on the associative loss l_t(M) = ||M(k_t) - v_t||^2, with momentum and decay:

    S_t = eta_t S_(t-1) - theta_t grad l_t(M'),      M_t = (1 - alpha_t) M_(t-1) + S_t,

k_t = normalize(x_t W_K), v_t = normalize(x_t W_V), eta, alpha = sigmoid of linear maps of the event x_t
and theta_t = max_lr * sigmoid(linear map of x_t). M_0 (the initial memory) and every map are outer
parameters, learned by backprop through the updates.

Stability (an untrained memory fed events of norm ~1 used to reach NaN within ~50 events): the inner step
is gradient descent on a deep MLP, whose curvature grows with the weights it writes, so a fixed step that
is safe at M_0 stops being safe as M grows (and a chunk of b similar events takes b steps at once). Three
bounds keep every history finite, in training and serving alike (they live in `chunks`/`chunk_update`):
unit-norm keys AND values (the target no longer scales with the input, so neither must M), theta <=
max_lr, and each event's gradient clipped to norm <= max_grad_norm, i.e. grad -> grad * min(1, G / |grad|)
with |grad|^2 = sum_j |h_(j-1)|^2 |delta_j|^2 (every layer's gradient is a rank-one outer product, so the
clip is one scale per event, folded into theta: chunked and per-token forms stay exact). So every step
adds at most max_lr * G to S, and S and M stay within the geometric sums that eta < 1 and alpha > 0 allow,
whatever the inputs' norms.

Chunking (the chunk size is part of the function): events are cut into chunks of `chunk_size`, counted
from each user's first event, and every gradient in a chunk is taken at the chunk-start weights M' (so a
chunk is one batch of matmuls). The recurrences are linear inside a chunk, so the chunk end is closed-form:
with E_t = prod_{r<=t} eta_r and beta_t = prod_{r>t} (1 - alpha_r) over the chunk,
    S_end = E_b S_0 - sum_i (E_b / E_i) theta_i g_i
    M_end = beta_0' M_0 + (sum_t beta_t E_t) S_0 - sum_i [sum_{t>=i} beta_t E_t / E_i] theta_i g_i
(beta_0' = prod_t (1 - alpha_t)), and each g_i is an outer product h_(i,j-1)^T delta_(i,j) per layer j, so
every weighted sum of gradients is one batched matmul. Padding events are exact identities (eta = 1,
theta = 0, alpha = 0 and no S added), which is how one loop over chunks serves ragged batches (the
parallel path also skips users whose events are all used up: their remaining chunks are identities).

Reads see committed chunks only: the events after the last full chunk (at most chunk_size - 1, the most
recent) wait in a buffer (`step`) until their chunk fills; `forward`, `read` and the training reads
(`prefix_weights`) all read the memory at the last chunk boundary. So the read after events 1..T is the
same in training and serving, for every T, and a read is the memory MLP alone, O(d^2) per query, with
no chunk update in a request. The recent events the memory has not committed yet are the ones DARE's
search sees anyway. Measured (benchmarks/offline_accuracy.py, docs/models.md): applying the open chunk
at every read cost 40% of the branch's training time, for the same test AUC within the seed spread.

Read: y = M_T(normalize(q W_Q)) for a query (the target item) [B, d_q] or candidates [B, C, d_q].
Layout: x [B, L, d_in] chronological (oldest first), left-aligned, padded at the end; lengths [B].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kernels.titans_memory import cpu as titans_cpu
from recsys.modules.seq import TimelineBlocks, valid_mask


@dataclass
class MemoryState:
    """Per-user memory; every tensor has the user batch as dim 0 (see state_codec)."""

    weights: list[torch.Tensor]   # per layer j: [B, d_(j-1), d_j]  committed memory weights
    momentum: list[torch.Tensor]  # per layer j: [B, d_(j-1), d_j]  surprise S
    buffer: torch.Tensor          # [B, chunk_size, d_in]  events of the open chunk, zeros after `count`
    count: torch.Tensor           # [B] int64  events in the buffer
    n: torch.Tensor               # [B] int64  events seen

    @property
    def batch_size(self) -> int:
        return int(self.n.shape[0])


@dataclass
class _Chunk:
    """A chunk of events per user as its update needs them: keys, values, step sizes and the closed-form
    coefficients of the momentum and decay recurrences (module docstring), none of which depends on the
    memory. Leading dims [...] = [B]."""

    k: torch.Tensor         # [..., b, d_key]  unit keys, 0 on padding
    v: torch.Tensor         # [..., b, d_key]  unit values
    theta: torch.Tensor     # [..., b]  step size theta_i before the clip, 0 on padding
    to_m: torch.Tensor      # [..., b]  sum_(t>=i) beta_t E_t / E_i: how step i reaches M_end
    to_s: torch.Tensor      # [..., b]  E_b / E_i: how step i reaches S_end
    s0_to_m: torch.Tensor   # [...]     sum_t beta_t E_t
    keep_all: torch.Tensor  # [...]     prod_t (1 - alpha_t)
    e_all: torch.Tensor     # [...]     E_b = prod_t eta_t


class _Unit(torch.autograd.Function):
    """F.normalize(x, dim=-1) (x / max(|x|, eps)) with its backward written out: (g - y (g . y)) / |x|.
    Autograd's backward of the division (the norm broadcast over the last dim: several passes over every
    event's key and value) was ~45% of the memory's forward + backward at B = 512, L = 2,698."""

    EPS = 1e-12

    @staticmethod
    def forward(ctx, x):
        n = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(_Unit.EPS)
        y = x / n
        ctx.save_for_backward(y, n)
        return y

    @staticmethod
    def backward(ctx, g):
        y, n = ctx.saved_tensors
        g_x = (g - y * (g * y).sum(-1, keepdim=True)) / n
        # where the norm was clamped (x ~ 0) the function is x / eps: its gradient is g / eps
        return torch.where(n > _Unit.EPS, g_x, g / _Unit.EPS)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return _Unit.apply(x)


def _silu_grad(z: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def _silu_grad2(z: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(z)
    return s * (1 - s) * (2 + z * (1 - 2 * s))


# ---- the chunk update and its backward, written out ----------------------------------------------------
# Autograd of the update (it differentiates through the inner gradient: second derivatives of the memory
# MLP) was ~130 small ops per chunk, each saving its temporaries, and the training loop runs ~170 chunks
# per batch at L = 2,698 on a handful of users each: overhead, not arithmetic. Written out, a chunk's
# backward is a few batched matmuls over what its forward kept, and the whole chunk loop is one autograd
# node (`_ChunkLoop`). tests/test_titans.py checks values and every gradient against autograd of the plain
# update and of a per-event loop.
#
# Notation per layer j (weights W_j [B, d_j, d_(j+1)], momentum S_j): h_0 = k, z_j = h_j W_j,
# h_(j+1) = silu(z_j); delta_last = 2 (z_last - v), delta_(j-1) = (delta_j W_j^T) * silu'(z_(j-1)); the
# inner gradient of W_j is h_j^T delta_j per event; the clip scale r = rsqrt(max(1, |g|^2 / G^2)) with
# |g|^2 = sum_j |h_j|^2 |delta_j|^2; theta' = theta r, c_m = to_m theta', c_s = to_s theta';
# W_j' = keep W_j + s0_to_m S_j - h_j^T diag(c_m) delta_j,  S_j' = e S_j - h_j^T diag(c_s) delta_j.

def _update_fwd(G: float, c: _Chunk, weights, momentum):
    """-> (new weights, new momenta, what `_update_bwd` needs)."""
    n = len(weights)
    hs, zs = [c.k], []
    for j, w in enumerate(weights):
        zs.append(hs[-1] @ w)                                                 # [B, b, d_(j+1)]
        if j < n - 1:
            hs.append(F.silu(zs[-1]))
    deltas = [2 * (zs[-1] - c.v)]
    for j in range(n - 1, 0, -1):
        deltas.append((deltas[-1] @ weights[j].transpose(1, 2)) * _silu_grad(zs[j - 1]))
    deltas.reverse()                                                          # deltas[j] pairs with hs[j]
    # per-event clip: every layer's gradient is the outer product h^T delta, of norm |h| |delta|
    g_sq = sum((h * h).sum(-1) * (d * d).sum(-1) for h, d in zip(hs, deltas))  # [B, b]
    u = g_sq / G ** 2
    r = torch.rsqrt(u.clamp(min=1.0))
    th = c.theta * r
    c_m, c_s = c.to_m * th, c.to_s * th                                       # [B, b] each
    keep, s0m, e = (t[:, None, None] for t in (c.keep_all, c.s0_to_m, c.e_all))
    new_w, new_s = [], []
    for w, s, h, d in zip(weights, momentum, hs, deltas):
        # both weighted gradient sums of this layer in one matmul: [h c_m, h c_s]^T delta
        g = torch.cat([h * c_m[..., None], h * c_s[..., None]], -1).transpose(1, 2) @ d
        g_m, g_s = g.split(h.shape[-1], 1)                                    # [B, d_j, d_(j+1)] each
        new_w.append(keep * w + s0m * s - g_m)
        new_s.append(e * s - g_s)
    return new_w, new_s, (c, weights, momentum, hs, zs, deltas, u, r, G)


def _update_bwd(saved, g_new_w: list[torch.Tensor], g_new_s: list[torch.Tensor]):
    """Gradients of `_update_fwd` -> (_Chunk of the gradients of c's fields, gradients of the weights in,
    of the momenta in)."""
    c, weights, momentum, hs, zs, deltas, u, r, G = saved
    n = len(weights)
    th = c.theta * r
    c_m, c_s = c.to_m * th, c.to_s * th
    keep, s0m, e = (t[:, None, None] for t in (c.keep_all, c.s0_to_m, c.e_all))
    dot = lambda a, b: (a * b).sum((1, 2))                                    # noqa: E731  [B]
    g_keep = sum(dot(gw, w) for gw, w in zip(g_new_w, weights))
    g_s0m = sum(dot(gw, s) for gw, s in zip(g_new_w, momentum))
    g_e = sum(dot(gs, s) for gs, s in zip(g_new_s, momentum))
    g_w = [keep * gw for gw in g_new_w]
    g_mom = [s0m * gw + e * gs for gw, gs in zip(g_new_w, g_new_s)]
    # through -h^T diag(c_m) delta and -h^T diag(c_s) delta
    g_h, g_d = [], []
    g_cm, g_cs = torch.zeros_like(c_m), torch.zeros_like(c_s)
    for j, (h, d, gw) in enumerate(zip(hs, deltas, g_new_w)):
        gg = torch.cat([gw, g_new_s[j]], -1)                                  # [B, d_j, 2 d_(j+1)]
        hw, hs_ = (h @ gg).split(d.shape[-1], -1)                             # [B, b, d_(j+1)] each
        g_d.append(-(c_m[..., None] * hw + c_s[..., None] * hs_))
        g_cm -= (hw * d).sum(-1)
        g_cs -= (hs_ * d).sum(-1)
        g_h.append(-(torch.cat([d * c_m[..., None], d * c_s[..., None]], -1) @ gg.transpose(1, 2)))
    g_th = g_cm * c.to_m + g_cs * c.to_s
    g_to_m, g_to_s = g_cm * th, g_cs * th
    g_theta = g_th * r
    # r = rsqrt(clamp(u, min=1)): clamp passes the gradient where u >= 1 (torch's rule)
    g_gsq = torch.where(u >= 1.0, g_th * c.theta * (-0.5) * r * r * r, torch.zeros_like(u)) / G ** 2
    for j, (h, d) in enumerate(zip(hs, deltas)):
        g_h[j] = g_h[j] + h * (2 * (d * d).sum(-1) * g_gsq)[..., None]
        g_d[j] = g_d[j] + d * (2 * (h * h).sum(-1) * g_gsq)[..., None]
    # through the inner backward delta_(j-1) = (delta_j W_j^T) * silu'(z_(j-1)), j = 1 .. n-1 in order
    g_z = [torch.zeros_like(z) for z in zs]
    for j in range(1, n):
        gd = g_d[j - 1]
        t = deltas[j] @ weights[j].transpose(1, 2)                            # [B, b, d_j]
        gt = gd * _silu_grad(zs[j - 1])
        g_d[j] = g_d[j] + gt @ weights[j]
        g_w[j] = g_w[j] + gt.transpose(1, 2) @ deltas[j]
        g_z[j - 1] = g_z[j - 1] + gd * t * _silu_grad2(zs[j - 1])
    g_z[-1] = g_z[-1] + 2 * g_d[-1]
    g_v = -2 * g_d[-1]
    # through the forward z_j = h_j W_j, h_(j+1) = silu(z_j), top layer down
    for j in range(n - 1, -1, -1):
        g_h[j] = g_h[j] + g_z[j] @ weights[j].transpose(1, 2)
        g_w[j] = g_w[j] + hs[j].transpose(1, 2) @ g_z[j]
        if j > 0:
            g_z[j - 1] = g_z[j - 1] + g_h[j] * _silu_grad(zs[j - 1])
    return _Chunk(g_h[0], g_v, g_theta, g_to_m, g_to_s, g_s0m, g_keep, g_e), g_w, g_mom


class _ChunkLoop(torch.autograd.Function):
    """Chunk updates in `TimelineBlocks`' layout as one autograd node: users ranked by full-chunk count,
    most first; chunk i updates the first active[i] users of boundary i into boundary i + 1, stacked after
    the initial state. (G, A (`_clip_adjoint`), n_layers, active, *_Chunk fields of every (chunk, user) pair [P, ...],
    *initial weights, *initial momenta [U, ...]) -> per layer the stacked weights [U + P, ...], then per
    layer the stacked momenta. One chunk of B users (active = [B]) is the update of a state.

    The C kernel (kernels/titans_memory) runs it where it can (a 2-layer memory on CPU): per chunk the
    work is a few users' 16 x 32 matrices, where torch's per-op cost dominated (~170 chunks per batch at
    L = 2,698). Elsewhere the torch form above, chunk by chunk."""

    @staticmethod
    def forward(ctx, G, A, n, active, *args):
        fields, init = [t.contiguous() for t in args[:8]], args[8:]
        U, P = init[0].shape[0], fields[0].shape[0]
        out = [t.new_empty(U + P, *t.shape[1:]) for t in init]
        for o, t in zip(out, init):
            o[:U] = t
        ctx.G, ctx.A, ctx.active, ctx.U = G, A, list(active), U
        ctx.c_kernel = titans_cpu.supports(fields + list(init), n)
        if ctx.c_kernel:
            titans_cpu.loop_forward(G, active, fields, out)
            ctx.save_for_backward(*fields, *out)
        else:
            # what the backward keeps refers to the outputs through detached aliases: a view of an output
            # itself would tie the output to this node and the node to it (a cycle Python's GC cannot see)
            det = [o.detach() for o in out]
            saved, start, prev = [], 0, 0                              # pairs of chunk i: start .. start + a
            for a in active:
                state = [o[prev:prev + a] for o in det]                # the first a users of the last boundary
                part = _Chunk(*(t[start:start + a] for t in fields))
                new_w, new_s, sv = _update_fwd(G, part, state[:n], state[n:])
                for o, t in zip(det, new_w + new_s):
                    o[U + start:U + start + a] = t
                saved.append(sv)
                prev, start = U + start, start + a
            ctx.saved = saved
        ctx.shapes = [(o.shape, o.dtype) for o in out]
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        U, active, n = ctx.U, ctx.active, len(grads) // 2
        # the gradient of every boundary, completed chunk by chunk from the last: boundary i + 1's is whole
        # once chunk i + 1 (the only other reader of it) has added its part
        g = [torch.zeros(*shape, dtype=dtype) if gr is None else gr.contiguous().clone()
             for gr, (shape, dtype) in zip(grads, ctx.shapes)]
        if ctx.c_kernel:
            saved = ctx.saved_tensors
            fields = titans_cpu.loop_backward(ctx.G, ctx.A, active, saved[:8], list(saved[8:]), g)
            return (None, None, None, None, *fields, *(t[:U] for t in g))
        saved = ctx.saved
        del ctx.saved
        starts = [0]
        for a in active:
            starts.append(starts[-1] + a)
        fields: list[torch.Tensor | None] = [None] * 8
        for i in range(len(active) - 1, -1, -1):
            a, start = active[i], starts[i]
            prev = 0 if i == 0 else U + starts[i - 1]
            rows = slice(U + start, U + start + a)
            _clip_adjoint(ctx.A, [t[rows] for t in g])
            gc, g_w, g_mom = _update_bwd(saved[i], [t[rows] for t in g[:n]], [t[rows] for t in g[n:]])
            for f, t in enumerate(vars(gc).values()):
                if fields[f] is None:
                    fields[f] = t.new_zeros(starts[-1], *t.shape[1:])
                fields[f][start:start + a] = t
            for t, d in zip(g, g_w + g_mom):
                t[prev:prev + a] += d
        return (None, None, None, None, *fields, *(t[:U] for t in g))


def _clip_adjoint(A: float, g: list[torch.Tensor]) -> None:
    """Scale each user's complete gradient at a chunk boundary (every layer's weights and momentum, rows
    [a, ...]) in place to norm <= A before it flows into the chunks before: g -> g * rsqrt(max(1, |g|^2 / A^2)).
    The forward's bounds keep the memory finite, but the backward multiplies ~L / chunk_size chunk Jacobians
    (second derivatives of the memory MLP included), whose product grew to 1e6 and overflowed Adam's second
    moment within 36 steps at L = 1,000 (docs/models.md). Clipping the carried gradient per step is the
    classic bound for backprop through a long recurrence; it acts only where the gradient runs away."""
    if math.isinf(A):
        return
    sq = sum((t * t).sum(tuple(range(1, t.dim()))) for t in g)             # [a]
    r = torch.rsqrt((sq / A ** 2).clamp(min=1.0))
    for t in g:
        t.mul_(r.view(-1, *[1] * (t.dim() - 1)))


class NeuralMemory(nn.Module):
    def __init__(self, d_in: int, d_key: int = 32, d_hidden: int = 32, depth: int = 2, chunk_size: int = 16,
                 d_query: int | None = None, gate_bias: tuple[float, float, float] = (2.0, -2.0, -4.0),
                 max_lr: float = 0.1, max_grad_norm: float = 1.0, backprop_clip: float = 1.0):
        super().__init__()
        if depth < 2:
            raise ValueError(f"depth must be >= 2 (a deep memory), got {depth}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if max_lr <= 0 or max_grad_norm <= 0:
            raise ValueError(f"max_lr and max_grad_norm must be > 0, got {max_lr}, {max_grad_norm}")
        self.d_in, self.d_key, self.chunk_size = d_in, d_key, chunk_size
        if backprop_clip <= 0:
            raise ValueError(f"backprop_clip must be > 0 (inf: off), got {backprop_clip}")
        self.max_lr, self.max_grad_norm, self.backprop_clip = max_lr, max_grad_norm, backprop_clip
        self.d_query = d_in if d_query is None else d_query
        self.d_out = d_key
        self.to_k = nn.Linear(d_in, d_key, bias=False)
        self.to_v = nn.Linear(d_in, d_key, bias=False)
        self.to_q = nn.Linear(self.d_query, d_key, bias=False)
        # eta (momentum), theta (step size), alpha (forgetting); the biases start them near
        # 0.88, 0.12 and 0.02 so that a fresh memory neither explodes nor forgets at once
        self.gates = nn.Linear(d_in, 3)
        with torch.no_grad():
            self.gates.bias.copy_(torch.tensor(gate_bias))
        dims = [d_key] + [d_hidden] * (depth - 1) + [d_key]
        self.init_weights = nn.ParameterList(
            nn.Parameter(torch.randn(a, b) / a ** 0.5) for a, b in zip(dims[:-1], dims[1:]))

    # ---- the memory MLP and its chunk update -------------------------------------------------------
    @staticmethod
    def memory(weights: list[torch.Tensor], k: torch.Tensor) -> torch.Tensor:
        """M(k): weights [B, d_(j-1), d_j], k [B, T, d_key] -> [B, T, d_key]."""
        h = k
        for j, w in enumerate(weights):
            h = h @ w
            if j < len(weights) - 1:
                h = F.silu(h)
        return h

    def chunks(self, x: torch.Tensor, real: torch.Tensor) -> _Chunk:
        """x [..., b, d_in] (chunks of events), real [..., b] bool -> their _Chunk; padding events are
        identities (eta = 1, theta = 0, alpha = 0, no S added)."""
        r = real.to(x.dtype)
        a_eta, a_theta, a_alpha = self.gates(x).unbind(-1)                   # [..., b] each
        log_e = torch.cumsum(F.logsigmoid(a_eta) * r, -1)                    # log E_t
        cum_keep = torch.cumsum(F.logsigmoid(-a_alpha) * r, -1)              # log prod_(r<=t) (1 - alpha_r)
        total_keep = cum_keep[..., -1:]
        log_beta = total_keep - cum_keep                                      # log prod_(r>t) (1 - alpha_r)
        # to_m_i = sum_(t>=i) beta_t E_t / E_i: a suffix log-sum-exp, O(b) per chunk and never dividing
        # by an E_i that underflows (E shrinks geometrically). Padding (beta_t = 0) adds nothing.
        log_w = (log_beta + log_e).masked_fill(r == 0, float("-inf"))         # log beta_t E_t
        suffix = torch.logcumsumexp(log_w.flip(-1), -1).flip(-1)              # log sum_(t>=i) beta_t E_t
        return _Chunk(
            k=_unit(self.to_k(x)),
            v=_unit(self.to_v(x)),
            theta=self.max_lr * torch.sigmoid(a_theta) * r,
            to_m=torch.exp(suffix - log_e),
            to_s=torch.exp(log_e[..., -1:] - log_e),
            s0_to_m=torch.exp(suffix[..., 0]),
            keep_all=torch.exp(total_keep).squeeze(-1),
            e_all=torch.exp(log_e[..., -1]),
        )

    def chunk_update(self, weights: list[torch.Tensor], momentum: list[torch.Tensor], c: _Chunk):
        """One chunk per user (c's leading dim [B]), every gradient at the chunk-start `weights`.
        Returns (weights, momentum) at its end."""
        n, B = len(weights), weights[0].shape[0]
        out = _ChunkLoop.apply(self.max_grad_norm, self.backprop_clip, n, [B], *vars(c).values(), *weights, *momentum)
        return [t[B:] for t in out[:n]], [t[B:] for t in out[n:]]

    def read_memory(self, weights: list[torch.Tensor], query: torch.Tensor) -> torch.Tensor:
        """y = M(normalize(q W_Q)) for memory `weights` (per layer [B, ...]) and query [B, d_q] or [B, C, d_q]."""
        single = query.dim() == 2
        if query.shape[-1] != self.d_query or query.dim() not in (2, 3):
            raise ValueError(f"query must be [B, d_q] or [B, C, d_q] with d_q={self.d_query}, got {tuple(query.shape)}")
        q = F.normalize(self.to_q(query if not single else query[:, None]), dim=-1)
        y = self.memory(weights, q)
        return y[:, 0] if single else y

    # ---- parallel (training / state rebuild) -------------------------------------------------------
    def _initial(self, B: int):
        weights = [w.unsqueeze(0).expand(B, *w.shape) for w in self.init_weights]
        return weights, [torch.zeros_like(w) for w in weights]

    def _run_chunks(self, x: torch.Tensor, lengths: torch.Tensor):
        B, L, _ = x.shape
        if lengths.shape != (B,):
            raise ValueError(f"lengths must be [B]={B}, got {tuple(lengths.shape)}")
        if x.shape[-1] != self.d_in:
            raise ValueError(f"x must be [B, L, d_in={self.d_in}], got {tuple(x.shape)}")
        b = self.chunk_size
        # longest history first: the users with events left in chunk c are then a prefix of the batch,
        # of size active[c], and only they go through the update (a finished user's later chunks are
        # pure padding, an exact identity), so a ragged batch costs its real events, not B * L
        order = torch.argsort(lengths, descending=True)
        x, lengths = x[order], lengths[order]
        n = -(-L // b)
        active = (lengths[None, :] > torch.arange(0, n * b, b, device=x.device)[:, None]).sum(1).tolist()
        real = valid_mask(lengths, n * b)
        x = F.pad(x, (0, 0, 0, n * b - L)).masked_fill(~real[..., None], 0.0)
        # Each chunk's keys, values and coefficients are computed in the loop, for its active users only:
        # computed for all chunks at once they were [n, B, b, d] tensors (hundreds of MB at L = 2,698),
        # and every temporary of that size costs fresh pages (page faults: ~8x the arithmetic here) in
        # the forward and again in the backward. unbind hands autograd one stack for x's gradient.
        xs = x.view(B, n, b, self.d_in).transpose(0, 1).contiguous().unbind(0)   # chunk-major: contiguous chunks
        rs = real.view(B, n, b).unbind(1)
        weights, momentum = self._initial(B)
        finished = []                                        # (weights, momentum) of the users done, last rows first
        for x_c, r_c, a in zip(xs, rs, active):
            if a < weights[0].shape[0]:
                finished.append(([w[a:] for w in weights], [s[a:] for s in momentum]))
                weights, momentum = [w[:a] for w in weights], [s[:a] for s in momentum]
            if a == 0:
                break
            weights, momentum = self.chunk_update(weights, momentum, self.chunks(x_c[:a], r_c[:a]))
        finished.append((weights, momentum))
        unsort = torch.argsort(order)
        parts = finished[::-1]
        return ([torch.cat([p[0][j] for p in parts])[unsort] for j in range(len(weights))],
                [torch.cat([p[1][j] for p in parts])[unsort] for j in range(len(weights))])

    def prefix_weights(self, x: torch.Tensor, offsets: torch.Tensor, row_user: torch.Tensor,
                       row_prefix: torch.Tensor) -> list[torch.Tensor]:
        """Training on timelines: each user's memory is run once over its events and every row reads it
        where its prefix ends. x [N, d_in]: the users' events oldest first, user u's at
        offsets[u]:offsets[u + 1] (CSR, no padding); row_user [B] (index into U); row_prefix [B] (at most
        the user's event count) -> per layer [B, d_(j-1), d_j]: the memory committed by the row's first
        `row_prefix` events (its chunk boundary floor(prefix / b)), which is what `read` of the state
        streamed over those events reads (tests/test_memory_timeline.py). The full chunks run once per
        user, keeping the memory at every chunk boundary."""
        b = self.chunk_size
        if x.dim() != 2 or x.shape[0] != int(offsets[-1]) or row_user.shape != row_prefix.shape or row_user.dim() != 1:
            raise ValueError(f"x must be [offsets[-1], d_in], row_user and row_prefix equal [B] shapes; got "
                             f"{tuple(x.shape)}, {tuple(row_user.shape)}, {tuple(row_prefix.shape)}")
        blocks = TimelineBlocks.of(offsets, b)
        at, _, _ = blocks.rows(offsets, row_user, row_prefix, b)                       # [B]
        boundaries = self._chunk_boundaries(x, blocks, len(offsets) - 1)
        return [w[at] for w in boundaries[:len(self.init_weights)]]

    def _chunk_boundaries(self, x: torch.Tensor, blocks: TimelineBlocks, U: int) -> list[torch.Tensor]:
        """The memory at every full-chunk boundary of every user, stacked in `blocks`' boundary order:
        per layer the weights, then per layer the momenta."""
        # keys, values and coefficients need no memory: computed for every (chunk, user) pair at once (one
        # gather, so the backward is one index_add), then the chunk loop runs as one autograd node
        src = blocks.src
        every = self.chunks(x.index_select(0, src.flatten()).view(*src.shape, x.shape[-1]),
                            torch.ones(src.shape, dtype=torch.bool, device=x.device))
        weights, momentum = self._initial(U)
        return list(_ChunkLoop.apply(self.max_grad_norm, self.backprop_clip, len(weights), blocks.active, *vars(every).values(),
                                     *weights, *momentum))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """x [B, L, d_in], lengths [B], query [B, d_q] or [B, C, d_q] -> read [B, (C,) d_key]
        of the memory committed by all full chunks (as `read` does)."""
        committed = torch.div(lengths, self.chunk_size, rounding_mode="floor") * self.chunk_size
        return self.read_memory(self._run_chunks(x, committed)[0], query)

    def forward_state(self, x: torch.Tensor, lengths: torch.Tensor) -> MemoryState:
        """The streaming state after all events: full chunks committed, the rest in the buffer."""
        b = self.chunk_size
        committed = torch.div(lengths, b, rounding_mode="floor") * b
        weights, momentum = self._run_chunks(x, committed)
        count = lengths - committed
        j = torch.arange(b, device=x.device)
        src = (committed[:, None] + j[None, :]).clamp(max=max(x.shape[1] - 1, 0))  # [B, b]
        in_buf = j[None, :] < count[:, None]
        if x.shape[1] == 0:
            buffer = x.new_zeros(x.shape[0], b, self.d_in)
        else:
            buffer = torch.gather(x, 1, src[..., None].expand(-1, -1, self.d_in)).masked_fill(~in_buf[..., None], 0.0)
        return MemoryState(weights=[w.contiguous() for w in weights], momentum=[s.contiguous() for s in momentum],
                           buffer=buffer, count=count.to(torch.int64), n=lengths.to(torch.int64))

    # ---- streaming (serving) -----------------------------------------------------------------------
    def init_state(self, batch_size: int, device=None) -> MemoryState:
        weights, momentum = self._initial(batch_size)
        return MemoryState(
            weights=[w.detach().to(device).clone() for w in weights],
            momentum=[s.detach().to(device).clone() for s in momentum],
            buffer=torch.zeros(batch_size, self.chunk_size, self.d_in, device=device),
            count=torch.zeros(batch_size, dtype=torch.int64, device=device),
            n=torch.zeros(batch_size, dtype=torch.int64, device=device),
        )

    def step(self, state: MemoryState, x_t: torch.Tensor, active: torch.Tensor | None = None,
             inplace: bool = False) -> MemoryState:
        """Buffer one event per user (x_t [B, d_in]); users whose buffer fills get their chunk applied,
        exactly as in training. Rows with active[b] = False are unchanged. `inplace=True` writes into
        `state`'s tensors (the stream worker's batch): no copy of the per-user weights per call."""
        B, b = state.batch_size, self.chunk_size
        if x_t.shape != (B, self.d_in):
            raise ValueError(f"x_t must be [B, d_in]=[{B}, {self.d_in}], got {tuple(x_t.shape)}")
        active = torch.ones(B, dtype=torch.bool, device=x_t.device) if active is None else active
        if active.shape != (B,) or active.dtype != torch.bool:
            raise ValueError(f"active must be a [B]={B} bool tensor, got {tuple(active.shape)} {active.dtype}")
        every_active = bool(active.all())
        rows = slice(None) if every_active else active.nonzero().squeeze(1)
        slot = state.count[rows]
        buffer = state.buffer if inplace else state.buffer.clone()
        buffer[rows if not every_active else torch.arange(B, device=x_t.device), slot] = x_t[rows]
        count = state.count + active.to(torch.int64)
        full = count == b
        weights, momentum = state.weights, state.momentum
        if bool(full.any()):
            ready = full.nonzero().squeeze(1)
            every = len(ready) == B
            take = (lambda t: t) if every else (lambda t: t[ready])
            chunk = take(buffer)
            c = self.chunks(chunk, torch.ones(chunk.shape[:2], dtype=torch.bool, device=chunk.device))
            w_new, s_new = self.chunk_update([take(w) for w in weights], [take(s) for s in momentum], c)
            if inplace:
                for t, n in zip(weights + momentum, w_new + s_new):
                    t.index_copy_(0, ready, n)
            elif every:
                weights, momentum = w_new, s_new
            else:
                weights = [w.index_copy(0, ready, n) for w, n in zip(weights, w_new)]
                momentum = [m.index_copy(0, ready, n) for m, n in zip(momentum, s_new)]
            buffer.index_fill_(0, ready, 0.0)
            count.masked_fill_(full, 0)
        n = state.n + active.to(torch.int64)
        if inplace:
            state.count.copy_(count)
            state.n.copy_(n)
            return state
        return MemoryState(weights=weights, momentum=momentum, buffer=buffer, count=count, n=n)

    def read_weights(self, state: MemoryState) -> list[torch.Tensor]:
        """The memory a read sees: the committed weights (the buffered events wait for their chunk)."""
        return state.weights

    def read(self, state: MemoryState, query: torch.Tensor) -> torch.Tensor:
        """Read of the committed memory. query [B, (C,) d_q]."""
        return self.read_memory(state.weights, query)
