"""The batch every model consumes: a target plus its history, as padded tensors.

Layout contract (shared by data, models, retrieval, service):
- history column 0 is the MOST RECENT event, column j the (j+1)-th most recent;
- `hist_pos` is the target-relative position: 1 = most recent, j + 1 in column j, 0 = padding;
- item/category id 0 is padding; columns j >= hist_len[b] are padding.

The memory branches (Aaren, Titans) read a different view, the `Timeline`: each user's whole chronological
event sequence, built on demand (`HistoryBatch.timeline()`), so that a user's memory runs once per batch
however many of the batch's rows belong to that user.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Callable

import torch


@dataclass
class Timeline:
    """The batch's users' events, OLDEST first, and where each row reads them.

    Read rule (causal, the same as the history's): row b reads the memory after the first
    `row_prefix[b]` events of its user's timeline, i.e. exactly the events before its target's position in
    the time-sorted sequence. Events with the target's timestamp that sort before it (by the dataset's
    order: ts, then item id) are read; the target itself and everything after it never are.
    """

    item: torch.Tensor        # [N] int64  user u's events are item[offsets[u]:offsets[u + 1]] (CSR, no padding)
    cate: torch.Tensor        # [N] int64
    offsets: torch.Tensor     # [U + 1] int64  (user u is given offsets[u+1] - offsets[u] >= its rows' prefixes)
    row_user: torch.Tensor    # [B] int64  index into U
    row_prefix: torch.Tensor  # [B] int64  events read by the row

    @property
    def length(self) -> torch.Tensor:  # [U]
        return self.offsets[1:] - self.offsets[:-1]

    def to(self, device: torch.device | str) -> "Timeline":
        return Timeline(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


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
    # builds the Timeline of these rows on demand (only models with memory branches ask); None when the
    # batch has no timeline behind it (then every row must have an empty history)
    timeline_source: Callable[[], Timeline] | None = None

    def timeline(self) -> Timeline:
        if self.timeline_source is not None:
            return self.timeline_source()
        if bool((self.hist_len > 0).any()):
            raise ValueError("this batch has histories but no timeline: build it with recsys.data.sequences.assemble")
        empty = torch.zeros(0, dtype=torch.int64, device=self.hist_len.device)
        rows = torch.zeros_like(self.hist_len)
        return Timeline(empty, empty, torch.zeros(2, dtype=torch.int64, device=rows.device), rows, rows)

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

    def rows_as_timelines(self) -> "HistoryBatch":
        """This batch with each row's history taken as its own user's whole timeline (a batch built by hand,
        with no event store behind it)."""
        B, L = self.hist_item.shape
        j = torch.arange(L, device=self.hist_len.device)
        src = (self.hist_len[:, None] - 1 - j[None, :]).clamp(min=0)         # oldest first
        valid = j[None, :] < self.hist_len[:, None]
        offsets = torch.zeros(B + 1, dtype=torch.int64, device=src.device)
        offsets[1:] = torch.cumsum(self.hist_len, 0)
        tl = Timeline(item=self.hist_item.gather(1, src)[valid], cate=self.hist_cate.gather(1, src)[valid],
                      offsets=offsets, row_user=torch.arange(B, device=src.device), row_prefix=self.hist_len.clone())
        return replace(self, timeline_source=lambda: tl)

    def to(self, device: torch.device | str) -> "HistoryBatch":
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self) if f.name != "timeline_source"}
        source = self.timeline_source
        return replace(self, **moved, timeline_source=None if source is None else (lambda: source().to(device)))

    def __len__(self) -> int:
        return self.batch_size
