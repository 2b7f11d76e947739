"""The torch form of `cpu.gather_keys`: its oracle and the path without a C compiler."""

from __future__ import annotations

import torch


def gather_keys(tables: list[torch.Tensor], ids: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """Field f's table rows at ids[f] [L], side by side: tables per field [rows, d] (or [rows], one
    number per row: one column) -> [L, sum d] (into `out` when given). torch's error (IndexError) on an id
    out of range."""
    tables = [t.unsqueeze(1) if t.dim() == 1 else t for t in tables]
    if out is None:
        out = torch.empty(ids[0].shape[0], sum(t.shape[1] for t in tables), dtype=tables[0].dtype)
    a = 0
    for t, i in zip(tables, ids):
        torch.index_select(t, 0, i, out=out[:, a:a + t.shape[1]])
        a += t.shape[1]
    return out
