"""Aaren: multi-head streaming attention with a constant-size per-user state ("Attention as an RNN").

Each head h has a learned, input-independent query q_h. Over the events seen so far (oldest first) head h
outputs softmax attention o_h = sum_i softmax_i(s_i) v_i with s_i = <q_h, k_i> / sqrt(d_head) (+ recency
term). That is the prefix scan of (m, u, w) in kernels/aaren_scan, so training computes every prefix
output in parallel and serving folds one event into (m, u, w) per head in O(d_head).

Block (pre-LN, stackable like a transformer layer; z_t is the layer input at event t):
    a_t = LN1(z_t);  k_t, v_t = a_t W_k, a_t W_v;  o_t = concat_h Aaren_h(events 1..t)
    z'_t = z_t + o_t W_o;   y_t = z'_t + FFN(LN2(z'_t))
Model: z^0_t = x_t W_in, n_layers blocks, summary = LN_out(y^top_T) after the last event T; 0 when the
history is empty. Layer l+1 reads layer l's prefix outputs, so the streaming state keeps (m, u, w) for
every layer; the top layer's output at T also needs z^top_T (its residual input), kept as `x_last`.

Recency slope (optional, per head, slope_h = softplus(r_h) >= 0): the score of an event d steps before
the latest one is s - slope_h d. Shifting every score by the same amount leaves the softmax unchanged,
so the parallel form scores event i as s_i + slope_h i, and the state keeps m relative to the latest
event: `step` lowers m by slope_h before folding in the new event.

Layout: x [B, L, d_in] chronological (oldest first), left-aligned, padded at the end; lengths [B].
HistoryBatch is most-recent-first: convert with `recsys.modules.seq.chronological`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kernels.aaren_scan import aaren_reduce_reference, aaren_scan, combine, identity, output
from recsys.modules.seq import TimelineBlocks, valid_mask

NEG_INF = float("-inf")


@dataclass
class AarenState:
    """Per-user streaming state; every tensor has the user batch as dim 0 (see state_codec)."""

    m: torch.Tensor       # [B, n_layers, H]          running max score, relative to the latest event
    u: torch.Tensor       # [B, n_layers, H]          sum_i e^(s_i - m)
    w: torch.Tensor       # [B, n_layers, H, d_head]  sum_i e^(s_i - m) v_i
    x_last: torch.Tensor  # [B, d_model]              top layer's input at the latest event
    n: torch.Tensor       # [B] int64                 events folded in

    @property
    def batch_size(self) -> int:
        return int(self.n.shape[0])


class AarenLayer(nn.Module):
    def __init__(self, d_model: int, n_heads: int, recency_slope: bool, ffn_mult: int = 2):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.h, self.dh = n_heads, d_model // n_heads
        self.norm1 = nn.LayerNorm(d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.query = nn.Parameter(torch.randn(n_heads, self.dh) * 0.02)
        self.out = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, ffn_mult * d_model), nn.GELU(), nn.Linear(ffn_mult * d_model, d_model))
        # heads start with recency scales spread from ~1000 to ~10 events (softplus^-1 of the slope)
        init = torch.logspace(-3, -1, n_heads) if n_heads > 1 else torch.tensor([1e-2])
        self.slope_raw = nn.Parameter(torch.log(torch.expm1(init))) if recency_slope else None

    def slope(self) -> torch.Tensor | None:  # [H]
        return None if self.slope_raw is None else F.softplus(self.slope_raw)

    def scores_values(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z [..., d_model] -> s [..., H], v [..., H, d_head]."""
        k, v = self.kv(self.norm1(z)).chunk(2, dim=-1)
        k = k.unflatten(-1, (self.h, self.dh))
        v = v.unflatten(-1, (self.h, self.dh))
        return (k * self.query).sum(-1) / math.sqrt(self.dh), v

    def block(self, z: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """Residual + FFN around the attention output. z [..., d_model], o [..., H, d_head]."""
        z = z + self.out(o.flatten(-2))
        return z + self.ffn(self.norm2(z))


class Aaren(nn.Module):
    def __init__(self, d_in: int, d_model: int = 32, n_heads: int = 2, n_layers: int = 1,
                 recency_slope: bool = True, ffn_mult: int = 2):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        self.d_in, self.d_model, self.d_out = d_in, d_model, d_model
        self.in_proj = nn.Linear(d_in, d_model)
        self.layers = nn.ModuleList(AarenLayer(d_model, n_heads, recency_slope, ffn_mult) for _ in range(n_layers))
        self.out_norm = nn.LayerNorm(d_model)

    # ---- parallel (training / state rebuild) -------------------------------------------------------
    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """x [B, L, d_in], lengths [B] -> summary after the last real event [B, d_out] (0 if empty)."""
        return self._parallel(x, lengths, all_positions=False)[0]

    def forward_all(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Every prefix output: [B, L, d_out], position t = summary after events 0..t (0 on padding)."""
        return self._parallel(x, lengths, all_positions=True)[0]

    def forward_state(self, x: torch.Tensor, lengths: torch.Tensor) -> AarenState:
        """The streaming state after all real events, computed in parallel (rebuild from a history)."""
        return self._parallel(x, lengths, all_positions=False)[1]

    def _parallel(self, x: torch.Tensor, lengths: torch.Tensor, all_positions: bool):
        B, L, _ = x.shape
        if lengths.shape != (B,):
            raise ValueError(f"lengths must be [B]={B}, got {tuple(lengths.shape)}")
        valid = valid_mask(lengths, L)                                        # [B, L]
        last = (lengths - 1).clamp(min=0)                                     # [B]
        nonempty = lengths > 0
        pos = torch.arange(L, device=x.device, dtype=x.dtype)
        z = self.in_proj(x)                                                   # [B, L, d]
        ms, us, ws = [], [], []
        for i, layer in enumerate(self.layers):
            top = i == len(self.layers) - 1
            s, v = layer.scores_values(z)                                     # [B, L, H], [B, L, H, dh]
            slope = layer.slope()
            if slope is not None:
                s = s + slope * pos[:, None]
            s = s.masked_fill(~valid[..., None], NEG_INF)
            H, dh = layer.h, layer.dh
            s_rows = s.permute(0, 2, 1).reshape(B * H, L)                     # [B*H, L]
            v_rows = v.permute(0, 2, 1, 3).reshape(B * H, L, dh)              # [B*H, L, dh]
            if top and not all_positions:
                # only the final element of the top layer's scan is needed: a masked softmax reduction
                m, u, w = (t.reshape(B, H, *t.shape[1:]) for t in aaren_reduce_reference(s_rows, v_rows))
                z_last = z[torch.arange(B), last]                             # [B, d]
                out = layer.block(z_last, output(u, w))                       # [B, d]
            else:
                o, m_all, u_all = aaren_scan(s_rows, v_rows)
                o = o.reshape(B, H, L, dh)
                at = last[:, None, None].expand(B, H, 1)
                m = m_all.reshape(B, H, L).gather(2, at).squeeze(2)           # [B, H]
                u = u_all.reshape(B, H, L).gather(2, at).squeeze(2)
                w = o.gather(2, at[..., None].expand(B, H, 1, dh)).squeeze(2) * u[..., None]
                z_last = z[torch.arange(B), last]
                z = layer.block(z, o.permute(0, 2, 1, 3))                     # [B, L, d]
                out = z
            if slope is not None:  # make m relative to the latest event, as `step` keeps it
                m = m - slope * last.to(x.dtype)[:, None]
            ms.append(m)
            us.append(u)
            ws.append(w)
        out = self.out_norm(out)
        mask = valid[..., None] if all_positions else nonempty[:, None]
        out = out.masked_fill(~mask, 0.0)
        state = AarenState(
            m=torch.stack(ms, 1), u=torch.stack(us, 1), w=torch.stack(ws, 1),
            x_last=z_last.masked_fill(~nonempty[:, None], 0.0), n=lengths.to(torch.int64),
        )
        return out, state

    def prefix_reads(self, x: torch.Tensor, offsets: torch.Tensor, row_user: torch.Tensor, row_prefix: torch.Tensor,
                     block: int = 64) -> torch.Tensor:
        """Training on timelines: x [N, d_in] the users' events oldest first, user u's at
        offsets[u]:offsets[u + 1] (CSR); row_user [B], row_prefix [B] -> [B, d_out], the summary after
        the row's first `row_prefix` events (0 when none): `read` of the state streamed over them.

        One layer (the summary needs (m, u, w) and the input at the row's last event only): the events
        are cut into blocks of `block` per user; every full block is reduced once, the block reductions
        are prefix-combined per user (a loop over block index, all users at once), and each row combines
        its boundary with the < `block` events after it. O(N) work, not a scan over a padded [U, T].
        Stacked layers need every position's output: they take the padded parallel scan instead."""
        if len(self.layers) != 1:
            return self._padded_prefix_reads(x, offsets, row_user, row_prefix)
        layer = self.layers[0]
        U, N = len(offsets) - 1, x.shape[0]
        blocks = TimelineBlocks.of(offsets, block)
        at, src, real = blocks.rows(offsets, row_user, row_prefix, block)            # [B], [B, block] x 2
        if N == 0:
            return x.new_zeros(len(row_user), self.d_out)
        z = self.in_proj(x)                                                   # [N, d]
        s, v = layer.scores_values(z)                                         # [N, H], [N, H, dh]
        slope = layer.slope()
        if slope is not None:  # index of the event in its user's timeline (the parallel form's position)
            i = torch.arange(N, device=x.device) - torch.repeat_interleave(offsets[:-1], offsets[1:] - offsets[:-1])
            s = s + slope * i.to(s.dtype)[:, None]
        H, dh = layer.h, layer.dh

        def reduce(idx: torch.Tensor, scores: torch.Tensor):  # (m, u, w) over each row of event indices
            R = idx.shape[0]
            out = aaren_reduce_reference(scores.transpose(1, 2).reshape(-1, block),
                                         v[idx].permute(0, 2, 1, 3).reshape(-1, block, dh))
            return tuple(t.reshape(R, H, *t.shape[1:]) for t in out)

        m, u, w = identity((U, H), dh, s.dtype, x.device)
        saved = [(m, u, w)]
        if blocks.active:
            parts = [t.split(blocks.active) for t in reduce(blocks.src, s[blocks.src])]
            for c, a in enumerate(blocks.active):
                if a < m.shape[0]:
                    m, u, w = m[:a], u[:a], w[:a]
                m, u, w = combine((m, u, w), tuple(p[c] for p in parts))
                saved.append((m, u, w))
        carry = tuple(torch.cat([t[k] for t in saved])[at] for k in range(3))    # [B, H(, dh)]
        _, u_t, w_t = combine(carry, reduce(src, s[src].masked_fill(~real[..., None], NEG_INF)))
        z_last = z[(offsets[row_user] + row_prefix - 1).clamp(min=0)]               # [B, d]
        out = self.out_norm(layer.block(z_last, output(u_t, w_t)))
        return out.masked_fill((row_prefix == 0)[:, None], 0.0)

    def _padded_prefix_reads(self, x, offsets, row_user, row_prefix) -> torch.Tensor:
        lengths = offsets[1:] - offsets[:-1]
        T = int(lengths.max()) if len(lengths) else 0
        if T == 0:
            return x.new_zeros(len(row_prefix), self.d_out)
        valid = torch.arange(T, device=x.device)[None, :] < lengths[:, None]      # [U, T]
        padded = x.new_zeros(len(lengths), T, x.shape[-1]).masked_scatter(valid[..., None], x)
        out = self.forward_all(padded, lengths)                                   # after events 0..t
        read = out[row_user, (row_prefix - 1).clamp(min=0)]
        return read.masked_fill((row_prefix == 0)[:, None], 0.0)

    # ---- streaming (serving) -----------------------------------------------------------------------
    def init_state(self, batch_size: int, device=None) -> AarenState:
        n_layers, H, dh = len(self.layers), self.layers[0].h, self.layers[0].dh
        return AarenState(
            m=torch.full((batch_size, n_layers, H), NEG_INF, device=device),
            u=torch.zeros(batch_size, n_layers, H, device=device),
            w=torch.zeros(batch_size, n_layers, H, dh, device=device),
            x_last=torch.zeros(batch_size, self.d_model, device=device),
            n=torch.zeros(batch_size, dtype=torch.int64, device=device),
        )

    def step(self, state: AarenState, x_t: torch.Tensor, active: torch.Tensor | None = None) -> AarenState:
        """Fold one event per user: x_t [B, d_in]; rows with active[b] = False are returned unchanged."""
        B = state.batch_size
        if x_t.shape != (B, self.d_in):
            raise ValueError(f"x_t must be [B, d_in]=[{B}, {self.d_in}], got {tuple(x_t.shape)}")
        active = torch.ones(B, dtype=torch.bool, device=x_t.device) if active is None else active
        if active.shape != (B,) or active.dtype != torch.bool:
            raise ValueError(f"active must be a [B]={B} bool tensor, got {tuple(active.shape)} {active.dtype}")
        z = self.in_proj(x_t)                                                 # [B, d]
        ms, us, ws = [], [], []
        for i, layer in enumerate(self.layers):
            s, v = layer.scores_values(z)                                     # [B, H], [B, H, dh]
            m_prev = state.m[:, i]
            slope = layer.slope()
            if slope is not None:
                m_prev = m_prev - slope
            m, u, w = combine((m_prev, state.u[:, i], state.w[:, i]), (s, torch.ones_like(s), v))
            ms.append(m)
            us.append(u)
            ws.append(w)
            if i < len(self.layers) - 1:
                z = layer.block(z, output(u, w))
        a1, a2, a3 = active[:, None, None], active[:, None, None, None], active[:, None]
        return AarenState(
            m=torch.where(a1, torch.stack(ms, 1), state.m),
            u=torch.where(a1, torch.stack(us, 1), state.u),
            w=torch.where(a2, torch.stack(ws, 1), state.w),
            x_last=torch.where(a3, z, state.x_last),
            n=state.n + active.to(torch.int64),
        )

    def read(self, state: AarenState) -> torch.Tensor:
        """Summary after the latest event [B, d_out]; 0 for users with no events (as `forward`)."""
        top = self.layers[-1]
        out = self.out_norm(top.block(state.x_last, output(state.u[:, -1], state.w[:, -1])))
        return out.masked_fill(~(state.n > 0)[:, None], 0.0)

    def merge(self, a: AarenState, b: AarenState) -> AarenState:
        """State of events(a) followed by events(b), each folded from an empty state.

        Only for one layer, by design (docs/models.md): layer l+1's leaf at event t is built from layer l's
        output at t, which depends on every earlier event, so b's upper-layer (m, u, w), folded without
        a's events, summed the wrong leaves and no combination of the two states can repair that. Stacked
        models rebuild from the history instead (`forward_state`)."""
        if len(self.layers) != 1:
            raise ValueError(f"merge needs n_layers == 1 (got {len(self.layers)}): a stacked layer's inputs at every "
                             "position depend on the earlier segment's events; rebuild with forward_state over the "
                             "whole history instead")
        slope = self.layers[0].slope()
        m_a = a.m if slope is None else a.m - slope * b.n.to(a.m.dtype)[:, None, None]
        m, u, w = combine((m_a, a.u, a.w), (b.m, b.u, b.w))
        return AarenState(m=m, u=u, w=w, x_last=torch.where((b.n > 0)[:, None], b.x_last, a.x_last), n=a.n + b.n)
