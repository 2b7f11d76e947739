"""DIN: Deep Interest Network (arXiv 1706.06978), the target-attention baseline without search.

Every history event i gets a weight from the activation unit, an MLP on [v_t, e_i, v_t - e_i, v_t * e_i]
(not softmax-normalised, as in DIN, so the weights also carry "how much" interest); padding weighs 0;
h = sum_i a_i e_i, and the same prediction tower as DARE: MLP([v_t, h, v_t * h]). Fields: item, category.
"""

from __future__ import annotations

import torch
from torch import nn

from recsys.config.model import ModelConfig
from recsys.data.batch import HistoryBatch
from recsys.embeddings import TableSet, TableSpec
from recsys.models.layers import MLP, by_length_groups, ctr_input, init_weights
from recsys.models.output import ModelOutput


class DIN(nn.Module):
    def __init__(self, config: ModelConfig, n_items: int, n_cates: int) -> None:
        super().__init__()
        if config.aaren or config.titans:
            raise NotImplementedError("model.aaren / model.titans: the optional summary branches are DARE/TWIN only")
        self.config = config
        d = config.dim_rep
        self.rows = {"item": n_items, "cate": n_cates}
        self.tables = TableSet([TableSpec("item", n_items, d), TableSpec("cate", n_cates, d)], config.embedding_backend, config.init_std)
        self.activation_unit = MLP(4 * 2 * d, list(config.din_attention_mlp), batch_norm=False)
        self.mlp = MLP(3 * 2 * d, list(config.mlp))
        init_weights(self, config.init_std)

    def _embed(self, target: dict[str, torch.Tensor], events: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.tables({f: (target[f].reshape(-1), events[f]) for f in ("item", "cate")})
        v_t = torch.cat([emb[f][0] for f in ("item", "cate")], dim=-1)                                   # [Q, 2d]
        e = torch.cat([emb[f][1] for f in ("item", "cate")], dim=-1)                                     # [..., L, 2d]
        return v_t, e

    def attend(self, v_t: torch.Tensor, e: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """v_t [B, D], e [B, L, D], valid [B, L] -> h [B, D]."""
        q = v_t.unsqueeze(1).expand_as(e)                                         # [B, L, D]
        a = self.activation_unit(torch.cat([q, e, q - e, q * e], dim=-1)).squeeze(-1)  # [B, L]
        a = a.masked_fill(~valid, 0.0)
        return torch.einsum("bl,bld->bd", a, e)

    def forward(self, batch: HistoryBatch) -> ModelOutput:
        def group(rows: torch.Tensor, width: int) -> tuple[torch.Tensor]:
            v_t, e = self._embed({"item": batch.target_item[rows], "cate": batch.target_cate[rows]},
                                 {"item": batch.hist_item[rows, :width], "cate": batch.hist_cate[rows, :width]})
            return (ctr_input(v_t, self.attend(v_t, e, batch.hist_mask[rows, :width])),)

        (x,) = by_length_groups(batch.hist_len, self.config.group_rows, group)
        return ModelOutput(self.mlp(x).squeeze(-1), None, None)

    @torch.no_grad()
    def score_candidates(self, hist_item: torch.Tensor, hist_cate: torch.Tensor, cand_item: torch.Tensor, cand_cate: torch.Tensor) -> ModelOutput:
        """Serving: C candidates sharing one history [L] (most recent first, no padding). -> logit [C]."""
        L, C = hist_item.shape[0], cand_item.shape[0]
        if L > self.config.max_len:
            raise ValueError(f"history of {L} events exceeds max_len={self.config.max_len}; pass the most recent {self.config.max_len}")
        v_t, e = self._embed({"item": cand_item, "cate": cand_cate}, {"item": hist_item, "cate": hist_cate})
        h = self.attend(v_t, e.unsqueeze(0).expand(C, -1, -1), torch.ones(C, L, dtype=torch.bool))
        return ModelOutput(self.mlp(ctr_input(v_t, h)).squeeze(-1), None, None)
