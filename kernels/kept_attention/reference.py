"""The torch form of `cpu.attend`: its oracle and the path without a C compiler."""

from __future__ import annotations

import torch

from kernels.gather_keys import cpu as gather

NEG_INF = float("-inf")


def attend(query: torch.Tensor, att: list[torch.Tensor], rep: list[torch.Tensor], ids: list[torch.Tensor],
           valid: torch.Tensor) -> torch.Tensor:
    """query [C, dq]: each target's scaled folded query; att / rep: per field the attention table [rows, d]
    (the last may be [rows]: the folded position number) and the representation table [rows, d_r]; ids per
    field [C k]: the kept events' table rows (holes: any row); valid [C, k]: which slots hold an event.
    -> [C, sum d_r]: per target sum_j w_j rep_j, w = softmax over its valid slots of <key_j, query> (0 at a
    hole; all 0 in a row without events)."""
    C, k = valid.shape
    keys = gather.gather_keys(att, ids).view(C, k, -1)                                  # [C, k, dq]
    scores = (keys * query.unsqueeze(1)).sum(-1).masked_fill(~valid, NEG_INF)           # [C, k]
    w = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)                        # a row of holes: 0
    r = gather.gather_keys(rep, ids).view(C, k, -1)                                     # [C, k, d_r]
    return (w.unsqueeze(-1) * r).sum(-2)
