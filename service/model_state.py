"""The served model as the service sees it, and the StateUpdater that keeps per-user state for it.

`ServingModel` wraps a loaded bundle: its version, its id space (ids outside a table map to the
out-of-vocabulary row 0, the padding row, which the models never train as a target or as a real event:
an unseen id scores like "nothing known about it"), and one call to score one user's candidates.

`ModelStateUpdater` implements `service.state.StateUpdater` for the stream worker and for rebuilds: the
per-user streaming state of the model's summary branches, as bytes. A model with no streaming branch
keeps an empty state (b""), so the state store's bookkeeping (version, rev) is the same for every model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from recsys.data.batch import HistoryBatch
from service.keys import check_version

OOV_ID = 0


@dataclass
class ServingModel:
    model: nn.Module          # in eval mode; exposes score_candidates(hist_item, hist_cate, cand_item, cand_cate)
    version: str
    n_items: int              # rows of the item table (ids >= n_items are out of vocabulary)
    n_cates: int
    max_len: int              # the most recent events a forward reads

    def __post_init__(self) -> None:
        check_version(self.version)
        self.model.eval()
        # The auxiliary soft-attention head only exists to train attention embeddings: serving returns the
        # main head, so skip its O(C x L) pass. (Until score_candidates offers this itself.)
        if getattr(self.model, "aux_mlp", None) is not None:
            self.model.aux_mlp = None

    @classmethod
    def from_bundle(cls, path: str | Path) -> "ServingModel":
        from recsys.bundle import load_bundle

        b = load_bundle(Path(path))
        ids = b.id_space
        return cls(model=b.model, version=b.version, n_items=int(ids["n_items"]), n_cates=int(ids["n_cates"]),
                   max_len=int(ids["max_len"]))

    @property
    def needs_state(self) -> bool:
        return False

    def map_ids(self, ids: np.ndarray, field: str) -> tuple[torch.Tensor, int]:
        """Raw ids [N] -> table ids [N] int64 (out-of-vocabulary -> OOV_ID), and how many were OOV."""
        rows = self.n_items if field == "item" else self.n_cates
        t = torch.from_numpy(np.array(ids, dtype=np.int64))  # a copy: record views are read-only
        oov = t >= rows
        n = int(oov.sum())
        return (t.masked_fill(oov, OOV_ID) if n else t), n

    def history(self, seq: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """SEQ_DTYPE records, oldest first -> (item, cate) [L] most recent first (HistoryBatch order)."""
        seq = seq[-self.max_len:][::-1]
        return self.map_ids(seq["item"], "item")[0], self.map_ids(seq["cate"], "cate")[0]

    def score(self, seq: np.ndarray, state: bytes | None, items: torch.Tensor, cates: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> probabilities [C], retrieved history columns [C, k] (-1 = empty slot; None if the model has
        no search stage). `state` is the user's stored streaming state (unused by models without one)."""
        if len(seq) == 0:
            out = self.model(self._cold_batch(items, cates))
        else:
            out = self.model.score_candidates(*self.history(seq), items, cates)
        return torch.sigmoid(out.logit), out.indices

    @staticmethod
    def _cold_batch(items: torch.Tensor, cates: torch.Tensor) -> HistoryBatch:
        """A user with no events: the batch forward with one padding column and length 0 (the serving
        layout has no way to say "no history")."""
        C = items.shape[0]
        pad = torch.zeros(C, 1, dtype=torch.int64)
        return HistoryBatch(user=torch.zeros(C, dtype=torch.int64), target_item=items, target_cate=cates,
                            hist_item=pad, hist_cate=pad, hist_pos=pad, hist_len=torch.zeros(C, dtype=torch.int64),
                            label=torch.zeros(C))


class ModelStateUpdater:
    """`service.state.StateUpdater` for a `ServingModel`: batched over the users of one store batch."""

    def __init__(self, serving: ServingModel):
        self.serving = serving
        self.version = serving.version

    def apply(self, states: list[bytes | None], events: list[np.ndarray]) -> list[bytes]:
        return [b"" for _ in events]

    def rebuild(self, sequences: list[np.ndarray]) -> list[bytes]:
        return [b"" for _ in sequences]
