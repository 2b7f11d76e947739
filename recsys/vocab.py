"""The catalogue vocabulary: raw (catalogue) item and category ids -> the dense ids a model's tables use.

Preprocessing numbers items and categories by rank of their sorted raw ids (`recsys.data.prepare`), so a
retrain on new data gives the same raw item another dense id. Serving therefore stores raw ids and maps
them with the vocabulary of the model that scores them; the vocabulary travels in the dataset folder and
in the bundle (`vocab.safetensors`, covered by the bundle VERSION).

  item_ids   [I] int64  sorted, distinct raw item ids; raw item_ids[i] is dense item i + 1
  cate_ids   [C] int64  sorted, distinct raw category ids; raw cate_ids[c] is dense category c + 1
  item_cate  [I + 1] int64  dense category of each dense item (the smallest it was seen with), 0 for padding

A raw id outside the vocabulary maps to OOV (dense 0, the row serving zeroes: service.model_state). A dataset
without raw ids (the fixed benchmark, synthetic data) has the identity vocabulary: its dense ids are its
catalogue ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kernels.id_lookup import cpu as id_lookup
from kernels.id_lookup import reference as id_reference

FILE = "vocab.safetensors"
OOV = 0
MAX_RAW_ID = 2**53 - 1  # the API's bound (the state store's Lua scripts hold numbers as doubles)


class VocabularyError(ValueError):
    """A vocabulary file or array that does not describe a valid raw -> dense map; names what is wrong."""


@dataclass(frozen=True, eq=False)
class Vocabulary:
    item_ids: np.ndarray
    cate_ids: np.ndarray
    item_cate: np.ndarray

    def __post_init__(self) -> None:
        for name in ("item_ids", "cate_ids", "item_cate"):
            a = np.ascontiguousarray(getattr(self, name), dtype=np.int64)
            a.setflags(write=False)
            object.__setattr__(self, name, a)
        self.check()
        # Identity (ids 1..I): a range test. Else a lookup table (per request every stored event of the
        # user is mapped: a binary search took 13 ms for 100k events at 100k items, random order; a table
        # or hash lookup 0.2-1.5 ms), built on first use.
        object.__setattr__(self, "_identity", tuple(
            len(a) == 0 or (a[0] == 1 and a[-1] == len(a)) for a in (self.item_ids, self.cate_ids)))
        object.__setattr__(self, "_index", {})

    def check(self, where: str = "vocabulary") -> None:
        for name in ("item_ids", "cate_ids"):
            a = getattr(self, name)
            if a.ndim != 1:
                raise VocabularyError(f"{where}: {name} has shape {a.shape}, expected one dimension")
            if len(a) and (a[0] < 0 or a[-1] > MAX_RAW_ID):
                raise VocabularyError(f"{where}: {name} holds ids outside [0, 2^53 - 1]")
            bad = np.flatnonzero(np.diff(a) <= 0)
            if len(bad):
                raise VocabularyError(f"{where}: {name}[{bad[0] + 1}] = {a[bad[0] + 1]} does not follow "
                                      f"{a[bad[0]]}: ids must be sorted and distinct")
        if self.item_cate.shape != (len(self.item_ids) + 1,):
            raise VocabularyError(f"{where}: item_cate has shape {self.item_cate.shape}, expected "
                                  f"({len(self.item_ids) + 1},) (one per item, plus padding)")
        bad = np.flatnonzero((self.item_cate < 0) | (self.item_cate > len(self.cate_ids)))
        if len(bad):
            raise VocabularyError(f"{where}: item_cate[{bad[0]}] = {self.item_cate[bad[0]]} is not a dense "
                                  f"category (0..{len(self.cate_ids)})")

    @property
    def n_items(self) -> int:
        """Table rows the vocabulary needs (dense ids 1..I, plus row 0)."""
        return len(self.item_ids) + 1

    @property
    def n_cates(self) -> int:
        return len(self.cate_ids) + 1

    @classmethod
    def identity(cls, n_items: int, n_cates: int, item_cate: np.ndarray | None = None) -> Vocabulary:
        """Raw id = dense id for tables of `n_items` / `n_cates` rows (row 0 is padding). `item_cate`:
        [n_items] dense category per item when known, else every item's category is unknown (OOV)."""
        ic = np.zeros(n_items, np.int64) if item_cate is None else np.asarray(item_cate, np.int64)
        return cls(np.arange(1, n_items, dtype=np.int64), np.arange(1, n_cates, dtype=np.int64), ic)

    def dense(self, raw: np.ndarray, field: str) -> tuple[np.ndarray, int]:
        """Raw ids [N] (item or cate) -> dense ids [N] int64 (unknown -> OOV), and how many were unknown."""
        ids = self.item_ids if field == "item" else self.cate_ids
        raw = np.asarray(raw, dtype=np.int64)
        if self._identity[field != "item"]:
            out = id_lookup.lookup_range(len(ids), raw, OOV)
        else:
            index = self._index.get(field)
            if index is None:
                index = self._index[field] = RawIndex(ids)
            out = index.dense(raw)
        return out, int(len(raw) - np.count_nonzero(out))   # OOV is 0: the nonzero ones are known

    def raw(self, dense: np.ndarray, field: str) -> np.ndarray:
        """Dense ids [N] (>= 1) -> the raw ids they stand for: what a client of the service sends."""
        ids = self.item_ids if field == "item" else self.cate_ids
        dense = np.asarray(dense, dtype=np.int64)
        if len(dense) and (dense.min() < 1 or dense.max() > len(ids)):
            raise VocabularyError(f"dense {field} ids outside 1..{len(ids)}")
        return ids[dense - 1]

    def category_of(self, dense_items: np.ndarray) -> np.ndarray:
        """Dense items -> their dense category (OOV item -> OOV category)."""
        return self.item_cate[np.asarray(dense_items, dtype=np.int64)]

    def save(self, path: str | Path) -> None:
        from safetensors.numpy import save_file

        save_file({"item_ids": self.item_ids, "cate_ids": self.cate_ids, "item_cate": self.item_cate}, str(path))

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        from safetensors.numpy import load_file

        try:
            t = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - a corrupt file is the caller's input: say which
            raise VocabularyError(f"{path}: not a safetensors vocabulary ({e})") from None
        missing = [k for k in ("item_ids", "cate_ids", "item_cate") if k not in t]
        if missing:
            raise VocabularyError(f"{path}: missing tensor(s) {missing}")
        for k in ("item_ids", "cate_ids", "item_cate"):
            if t[k].dtype != np.int64:
                raise VocabularyError(f"{path}: {k} has dtype {t[k].dtype}, expected int64")
        try:
            return cls(t["item_ids"], t["cate_ids"], t["item_cate"])
        except VocabularyError as e:
            raise VocabularyError(f"{path}: {e}") from None


