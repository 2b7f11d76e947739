"""Pieces the CTR models share: MLP, init, the two-stage target attention of DARE/TWIN, loss, weights I/O.

Two-stage target attention (DARE, arXiv 2410.02604; TWIN is the same with one coupled table set):
  stage 1, search: score every history event i against the target t with attention embeddings,
      s_i = <q_sem, k_sem,i> / sqrt(d_sem) + <q_pos, k_pos,i> / sqrt(d_pos)
  (semantic part = item and category concatenated, position part scaled on its own), padding masked,
  keep the top k (retrieval.topk; no gradient flows through the choice);
  stage 2, aggregation: recompute the kept scores differentiably, w = softmax(s_kept),
      h = sum_i w_i r_i over representation embeddings,  logit = MLP([v_t, h, v_t * h]).
An auxiliary head does the same soft attention over the whole history (no top-k) with its own MLP and
adds its loss, so every attention embedding gets gradient, not only the k kept ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import retrieval
from recsys.embeddings import TableSet

NEG_INF = float("-inf")
MERGE_WIDTH_RATIO = 0.75  # by_length_groups: merge adjacent length groups whose widths differ by less


@dataclass
class ModelOutput:
    logit: torch.Tensor                  # [B] main head
    aux_logit: torch.Tensor | None       # [B] auxiliary head, None when off
    indices: torch.Tensor | None         # [B, k] retrieved history columns, -1 = empty slot (None for DIN)


@dataclass
class Fields:
    """One table set's embeddings of the targets and of some events, one tensor per field.

    Kept per field (not concatenated) so that the full-history tensors never get copied into one
    [B, L, 3d] block with gradient: the concatenation and its backward dominated the step.
    """

    target: list[torch.Tensor]   # per field [Q, d]
    events: list[torch.Tensor]   # per field [..., L, d] (or [Q, k, d] for the kept events)

    def target_vec(self) -> torch.Tensor:
        return torch.cat(self.target, dim=-1)   # [Q, D]

    def events_vec(self) -> torch.Tensor:
        return torch.cat(self.events, dim=-1)   # [..., L, D]


class MLP(nn.Module):
    """Linear -> BatchNorm -> PReLU per hidden layer, then a linear output (DIN/DARE prediction tower)."""

    def __init__(self, d_in: int, hidden: list[int], d_out: int = 1, batch_norm: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for h in hidden:
            layers += [nn.Linear(d_in, h)] + ([nn.BatchNorm1d(h)] if batch_norm else []) + [nn.PReLU()]
            d_in = h
        layers.append(nn.Linear(d_in, d_out))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def init_weights(module: nn.Module, std: float) -> None:
    """The original's init: N(0, std) on Linear weights, zero biases (tables are initialised by TableSet)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, std)
            nn.init.zeros_(m.bias)


