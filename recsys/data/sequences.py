"""Dataset folders -> per-user sequence store -> HistoryBatch tensors.

A dataset folder has the fixed-benchmark format (../shared/benchmarks/README.md): `events.parquet`
(user, pos, item, cate, ts; sorted by user then pos) and `train/val/test.parquet` (user, pos, item, cate,
label[, evidence]), each either one file or part files in user order (`recsys.data.layout`). Histories are never stored per row: the store keeps every event once in CSR layout
(user u's events are `offsets[u]:offsets[u+1]`), and a batch gathers the last L events before each
target's position with one vectorised index computation. Memory is O(events + rows), not O(rows x L).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from numpy.lib.stride_tricks import sliding_window_view

from recsys.data.batch import HistoryBatch, Timeline
from recsys.data.layout import DatasetError, data_files, row_locator
from recsys.data.schemas import DATASET_EVENTS_SCHEMA, SPLIT_SCHEMA, SPLITS
from recsys.vocab import FILE as VOCAB_FILE
from recsys.vocab import Vocabulary

EVENT_COLUMNS = {f.name: f.type for f in DATASET_EVENTS_SCHEMA}
SAMPLE_COLUMNS = {f.name: f.type for f in SPLIT_SCHEMA}
SAMPLE_OPTIONAL = ("evidence", "p_label")  # synthetic data only


@dataclass
class SequenceStore:
    """Every user's time-ordered events, once. Ids are dense; 0 is padding."""

    offsets: np.ndarray  # [U + 1] int64
    item: np.ndarray     # [N] int64
    cate: np.ndarray     # [N] int64
    ts: np.ndarray       # [N] int64
    # the first user id held: a worker's shard holds the contiguous user range first_user..first_user + n_users - 1
    first_user: int = 0

    @property
    def n_users(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:  # [U]
        return np.diff(self.offsets)

    @cached_property
    def reversed_padded(self) -> tuple[np.ndarray, np.ndarray]:
        """item and cate reversed, then zero-padded by the longest sequence: the most-recent-first
        history ending before store index e is the contiguous slice starting at N - e."""
        pad = np.zeros(int(self.lengths.max(initial=0)) + 1, np.int64)
        return np.concatenate([self.item[::-1], pad]), np.concatenate([self.cate[::-1], pad])

    def user_events(self, user: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a, b = self.offsets[user - self.first_user], self.offsets[user - self.first_user + 1]
        return self.item[a:b], self.cate[a:b], self.ts[a:b]


@dataclass
class Samples:
    """Training/evaluation rows: the target at `pos` of `user`'s sequence, and its label."""

    user: np.ndarray   # [R] int64
    pos: np.ndarray    # [R] int64
    item: np.ndarray   # [R] int64
    cate: np.ndarray   # [R] int64
    label: np.ndarray  # [R] float32
    evidence: list[np.ndarray] | None = None  # synthetic data only: positions that drove the label
    p_label: np.ndarray | None = None          # synthetic data only: [R] P(label = 1 | full history, target)

    def __len__(self) -> int:
        return len(self.user)


@dataclass
class Dataset:
    store: SequenceStore
    splits: dict[str, Samples]
    n_items: int  # size of the item id space incl. padding 0
    n_cates: int
    meta: dict = field(default_factory=dict)
    vocab: Vocabulary | None = None  # the folder's vocab.safetensors (raw -> dense ids), if it has one

    def vocabulary(self) -> Vocabulary:
        """The raw -> dense id maps of this dataset: its vocab.safetensors, else the identity (its dense ids are
        its catalogue ids: the fixed benchmark, synthetic data) with each item's smallest category seen."""
        if self.vocab is not None:
            return self.vocab
        item_cate = np.full(self.n_items, np.iinfo(np.int64).max, np.int64)
        np.minimum.at(item_cate, self.store.item, self.store.cate)
        item_cate[item_cate == np.iinfo(np.int64).max] = 0
        item_cate[0] = 0
        return Vocabulary.identity(self.n_items, self.n_cates, item_cate)


def _read_files(files: list[Path], columns: dict[str, pa.DataType], optional: tuple[str, ...] = ()
                ) -> tuple[pa.Table, Path | str | Callable[[int], tuple[str, int]]]:
    """The files read one after another (each checked), and where their rows are: the path of one file, or
    for part files a locator of (file, row within it) for `_check`'s messages."""
    tables = [_read(f, columns, optional) for f in files]
    if len(tables) == 1:
        return tables[0], files[0]
    return pa.concat_tables(tables, promote_options="default"), row_locator(files, [t.num_rows for t in tables])


def _read(path: Path, columns: dict[str, pa.DataType], optional: tuple[str, ...] = ()) -> pa.Table:
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    table = pq.read_table(path)
    names = set(table.column_names)
    missing = [c for c in columns if c not in names]
    if missing:
        raise DatasetError(f"{path}: missing column(s) {missing}; expected {list(columns)}")
    extra = sorted(names - set(columns) - set(optional))
    if extra:
        raise DatasetError(f"{path}: unexpected column(s) {extra}; expected {list(columns)}")
    for name, typ in columns.items():
        col = table.column(name)
        if not pa.types.is_integer(col.type):
            raise DatasetError(f"{path}: column {name!r} has type {col.type}, expected {typ}")
        if col.null_count:
            row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
            raise DatasetError(f"{path}: column {name!r} row {row}: null value")
    return table


def _check(path: Path | str | Callable[[int], tuple[str, int]], name: str, bad: np.ndarray, what: str) -> None:
    """`path`: where the rows are; a callable maps a row of part files read together to (file, row in it)."""
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        if callable(path):
            path, row = path(row)
        raise DatasetError(f"{path}: column {name!r} row {row}: {what} ({int(bad.sum())} bad rows)")


def load_store(path: Path) -> SequenceStore:
    """The store of one events file (`load_dataset` reads a folder's events in either layout)."""
    return store_from_table(_read(path, EVENT_COLUMNS), str(path))


def store_from_table(t: pa.Table, where: str | Path | Callable[[int], tuple[str, int]], users: tuple[int, int] | None = None) -> SequenceStore:
    """The store of an events table (sorted by user then pos). `users` = (first, end): the table holds the
    events of users first..end-1 only (a worker's shard; rows are then counted within it in errors)."""
    user = t.column("user").to_numpy().astype(np.int64)
    pos = t.column("pos").to_numpy().astype(np.int64)
    first = users[0] if users else 0
    _check(where, "user", user < first, "negative user id" if users is None else f"user id below the shard's first user {first}")
    if users is not None:
        _check(where, "user", user >= users[1], f"user id at or above the shard's end {users[1]}")
    if len(user) and np.any(np.diff(user) < 0):
        _check(where, "user", np.r_[False, np.diff(user) < 0], "events not sorted by user")
    n_users = users[1] - first if users else (int(user.max()) + 1 if len(user) else 0)
    counts = np.bincount(user - first, minlength=n_users)
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    expected_pos = np.arange(len(user), dtype=np.int64) - offsets[user - first]
    _check(where, "pos", pos != expected_pos, "pos must be 0, 1, 2, ... within each user in order")
    item = t.column("item").to_numpy().astype(np.int64)
    cate = t.column("cate").to_numpy().astype(np.int64)
    _check(where, "item", item <= 0, "item ids start at 1 (0 is padding)")
    _check(where, "cate", cate <= 0, "category ids start at 1 (0 is padding)")
    return SequenceStore(offsets, item, cate, t.column("ts").to_numpy().astype(np.int64), first)


def samples_from_table(t: pa.Table, where: str | Path | Callable[[int], tuple[str, int]], store: SequenceStore) -> Samples:
    """Checked samples of a split table whose users `store` holds."""
    user = t.column("user").to_numpy().astype(np.int64)
    pos = t.column("pos").to_numpy().astype(np.int64)
    label = t.column("label").to_numpy()
    first, end = store.first_user, store.first_user + store.n_users
    _check(where, "user", (user < first) | (user >= end), f"user id outside {first}..{end - 1}")
    _check(where, "pos", (pos < 0) | (pos >= store.lengths[user - first]), "pos outside the user's sequence")
    _check(where, "label", (label != 0) & (label != 1), "label must be 0 or 1")
    item = t.column("item").to_numpy().astype(np.int64)
    _check(where, "item", item <= 0, "item ids start at 1 (0 is padding)")
    evidence = None
    if "evidence" in t.column_names:
        col = t.column("evidence").combine_chunks()
        flat = col.values.to_numpy().astype(np.int64)
        evidence = np.split(flat, col.offsets.to_numpy()[1:-1])
    p_label = t.column("p_label").to_numpy().astype(np.float64) if "p_label" in t.column_names else None
    return Samples(user, pos, item, t.column("cate").to_numpy().astype(np.int64), label.astype(np.float32), evidence,
                   p_label)


def load_dataset(folder: str | Path, splits: tuple[str, ...] = SPLITS) -> Dataset:
    """Load a dataset folder (the fixed benchmark, or one written by recsys.data.prepare / synthetic)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: dataset folder not found")
    store = store_from_table(*_read_files(data_files(folder, "events"), EVENT_COLUMNS))
    loaded = {s: samples_from_table(*_read_files(data_files(folder, s), SAMPLE_COLUMNS, SAMPLE_OPTIONAL), store)
              for s in splits}
    meta_path = folder / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    n_items = max([int(store.item.max(initial=0))] + [int(s.item.max(initial=0)) for s in loaded.values()]) + 1
    n_cates = max([int(store.cate.max(initial=0))] + [int(s.cate.max(initial=0)) for s in loaded.values()]) + 1
    # meta counts the ids (dense, 1-based: rows = count + 1), so an id that no event or sample uses still
    # gets its row. prepare and synthetic write "n_categories"; "n_cates" is read for older folders.
    n_items = max(n_items, int(meta.get("n_items", 0)) + 1)
    n_cates = max(n_cates, int(meta.get("n_categories", meta.get("n_cates", 0))) + 1)
    vocab = None
    if (folder / VOCAB_FILE).is_file():
        vocab = Vocabulary.load(folder / VOCAB_FILE)
        if vocab.n_items > n_items or vocab.n_cates > n_cates:
            raise DatasetError(f"{folder / VOCAB_FILE}: {vocab.n_items - 1} items and {vocab.n_cates - 1} categories, "
                               f"more than the dataset's {n_items - 1} and {n_cates - 1}")
    return Dataset(store, loaded, n_items, n_cates, meta, vocab)


def assemble(store: SequenceStore, samples: Samples, rows: np.ndarray, max_len: int, trim: bool = True) -> HistoryBatch:
    """Build the batch for `rows` of `samples`: the last `max_len` events before each target.

    `trim`: cut the padded width to the longest history in this batch (same values, less padding).
    """
    user = samples.user[rows]
    pos = samples.pos[rows]
    n = np.minimum(pos, max_len)                                   # [B] history lengths
    W = int(n.max(initial=0))
    # Each history is one contiguous slice of the reversed store: copy fixed-width windows (a strided
    # view, no per-row Python), then zero what lies beyond each row's length.
    start = len(store.item) - (store.offsets[user - store.first_user] + pos)  # [B]
    j = np.arange(W, dtype=np.int64)
    valid = j[None, :] < n[:, None]                                # [B, W]
    rev_item, rev_cate = store.reversed_padded
    hist_item = sliding_window_view(rev_item, W)[start] * valid
    hist_cate = sliding_window_view(rev_cate, W)[start] * valid
    hist_pos = (j[None, :] + 1) * valid
    if not trim and max_len > W:  # fixed width requested: pad the columns no row reaches
        hist_item, hist_cate, hist_pos = (np.pad(a, ((0, 0), (0, max_len - W))) for a in (hist_item, hist_cate, hist_pos))
    return HistoryBatch(
        user=torch.from_numpy(user),
        target_item=torch.from_numpy(samples.item[rows]),
        target_cate=torch.from_numpy(samples.cate[rows]),
        hist_item=torch.from_numpy(hist_item),
        hist_cate=torch.from_numpy(hist_cate),
        hist_pos=torch.from_numpy(hist_pos),
        hist_len=torch.from_numpy(n),
        label=torch.from_numpy(samples.label[rows]),
        timeline_source=lambda: timeline(store, user, pos),
    )


def timeline(store: SequenceStore, user: np.ndarray, pos: np.ndarray) -> Timeline:
    """The Timeline of rows (user, pos): each distinct user's events from the first up to the last one any
    of its rows reads (later events cannot change a causal read, so they are not given)."""
    users, row_user = np.unique(user, return_inverse=True)
    need = np.zeros(len(users), np.int64)
    np.maximum.at(need, row_user, pos)
    offsets = np.zeros(len(users) + 1, np.int64)
    np.cumsum(need, out=offsets[1:])
    # store index of each given event: user u's first need[u] events, users one after another
    src = np.repeat(store.offsets[users - store.first_user] - offsets[:-1], need) + np.arange(offsets[-1], dtype=np.int64)
    return Timeline(item=torch.from_numpy(store.item[src]), cate=torch.from_numpy(store.cate[src]),
                    offsets=torch.from_numpy(offsets), row_user=torch.from_numpy(row_user.astype(np.int64)),
                    row_prefix=torch.from_numpy(pos.astype(np.int64)))


def batch_rows(n_rows: int, batch_size: int, shuffle: bool, seed: int | None = None, drop_last: bool = False) -> Iterator[np.ndarray]:
    """Row indices per batch. Every row is visited once per pass; the last batch may be partial."""
    order = np.random.default_rng(seed).permutation(n_rows) if shuffle else np.arange(n_rows)
    stop = n_rows - (n_rows % batch_size if drop_last else 0)
    for a in range(0, stop, batch_size):
        yield order[a : a + batch_size]


def iterate_batches(
    store: SequenceStore,
    samples: Samples,
    max_len: int,
    batch_size: int,
    shuffle: bool = False,
    seed: int | None = None,
    drop_last: bool = False,
) -> Iterator[HistoryBatch]:
    for rows in batch_rows(len(samples), batch_size, shuffle, seed, drop_last):
        yield assemble(store, samples, rows, max_len)


def max_history(store: SequenceStore) -> int:
    """The longest history any target can have: covers every user's full lifelong sequence."""
    return int(store.lengths.max(initial=0))
