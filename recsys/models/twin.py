"""TWIN (arXiv 2302.05610) as DARE's baseline: the same two-stage model with ONE coupled table set.

Each embedding serves both roles, scoring events against the target (stage 1 and the softmax of stage 2)
and being what the kept events contribute. DARE's argument is that this coupling lets the attention
gradient dominate the shared vectors; TWIN here is DARE with `att_* = rep_*`, so the comparison isolates it.
"""

from __future__ import annotations

import torch

from recsys.config.model import ModelConfig
from recsys.embeddings import TableSet
from recsys.models.attention import Fields
from recsys.models.dare import DARE


class TWIN(DARE):
    def build_tables(self, config: ModelConfig) -> None:
        self.tables = self._tables("", config.dim_rep, config)
        self.segments = [2 * config.dim_rep, config.dim_rep]

    def role_tables(self) -> tuple[tuple[TableSet, str], tuple[TableSet, str]]:
        return (self.tables, ""), (self.tables, "")

    def embed(self, target: dict[str, torch.Tensor], events: dict[str, torch.Tensor], grad: bool, rep: bool = True) -> tuple[Fields, Fields | None]:
        fields = self._fields(self.tables, "", target, events, grad)
        return fields, (fields if rep else None)
