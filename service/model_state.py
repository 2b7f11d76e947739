"""The served model as the service sees it, and the StateUpdater that keeps per-user state for it.

`ServingModel` wraps a loaded bundle: its version, its id space and vocabulary, and one call to score one
user's candidates. Requests and the state store hold raw (catalogue) ids; `map_ids` turns them into table rows
with the bundle's vocabulary (recsys.vocab), at scoring, in the state updater and in the block index, so a
retrain that renumbers the dense ids leaves stored histories valid. Out of vocabulary: a raw id the
vocabulary does not know maps to row 0, the padding row, and the served model's row 0 of every item and
category table is set to zero at load. So an unknown id has one defined embedding, the zero vector, in every role (attention:
a semantic score of 0 against every event; representation: contributes nothing), independent of the
seed that initialised the untrained padding row. Row 0 never reaches a known input's score (padding is
masked by length everywhere), so this changes no in-vocabulary score: the offline=online parity tests
compare the served model with the unmodified bundle.

`ModelStateUpdater` implements `service.state.StateUpdater` for the stream worker and for rebuilds: the
per-user streaming state of the model's memory branches (`StreamingBranches`: Aaren and/or Titans over
DARE's position-free per-event features, `DARE.memory_features`), as bytes. `apply` folds a batch of
users' new events in with one batched `step` per event position (users with fewer events are inactive at
the later positions); `rebuild` computes states from whole sequences with the modules' parallel
`forward_state`. A model without memory branches keeps an empty state (b""), so the state store's
bookkeeping (version, rev) is the same for every model.

Scoring reads the stored state (`ServingModel.score`): the memory costs O(1) in the history per request.
A user with no current state (a new model version not yet rebuilt, or a state lost) gets it recomputed in
the request from the stored sequence when that is short (`http.memory_rebuild_max_events`), else an empty
memory; the response says which (`memory`) and a metric counts it.

State bytes: b"" (no branch), else `RSS1` + <u4 aaren length> + <u4 titans length> + the two
`recsys.modules.state_codec` encodings (a missing branch has length 0), each tagged with the version.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from recsys.data.batch import HistoryBatch
from recsys.models.layers import MLP, fold_batchnorm
from recsys.modules import state_codec
from recsys.modules.aaren import Aaren
from recsys.modules.titans import NeuralMemory
from recsys.vocab import OOV as OOV_ID
from recsys.vocab import Vocabulary
from service.keys import check_version

NO_CATEGORY = -1  # a candidate sent without a category: the item's category from the vocabulary


@dataclass
class ServingModel:
    model: nn.Module          # in eval mode; exposes score_candidates(hist_item, hist_cate, cand_item, cand_cate[, memory])
    version: str
    n_items: int              # rows of the item table
    n_cates: int
    max_len: int              # the most recent events a forward reads
    vocab: Vocabulary | None = None  # raw -> dense ids; None: the identity of the tables (raw id = row)

    def __post_init__(self) -> None:
        check_version(self.version)
        if self.vocab is None:
            self.vocab = Vocabulary.identity(self.n_items, self.n_cates)
        if self.vocab.n_items > self.n_items or self.vocab.n_cates > self.n_cates:
            raise ValueError(f"vocabulary of {self.vocab.n_items} item / {self.vocab.n_cates} category rows for tables "
                             f"of {self.n_items} / {self.n_cates}")
        self.model.eval()
        # The auxiliary soft-attention head only exists to train attention embeddings: serving returns the
        # main head, so skip its O(C x L) pass. (Until score_candidates offers this itself.)
        if getattr(self.model, "aux_mlp", None) is not None:
            self.model.aux_mlp = None
        for tower in [m for m in self.model.modules() if isinstance(m, MLP)]:
            fold_batchnorm(tower)
        zero_oov_rows(self.model)

    def block_indexer(self, block: int):
        """service.block_index.BlockIndexer of this model (one per block size, built once), or None for a
        model without DARE's split attention search."""
        from service.block_index import BlockIndexer

        cache = self.__dict__.setdefault("_indexers", {})
        if block not in cache:
            cache[block] = BlockIndexer(self, block) if block > 0 and BlockIndexer.supports(self.model) else None
        return cache[block]

    @classmethod
    def from_bundle(cls, path: str | Path) -> "ServingModel":
        from recsys.bundle import load_bundle

        b = load_bundle(Path(path))
        ids = b.id_space
        return cls(model=b.model, version=b.version, n_items=int(ids["n_items"]), n_cates=int(ids["n_cates"]),
                   max_len=int(ids["max_len"]), vocab=b.vocab)

    @property
    def has_memory(self) -> bool:
        return bool(getattr(self.model, "has_memory", False))

    def map_ids(self, ids: np.ndarray, field: str) -> tuple[torch.Tensor, int]:
        """Raw (catalogue) ids [N] of `field` ("item" or "cate") -> table rows [N] int64 (unknown -> OOV_ID),
        and how many were unknown."""
        dense, n = self.vocab.dense(ids, field)
        return torch.from_numpy(dense), n

    def map_candidates(self, items: np.ndarray, cates: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """Raw candidate ids -> (item rows, category rows, unknown items, unknown categories). A category of
        NO_CATEGORY is the item's category in the vocabulary (an unknown item's: OOV, not counted again)."""
        item, n_item = self.map_ids(items, "item")
        cates = np.asarray(cates, dtype=np.int64)
        missing = cates == NO_CATEGORY
        if not missing.any():
            cate, n_cate = self.map_ids(cates, "cate")
        else:
            dense = self.vocab.category_of(item.numpy())  # a fresh array: the given ones go over it
            given, n_cate = self.vocab.dense(cates[~missing], "cate")
            dense[~missing] = given
            cate = torch.from_numpy(dense)
        return item, cate, n_item, n_cate

    def history(self, seq: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """SEQ_DTYPE records, oldest first -> (item, cate) [L] most recent first (HistoryBatch order)."""
        seq = seq[-self.max_len:][::-1]
        return self.map_ids(seq["item"], "item")[0], self.map_ids(seq["cate"], "cate")[0]

    def score(self, seq: np.ndarray, state: bytes | None, items: torch.Tensor, cates: torch.Tensor,
              rebuild_max_events: int = 0) -> tuple[torch.Tensor, torch.Tensor | None, str | None]:
        """seq: the user's stored sequence (oldest first); state: its stored state for this version (None
        if there is none). -> probabilities [C], retrieved history columns [C, k] (-1 = empty slot; None if
        the model has no search stage), and where the memory came from (None without memory branches)."""
        source = None
        if len(seq) == 0:  # the batch forward reads an empty memory for a batch without events
            out = self.model(self._cold_batch(items, cates))
            source = "stored" if self.has_memory else None
        else:
            memory = {}
            if self.has_memory:
                memory["memory"], source = self._memory(seq, state, rebuild_max_events)
            out = self.model.score_candidates(*self.history(seq), items, cates, **memory)
        return torch.sigmoid(out.logit), out.indices, source

    def _memory(self, seq: np.ndarray, state: bytes | None, rebuild_max_events: int):
        from recsys.models.dare import MemoryReads

        m = self.model
        if state:
            source, states = "stored", decode_states(state, self.version)
        elif len(seq) <= rebuild_max_events:
            source, states = "rebuilt", decode_states(ModelStateUpdater(self).rebuild([seq])[0], self.version)
        else:
            source = "empty"
            states = tuple(None if x is None else x.init_state(1) for x in (m.aaren, m.titans))
        return MemoryReads.from_states(m, *states), source

    @staticmethod
    def _cold_batch(items: torch.Tensor, cates: torch.Tensor) -> HistoryBatch:
        """A user with no events: the batch forward with one padding column and length 0 (the serving
        layout has no way to say "no history")."""
        C = items.shape[0]
        pad = torch.zeros(C, 1, dtype=torch.int64)
        return HistoryBatch(user=torch.zeros(C, dtype=torch.int64), target_item=items, target_cate=cates,
                            hist_item=pad, hist_cate=pad, hist_pos=pad, hist_len=torch.zeros(C, dtype=torch.int64),
                            label=torch.zeros(C))


def zero_oov_rows(model: nn.Module) -> list[str]:
    """Set row OOV_ID of every item and category table to zero (see the module doc). -> the tables changed."""
    from recsys.embeddings import table_sets

    changed = []
    with torch.no_grad():
        for set_name, tables in table_sets(model).items():
            if tables.sharded:
                raise ValueError(f"{set_name}: a sharded table set cannot serve (load the bundle unsharded)")
            for name, weight in tables.weights().items():
                if name.rsplit("_", 1)[-1] in ("item", "cate"):  # item, att_item, rep_item, ...
                    weight[OOV_ID].zero_()
                    changed.append(f"{set_name}.{name}" if set_name else name)
    return changed


@dataclass
class StreamingBranches:
    """What the state updater needs from a model: its streaming modules and the per-event input they read."""

    features: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # item, cate [...] -> x [..., d_in]
    aaren: Aaren | None = None
    titans: NeuralMemory | None = None


_MAGIC = b"RSS1"
_HEADER = struct.Struct("<4sII")


def encode_states(aaren_state, titans_state, version: str) -> bytes:
    a = b"" if aaren_state is None else state_codec.encode(aaren_state, version)
    t = b"" if titans_state is None else state_codec.encode(titans_state, version)
    return _HEADER.pack(_MAGIC, len(a), len(t)) + a + t


def decode_states(data: bytes, version: str):
    """-> (aaren state or None, titans state or None); errors name what is wrong."""
    if len(data) < _HEADER.size:
        raise state_codec.StateCodecError(f"user state: {len(data)} bytes, shorter than its header")
    magic, na, nt = _HEADER.unpack_from(data)
    if magic != _MAGIC or _HEADER.size + na + nt != len(data):
        raise state_codec.StateCodecError("user state: bad magic or lengths (not written by ModelStateUpdater)")
    a, t = data[_HEADER.size:_HEADER.size + na], data[_HEADER.size + na:]
    return (state_codec.decode(a, version, "aaren") if na else None,
            state_codec.decode(t, version, "titans") if nt else None)


class ModelStateUpdater:
    """`service.state.StateUpdater` for a `ServingModel`: batched over the users of one store batch."""

    def __init__(self, serving: ServingModel):
        self.serving = serving
        self.version = serving.version
        m = serving.model
        self.branches: StreamingBranches | None = None
        if serving.has_memory:
            self.branches = StreamingBranches(features=lambda item, cate: m.memory_features(item, cate, grad=False),
                                              aaren=m.aaren, titans=m.titans)

    def block_indexer(self, block: int):
        """The block index kept beside the state for this version (service.block_index), or None."""
        return self.serving.block_indexer(block)

    def _features(self, records: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Oldest-first SEQ_DTYPE arrays -> x [U, T, d_in] left-aligned, zero-padded; lengths [U]."""
        lengths = torch.tensor([len(r) for r in records], dtype=torch.int64)
        T = int(lengths.max()) if len(records) else 0
        item = torch.zeros(len(records), T, dtype=torch.int64)
        cate = torch.zeros(len(records), T, dtype=torch.int64)
        for i, r in enumerate(records):
            item[i, :len(r)] = self.serving.map_ids(r["item"], "item")[0]
            cate[i, :len(r)] = self.serving.map_ids(r["cate"], "cate")[0]
        x = self.branches.features(item, cate)                                   # [U, T, d_in]
        return x.masked_fill(~(torch.arange(T)[None, :] < lengths[:, None])[..., None], 0.0), lengths

    def apply(self, states: list[bytes | None], events: list[np.ndarray]) -> list[bytes]:
        if self.branches is None:
            return [b"" for _ in events]
        br, U = self.branches, len(events)
        with torch.inference_mode():
            x, lengths = self._features(events)
            old = [decode_states(s, self.version) if s else (None, None) for s in states]
            aaren = titans = None
            if br.aaren is not None:
                fresh = br.aaren.init_state(1)
                aaren = state_codec.stack([a if a is not None else fresh for a, _ in old])
            if br.titans is not None:
                fresh = br.titans.init_state(1)
                titans = state_codec.stack([t if t is not None else fresh for _, t in old])
            for t in range(x.shape[1]):                                          # one event per user per step
                active = t < lengths                                             # [U]
                if aaren is not None:
                    aaren = br.aaren.step(aaren, x[:, t], active)
                if titans is not None:
                    titans = br.titans.step(titans, x[:, t], active, inplace=True)
        return self._encode(aaren, titans, U)

    def rebuild(self, sequences: list[np.ndarray]) -> list[bytes]:
        if self.branches is None:
            return [b"" for _ in sequences]
        br = self.branches
        with torch.inference_mode():
            x, lengths = self._features(sequences)
            aaren = br.aaren.forward_state(x, lengths) if br.aaren is not None else None
            titans = br.titans.forward_state(x, lengths) if br.titans is not None else None
        return self._encode(aaren, titans, len(sequences))

    def _encode(self, aaren, titans, U: int) -> list[bytes]:
        a = state_codec.split(aaren) if aaren is not None else [None] * U
        t = state_codec.split(titans) if titans is not None else [None] * U
        return [encode_states(ai, ti, self.version) for ai, ti in zip(a, t)]