def ctr_input(v_t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return torch.cat([v_t, h, v_t * h], dim=-1)  # [B, 3D]


def by_length_groups(lengths: torch.Tensor, rows: int, fn) -> tuple[torch.Tensor | None, ...]:
    """Run `fn(row_indices, width)` on groups of `rows` rows of similar history length, each group padded
    only to its own longest history; -> fn's outputs (tensors [b, ...] or None) reassembled in batch order.

    Lifelong histories are heavy-tailed (ml-latest-small: mean 165, max 2,698): one long user pads the
    whole batch to his length, so at the full history 88% of a [B, L] block is padding. `fn` must be
    per-row (search, attention, per-user memories): it then computes the same values on far less
    padding. Layers that mix rows (BatchNorm in the MLP) run on the reassembled batch.
    """
    order = torch.argsort(lengths, stable=True)
    groups: list[list] = []                              # [[row indices, shortest width, width], ...]
    for g in torch.split(order, rows):
        width = max(int(lengths[g[-1]]), 1)
        # a group joins the previous one while that keeps padding under 1 - MERGE_WIDTH_RATIO of the
        # merged block: another pass over the tables costs more than the little padding it would save
        # (uniform lengths stay one group)
        if groups and groups[-1][1] >= MERGE_WIDTH_RATIO * width:
            groups[-1] = [torch.cat([groups[-1][0], g]), groups[-1][1], width]
        else:
            groups.append([g, width, width])
    parts = [fn(g, width) for g, _, width in groups]
    inv = torch.argsort(order)
    return tuple(None if p[0] is None else torch.cat(p)[inv] for p in zip(*parts))


def masked_softmax(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim with invalid slots at weight 0; a row with no valid slot is all 0."""
    scores = scores.masked_fill(~valid, NEG_INF)
    w = torch.softmax(scores, dim=-1)
    return torch.nan_to_num(w, nan=0.0)


def search(att: Fields, lengths: torch.Tensor | int, k: int, segments: list[int]) -> torch.Tensor:
    """Stage 1: the top-k history columns per query by split-scaled score. -> indices [B, k], -1 = empty."""
    with torch.no_grad():
        _, idx = retrieval.topk(att.target_vec(), att.events_vec(), lengths, k, segments)
    return idx


def gather_ids(ids: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Event ids [B, L] (or [L], one shared history) at the kept columns idx [B, k]; holes read column 0."""
    safe = idx.clamp(min=0)
    return ids[safe] if ids.dim() == 1 else torch.gather(ids, 1, safe)


def _field_scores(query: list[torch.Tensor], keys: list[torch.Tensor], segments: list[int]) -> torch.Tensor:
    """The split-scaled score summed field by field: query per field [Q, d], keys [Q, n, d] or [n, d].

    Equals retrieval.scaled_scores on the concatenations (the same 1/sqrt(d_segment) per dimension),
    without building them; `segments` must fall on field boundaries.
    """
    scale = retrieval.segment_scale(sum(segments), segments)
    out, a = None, 0
    for q, x in zip(query, keys):
        d = q.shape[-1]
        qs = q * scale[a : a + d]
        s = qs @ x.transpose(-1, -2) if x.dim() == 2 else torch.einsum("qd,qnd->qn", qs, x)   # [Q, n]
        out = s if out is None else out + s
        a += d
    return out


def _weighted_sum(w: torch.Tensor, values: list[torch.Tensor]) -> torch.Tensor:
    """w [Q, n], values per field [Q, n, d] or [n, d] -> [Q, D]."""
    return torch.cat([w @ v if v.dim() == 2 else torch.einsum("qn,qnd->qd", w, v) for v in values], dim=-1)


def kept_weights(att_kept: Fields, idx: torch.Tensor, segments: list[int]) -> torch.Tensor:
    """Stage 2's target-attention weights over the kept events: softmax of their search scores. -> [B, k]."""
    return masked_softmax(_field_scores(att_kept.target, att_kept.events, segments), idx >= 0)


def aggregate(att_kept: Fields, rep_kept: Fields, idx: torch.Tensor, segments: list[int]) -> torch.Tensor:
    """Stage 2 over the kept events (embedded with gradient): w = softmax(s_kept), h = sum_i w_i r_i. -> [B, D_r]."""
    return _weighted_sum(kept_weights(att_kept, idx, segments), rep_kept.events)


def soft_attention(att: Fields, rep: Fields, lengths: torch.Tensor | int, segments: list[int]) -> torch.Tensor:
    """The auxiliary head's aggregation: softmax over every history event (no top-k). -> [B, D_r]."""
    s = _field_scores(att.target, att.events, segments)             # [B, L]
    L = att.events[0].shape[-2]
    n = torch.as_tensor(lengths, device=s.device).reshape(-1, 1)
    valid = torch.arange(L, device=s.device)[None, :] < n            # [B, L]
    return _weighted_sum(masked_softmax(s, valid), rep.events)


def bce_loss(out: ModelOutput, label: torch.Tensor, aux_weight: float) -> torch.Tensor:
    loss = F.binary_cross_entropy_with_logits(out.logit, label)
    if out.aux_logit is not None and aux_weight > 0:
        loss = loss + aux_weight * F.binary_cross_entropy_with_logits(out.aux_logit, label)
    return loss


def table_sets(model: nn.Module) -> dict[str, TableSet]:
    return {n: m for n, m in model.named_modules() if isinstance(m, TableSet)}


def dense_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter outside the embedding tables (these get Adam with L2)."""
    table_ids = {id(p) for t in table_sets(model).values() for p in t.parameters()}
    return [p for p in model.parameters() if id(p) not in table_ids]


def state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """All weights and buffers as plain named tensors (tables as `<set>.<table>`; works when sharded)."""
    sets = table_sets(model)
    out = {f"{s}.{n}": w.contiguous() for s, t in sets.items() for n, w in t.weights().items()}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if not any(name.startswith(s + ".") for s in sets):
            out[name] = t.detach().contiguous()
    return out


def load_state_tensors(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    sets = table_sets(model)
    expected = {n for n, _ in list(model.named_parameters()) + list(model.named_buffers()) if not any(n.startswith(s + ".") for s in sets)}
    expected |= {f"{s}.{n}" for s, t in sets.items() for n in t.specs}
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise KeyError(f"model weights: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    for s, t in sets.items():
        t.load_weights({n: state[f"{s}.{n}"] for n in t.specs})
    own = dict(list(model.named_parameters()) + list(model.named_buffers()))
    with torch.no_grad():
        for name in expected:
            if name in own:
                if own[name].shape != state[name].shape:
                    raise ValueError(f"model weight {name!r}: shape {tuple(state[name].shape)}, expected {tuple(own[name].shape)}")
                own[name].copy_(state[name])
