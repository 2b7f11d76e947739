"""What every CTR model returns, and the training loss on it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class ModelOutput:
    logit: torch.Tensor                  # [B] main head
    aux_logit: torch.Tensor | None       # [B] auxiliary head, None when off
    indices: torch.Tensor | None         # [B, k] retrieved history columns, -1 = empty slot (None for DIN)




def bce_loss(out: ModelOutput, label: torch.Tensor, aux_weight: float) -> torch.Tensor:
    loss = F.binary_cross_entropy_with_logits(out.logit, label)
    if out.aux_logit is not None and aux_weight > 0:
        loss = loss + aux_weight * F.binary_cross_entropy_with_logits(out.aux_logit, label)
    return loss

