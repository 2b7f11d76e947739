"""The batch every model consumes: a target plus its history, as padded tensors.

Layout contract (shared by data, models, retrieval, service):
- history column 0 is the MOST RECENT event, column j the (j+1)-th most recent;
- `hist_pos` is the target-relative position: 1 = most recent, j + 1 in column j, 0 = padding;
- item/category id 0 is padding; columns j >= hist_len[b] are padding.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class HistoryBatch:
    user: torch.Tensor         # [B] int64
    target_item: torch.Tensor  # [B] int64
    target_cate: torch.Tensor  # [B] int64
    hist_item: torch.Tensor    # [B, L] int64, 0 = padding
    hist_cate: torch.Tensor    # [B, L] int64, 0 = padding
    hist_pos: torch.Tensor     # [B, L] int64, 1 = most recent, 0 = padding
    hist_len: torch.Tensor     # [B] int64
    label: torch.Tensor        # [B] float32 (zeros when unknown, e.g. serving)

    @property
    def batch_size(self) -> int:
        return int(self.user.shape[0])

    @property
    def max_len(self) -> int:
        return int(self.hist_item.shape[1])

    @property
    def hist_mask(self) -> torch.Tensor:  # [B, L] bool, True = real event
        L = self.hist_item.shape[1]
        return torch.arange(L, device=self.hist_len.device)[None, :] < self.hist_len[:, None]

    def to(self, device: torch.device | str) -> "HistoryBatch":
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def __len__(self) -> int:
        return self.batch_size
