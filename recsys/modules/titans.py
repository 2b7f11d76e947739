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

Partial last chunk: the events after the last full chunk are applied, as one (shorter) chunk, when the
memory is read, but not committed: `forward` reads after all events, and `step` keeps them in a buffer,
commits a chunk when it holds `chunk_size` events and applies the buffer on the fly in `read`. So the
read after events 1..T is the same in training and serving, for every T.

Read: y = M_T(normalize(q W_Q)) for a query (the target item) [B, d_q] or candidates [B, C, d_q].
Layout: x [B, L, d_in] chronological (oldest first), left-aligned, padded at the end; lengths [B].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

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


class NeuralMemory(nn.Module):
    def __init__(self, d_in: int, d_key: int = 32, d_hidden: int = 32, depth: int = 2, chunk_size: int = 16,
                 d_query: int | None = None, gate_bias: tuple[float, float, float] = (2.0, -2.0, -4.0),
                 max_lr: float = 0.1, max_grad_norm: float = 1.0):
        super().__init__()
        if depth < 2:
            raise ValueError(f"depth must be >= 2 (a deep memory), got {depth}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if max_lr <= 0 or max_grad_norm <= 0:
            raise ValueError(f"max_lr and max_grad_norm must be > 0, got {max_lr}, {max_grad_norm}")
        self.d_in, self.d_key, self.chunk_size = d_in, d_key, chunk_size
        self.max_lr, self.max_grad_norm = max_lr, max_grad_norm
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
        # forward through the memory at the chunk-start weights, keeping what backprop needs
        hs, zs = [c.k], []
        for j, w in enumerate(weights):
            z = hs[-1] @ w                                                    # [B, b, d_j]
            zs.append(z)
            if j < len(weights) - 1:
                hs.append(F.silu(z))
        delta = 2 * (zs[-1] - c.v)                                            # d l / d out  [B, b, d_key]
        deltas = [delta]
        for j in range(len(weights) - 1, 0, -1):
            delta = (delta @ weights[j].transpose(1, 2)) * _silu_grad(zs[j - 1])
            deltas.append(delta)
        deltas.reverse()                                                      # deltas[j] pairs with hs[j]
        # per-token clip: every layer's gradient is the outer product h^T delta, of norm |h| |delta|
        g_sq = sum(h.square().sum(-1) * d.square().sum(-1) for h, d in zip(hs, deltas))  # [B, b]
        theta = c.theta * torch.rsqrt((g_sq / self.max_grad_norm ** 2).clamp(min=1.0))
        coef_m, coef_s = c.to_m * theta, c.to_s * theta                      # [B, b] each
        keep_all, s0_to_m, e_all = (t[:, None, None] for t in (c.keep_all, c.s0_to_m, c.e_all))
        new_w, new_s = [], []
        for w, s, h, d in zip(weights, momentum, hs, deltas):
            # both weighted gradient sums of this layer in one matmul: [h coef_m, h coef_s]^T delta
            g = torch.cat([h * coef_m[..., None], h * coef_s[..., None]], -1).transpose(1, 2) @ d
            g_m, g_s = g.split(h.shape[-1], 1)                                # [B, d_(j-1), d_j] each
            new_w.append(keep_all * w + s0_to_m * s - g_m)
            new_s.append(e_all * s - g_s)
        return new_w, new_s

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
        the user's event count) -> per layer [B, d_(j-1), d_j]: the memory after the row's first
        `row_prefix` events, its open chunk applied as `read` applies a state's buffer. So a row's read
        equals `read` of the state streamed over those events (tests/test_memory_timeline.py).

        The full chunks run once per user, keeping the memory at every chunk boundary; each row then takes
        its boundary floor(prefix / b) and applies its < b remaining events as one chunk."""
        b = self.chunk_size
        if x.dim() != 2 or x.shape[0] != int(offsets[-1]) or row_user.shape != row_prefix.shape or row_user.dim() != 1:
            raise ValueError(f"x must be [offsets[-1], d_in], row_user and row_prefix equal [B] shapes; got "
                             f"{tuple(x.shape)}, {tuple(row_user.shape)}, {tuple(row_prefix.shape)}")
        blocks = TimelineBlocks.of(offsets, b)
        at, src, real = blocks.rows(offsets, row_user, row_prefix, b)                 # [B], [B, b], [B, b]
        boundaries = self._chunk_boundaries(x, blocks, len(offsets) - 1)
        n_layers = len(self.init_weights)
        weights, momentum = [w[at] for w in boundaries[:n_layers]], [s[at] for s in boundaries[n_layers:]]
        if x.shape[0] == 0:
            part = x.new_zeros(len(row_user), b, self.d_in)
        else:
            part = x[src].masked_fill(~real[..., None], 0.0)                         # [B, b, d_in]
        return self.chunk_update(weights, momentum, self.chunks(part, real))[0]

    def _chunk_boundaries(self, x: torch.Tensor, blocks: TimelineBlocks, U: int) -> list[torch.Tensor]:
        """The memory at every full-chunk boundary of every user, stacked in `blocks`' boundary order:
        per layer the weights, then per layer the momenta."""
        # keys, values and coefficients need no memory: computed for every (chunk, user) pair at once (one
        # gather, so the backward is one index_add, not a zero-filled copy per chunk), then split by chunk
        src = blocks.src
        every = self.chunks(x[src], torch.ones(src.shape, dtype=torch.bool, device=x.device))
        parts = [t.split(blocks.active) for t in vars(every).values()] if blocks.active else []
        weights, momentum = self._initial(U)
        saved = [(weights, momentum)]
        for i, a in enumerate(blocks.active):
            if a < weights[0].shape[0]:
                weights, momentum = [w[:a] for w in weights], [s[:a] for s in momentum]
            weights, momentum = self.chunk_update(weights, momentum, _Chunk(*(p[i] for p in parts)))
            saved.append((weights, momentum))
        n_layers = len(self.init_weights)
        return ([torch.cat([w[j] for w, _ in saved]) for j in range(n_layers)]
                + [torch.cat([s[j] for _, s in saved]) for j in range(n_layers)])

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """x [B, L, d_in], lengths [B], query [B, d_q] or [B, C, d_q] -> read [B, (C,) d_key]
        after all events (the partial last chunk applied, as `read` does)."""
        return self.read_memory(self._run_chunks(x, lengths)[0], query)

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
        """The memory after all events so far: the committed weights with the open chunk applied."""
        real = torch.arange(self.chunk_size, device=state.count.device)[None, :] < state.count[:, None]
        return self.chunk_update(state.weights, state.momentum, self.chunks(state.buffer, real))[0]

    def read(self, state: MemoryState, query: torch.Tensor) -> torch.Tensor:
        """Read after all events so far, the open chunk applied (not committed). query [B, (C,) d_q]."""
        return self.read_memory(self.read_weights(state), query)