class RawIndex:
    """Sorted distinct raw ids (>= 0) -> their dense ids (position + 1), OOV for any other id, vectorised.

    Ids below TABLE_MAX (or 8x their count): a direct table, one gather. Larger ids: an open-addressing hash
    table (multiplicative hash, linear probing, load <= 1/2). Both read in C (kernels.id_lookup: the hash probe of
    a served history's 100k ids took 4.2 ms in numpy, 0.8 in C). Both equal `searchsorted` on the sorted ids (tests/test_vocab.py)."""

    TABLE_MAX = 1 << 22          # int32 entries: 16 MB at most (or 8 per id)

    def __init__(self, ids: np.ndarray):
        ids = np.asarray(ids, np.int64)
        self.n = len(ids)
        self.top = int(ids[-1]) if self.n else -1
        self.table: np.ndarray | None = None
        if self.top < max(self.TABLE_MAX, 8 * self.n):
            self.table = np.zeros(self.top + 1, np.int32)
            self.table[ids] = np.arange(1, self.n + 1, dtype=np.int32)
            return
        self.bits = max(1, int(np.ceil(np.log2(2 * self.n))))
        size = 1 << self.bits
        self.keys = np.full(size, -1, np.int64)
        self.vals = np.zeros(size, np.int32)
        pending, slot = np.arange(self.n), id_reference.slot_of(ids, self.bits)
        while len(pending):
            free = self.keys[slot] == -1
            # of the pending ids that found a free slot, one per slot is placed; the rest probe on
            _, first = np.unique(np.where(free, slot, -1), return_index=True)
            first = first[free[first]]
            self.keys[slot[first]] = ids[pending[first]]
            self.vals[slot[first]] = pending[first] + 1
            stay = np.ones(len(pending), bool)
            stay[first] = False
            pending, slot = pending[stay], (slot[stay] + 1) & (size - 1)

    def dense(self, raw: np.ndarray) -> np.ndarray:
        raw = np.asarray(raw, np.int64)
        if self.table is not None:
            return id_lookup.lookup_table(self.table, raw, OOV)
        return id_lookup.lookup(self.keys, self.vals, self.bits, raw, OOV)
