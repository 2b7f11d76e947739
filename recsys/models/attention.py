"""Two-stage target attention of DARE and TWIN (DARE, arXiv 2410.02604; TWIN is the same with one coupled
table set):
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

import retrieval
from kernels.gather_keys.cpu import gather_keys
from kernels.kept_attention import cpu as kept_attention
from retrieval import lend

NEG_INF = float("-inf")


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



def masked_softmax(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim with invalid slots at weight 0; a row with no valid slot is all 0."""
    scores = scores.masked_fill(~valid, NEG_INF)
    w = torch.softmax(scores, dim=-1)
    return torch.nan_to_num(w, nan=0.0)


def _foldable(qp: torch.Tensor, segments: list[int]) -> bool:
    """Whether the last field (qp [Q, d]) is DARE's position segment with one row shared by every query."""
    return len(segments) == 2 and segments[1] == qp.shape[-1] and torch.equal(qp, qp[:1].expand_as(qp))


def stage1_inputs(target: list[torch.Tensor], events: list[torch.Tensor],
                  segments: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The search's (query, keys, segments) for retrieval.topk, with the position segment folded into one
    key column when every target reads the same position row (DARE and TWIN: targets are position 0):
    <q_pos, k_pos,i> / sqrt(d_pos) is then one number per event, b_i, shared by all queries, so
        s_i = <q_sem, k_sem,i> / sqrt(d_sem) + 1 * b_i,
    a (d_sem + 1)-wide search instead of d_sem + d_pos (at L = 100k, C = 200 on one thread: 13.3 -> 10.9 ms
    for the fused kernel). Training, serving and the block index (service.block_index) all search through
    here, so their stage-1 scores are the same numbers. target per field [Q, d]; events per field
    [Q, L, d] or [L, d]; segments [d_sem, d_pos] fall on the last field's boundary."""
    if not _foldable(target[-1], segments):
        return torch.cat(target, -1), torch.cat(events, -1), segments
    query, w = _folded_query(target, segments)
    bias = (events[-1] * w).sum(-1, keepdim=True)                          # [..., L, 1]: elementwise, then a
    return query, torch.cat(events[:-1] + [bias], -1), [segments[0], 1]    # sum of d_pos: the same per event


def _folded_query(target: list[torch.Tensor], segments: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """-> the folded search's query (semantic fields, then 1 for the position column) and the scaled shared
    position row w that makes each event's position number <k_pos, w>."""
    qp = target[-1]
    return torch.cat(target[:-1] + [qp.new_ones(qp.shape[0], 1)], -1), qp[0] * (1.0 / segments[1] ** 0.5)


class RowBias:
    """The folded position field per table row, (table * w).sum(-1), kept while the table and w stay the same:
    it depends on the model only, and at a position table of 100k rows its [rows, d] product cost ~1.8 ms
    per request (thread CPU, L = 100k). A table is "the same" while its storage, shape and version counter
    are (in-place writes through the parameter or a detach(), load_state_dict, optimizer steps all bump the
    counter; writes through `.data` do not and are not seen). One entry, replaced as a whole, so threads
    sharing a model read a consistent one."""

    def __init__(self) -> None:
        self._entry: tuple | None = None

    def __call__(self, table: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if table.is_inference():  # no version counter to tell a change by
            return _row_bias(table, w)
        key = (table.data_ptr(), table._version, tuple(table.shape), table.dtype)
        entry = self._entry
        if entry is not None and entry[0] == key and torch.equal(entry[1], w):
            return entry[2]
        bias = _row_bias(table, w)
        self._entry = (key, w.clone(), bias, table)  # the table held: its address cannot go to another one
        return bias

    def __getstate__(self) -> dict:  # a copied or pickled model rebuilds it from its own tables
        return {"_entry": None}


def _row_bias(table: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (table * w).sum(-1)


def stage1_from_tables(target: list[torch.Tensor], tables: list[torch.Tensor], ids: list[torch.Tensor],
                       segments: list[int], row_bias: RowBias | None = None) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """`stage1_inputs` for one shared history given as table rows (tables per field [rows, d], ids per field
    [L]): every field gathered straight into its columns of the keys, and the folded position field computed
    once per table row, then gathered as one number per event. The same numbers as `stage1_inputs` on the
    gathered rows (the same elementwise product and sum of d_pos per row), without the [L, d] copies and
    their concatenation (serving: at L = 1M these cost more than the search); each event's key row written
    once by `kernels.gather_keys` (C, where it runs these tensors; the same bits as its torch form).
    `row_bias`: a cache of the per-row position numbers across calls (the model's)."""
    qp = target[-1]
    if not _foldable(qp, segments):
        return stage1_inputs(target, [t.index_select(0, i) for t, i in zip(tables, ids)], segments)
    query, w = _folded_query(target, segments)
    fields = [*tables[:-1], (row_bias or _row_bias)(tables[-1], w)]
    lender = lend.current()   # a service batch with a core to spare (retrieval.lend)
    keys = lender.gather(fields, ids) if lender is not None else None
    return query, gather_keys(fields, ids) if keys is None else keys, [segments[0], 1]


def folded_kept_attention(target: list[torch.Tensor], tables: list[torch.Tensor], rep: list[torch.Tensor],
                          ids: list[torch.Tensor], idx: torch.Tensor, segments: list[int],
                          row_bias: RowBias | None = None) -> torch.Tensor:
    """Stage 2's attention for one served history's kept events given as table rows (attention tables per
    field [rows, d], representation tables per field [rows, d_r], ids per field [C k], idx [C, k]): each kept
    event's key in stage1_from_tables' folded layout scored against its target, softmax over the target's
    kept slots, and the representation rows summed with those weights -> [C, sum d_r]. `kept_weights` and
    `aggregate`'s function (per-field batched products there: another summation order), in one pass over the
    kept rows (`kernels.kept_attention`, C where it runs these tensors). Every served target reads position
    row 0, so the position field folds (stage1_inputs)."""
    if not _foldable(target[-1], segments):
        raise ValueError(f"folded_kept_attention: segments {segments} with per-target position rows do not fold")
    query, w = _folded_query(target, segments)                                        # [C, d_sem + 1]
    q = query * retrieval.segment_scale(query.shape[1], [segments[0], 1])
    att = [*tables[:-1], (row_bias or _row_bias)(tables[-1], w)]
    return kept_attention.attend(q, att, rep, ids, idx >= 0)


def search(att: Fields, lengths: torch.Tensor | int, k: int, segments: list[int]) -> torch.Tensor:
    """Stage 1: the top-k history columns per query by split-scaled score. -> indices [B, k], -1 = empty."""
    with torch.no_grad():
        query, keys, segs = stage1_inputs(att.target, att.events, segments)
        _, idx = retrieval.topk(query, keys, lengths, k, segs)
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


_SMALL_N = 256  # retrieval's largest k: up to it, values are kept events


def _weighted_sum(w: torch.Tensor, values: list[torch.Tensor]) -> torch.Tensor:
    """w [Q, n], values per field [Q, n, d] or [n, d] -> [Q, D]. Per-row values over the kept events (n = k)
    as a product and a sum: einsum's Q one-row batched matmuls cost 2-3x more, with gradient too (C = 200,
    k = 20, d = 16: 0.33 -> 0.09 ms for three fields on one thread); over a whole history (the auxiliary
    head) the product's [Q, n, d] temporary would be the size of the history's embeddings, so einsum."""
    return torch.cat([w @ v if v.dim() == 2 else (w.unsqueeze(-1) * v).sum(-2) if v.shape[-2] <= _SMALL_N
                      else torch.einsum("qn,qnd->qd", w, v) for v in values], dim=-1)


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

