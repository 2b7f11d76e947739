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
from typing import Callable, Iterable, Iterator

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
    """Every user's time-ordered events, once. Ids are dense; 0 is padding.

    Loaded stores keep the files' int32 ids (`assemble` and `timeline` widen what a batch gathers to the
    int64 torch indexes with); `item` and `cate` are then reversed views of `reversed_padded`, so each
    event's ids are held once."""

    offsets: np.ndarray  # [U + 1] int64
    item: np.ndarray     # [N] int32 (loaded; any integer type works)
    cate: np.ndarray     # [N] int32
    ts: np.ndarray | None  # [N] int64; None in a worker's shard (nothing it trains or scores reads times)
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
        history ending before store index e is the contiguous slice starting at N - e. (`store_from_table`
        builds a loaded store's item and cate as views of these.)"""
        pad = int(self.lengths.max(initial=0)) + 1
        return (np.concatenate([self.item[::-1], np.zeros(pad, self.item.dtype)]),
                np.concatenate([self.cate[::-1], np.zeros(pad, self.cate.dtype)]))

    def user_events(self, user: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One user's (item, cate, ts), the ids as int64 copies (callers hand them to torch, which takes no
        int32 index arrays read backwards)."""
        a, b = self.offsets[user - self.first_user], self.offsets[user - self.first_user + 1]
        return self.item[a:b].astype(np.int64), self.cate[a:b].astype(np.int64), self.ts[a:b]


@dataclass
class Samples:
    """Training/evaluation rows: the target at `pos` of `user`'s sequence, and its label. Loaded rows keep
    the files' int32 ids (`assemble` widens a batch's)."""

    user: np.ndarray   # [R] int32 (loaded; any integer type works)
    pos: np.ndarray    # [R] int32
    item: np.ndarray   # [R] int32
    cate: np.ndarray   # [R] int32
    label: np.ndarray  # [R] float32
    evidence: list[np.ndarray] | None = None  # synthetic data only: positions that drove the label
    p_label: np.ndarray | None = None          # synthetic data only: [R] P(label = 1 | full history, target)

    def __len__(self) -> int:
        return len(self.user)

    def take(self, rows: np.ndarray) -> Samples:
        """These rows (indices or a boolean mask), in their order."""
        rows = np.flatnonzero(rows) if rows.dtype == bool else rows
        return Samples(self.user[rows], self.pos[rows], self.item[rows], self.cate[rows], self.label[rows],
                       None if self.evidence is None else [self.evidence[i] for i in rows],
                       None if self.p_label is None else self.p_label[rows])


def user_share(users: np.ndarray, share: float) -> np.ndarray:
    """Mask of the rows whose user is in a fixed `share` of all users: the top 24 bits of a multiplicative
    hash of the id (Fibonacci hashing), so the choice depends on the id alone, not on which rank holds it."""
    h = (users.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(40)
    return h < np.uint64(round(share * (1 << 24)))


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
    for part files a locator of (file, row within it) for `_fail`'s messages."""
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


Where = Path | str | Callable[[int], tuple[str, int]]

# Rows of a table that the loaders check and convert at a time: their temporaries stay a few MB however
# many rows a table holds (a worker's shard, a whole dataset).
PIECE = 1 << 18


def _pieces(tables: Iterable[pa.Table]) -> Iterator[tuple[int, pa.Table]]:
    """(first row, piece) of PIECE rows or fewer of the tables read one after another. A table is let go as
    soon as its last piece is handed out, so a stream of Ray blocks is held one block at a time."""
    a = 0
    for t in tables:
        for b in range(0, t.num_rows, PIECE):
            p = t.slice(b, PIECE)
            yield a, p
            a += p.num_rows


def _col(t: pa.Table, name: str) -> np.ndarray:
    """Column `name` of a piece of a table: a view of its buffer where it is one chunk."""
    return t.column(name).to_numpy()


def _checked_pieces(tables: Iterable[pa.Table], n: int, checks: "_Checks") -> Iterator[tuple[int, pa.Table]]:
    """_pieces of a stream that must hold n rows, each after `checks.start()`; more rows than n fail before
    the piece is handed out (nothing is written past the arrays), fewer once the stream ends."""
    seen = 0
    for a, p in _pieces(tables):
        seen = a + p.num_rows
        if seen > n:
            checks.done(n, seen)
        checks.start()
        yield a, p
    checks.done(n, seen)


class _Checks:
    """The loaders' checks over a stream of pieces, reporting what running each check over the whole table,
    one after another, reported: the error of the first check (in the order they are run on a piece) that
    found bad rows anywhere, naming its first bad row and counting them all.

    A check runs on a piece only while no earlier check has failed (in this piece or before), so each check
    sees rows every earlier check passed (integers for the range checks, sorted users for the position
    check), and the checks after a failed one are not computed at all."""

    def __init__(self, where: Where) -> None:
        self.where = where
        self.order = 0
        # the earliest check that failed: (order, column, first bad row, count, what); row None: a column
        # that is not an integer (the message is `what`)
        self.failed: tuple[int, str, int | None, int, str] | None = None

    @property
    def ok(self) -> bool:
        return self.failed is None

    def start(self) -> None:
        """A new piece: the checks are numbered from 0 again, in the order they are run."""
        self.order = 0

    def _next(self) -> int | None:
        """The next check's number, or None when an earlier check has failed (it need not run)."""
        k, self.order = self.order, self.order + 1
        return k if self.failed is None or k <= self.failed[0] else None

    def _file(self) -> str:
        return str(self.where if not callable(self.where) else self.where(0)[0])

    def rows(self, name: str, what: str, a: int, bad: Callable[[], np.ndarray]) -> None:
        """`bad()` -> the bad rows of the piece starting at row `a` of the stream."""
        k = self._next()
        if k is None:
            return
        b = bad()
        c = int(np.count_nonzero(b))
        if not c:
            return
        if self.failed is None or k < self.failed[0]:
            self.failed = (k, name, a + int(np.argmax(b)), c, what)
        else:  # the same check, a later piece
            self.failed = (k, name, self.failed[2], self.failed[3] + c, what)

    def integers(self, p: pa.Table, names, a: int) -> None:
        """The columns are integers without nulls (files are checked by `_read`; Ray blocks are not)."""
        for name in names:
            col = p.column(name)
            k = self._next()
            if k is not None and not pa.types.is_integer(col.type):
                self.failed = (k, name, None, 0, f"{self._file()}: column {name!r} has type {col.type}, "
                                                  "expected an integer type")
            self.rows(name, "null value", a,
                      lambda: col.is_null().to_numpy(zero_copy_only=False) if col.null_count else np.zeros(0, bool))

    def fits(self, p: pa.Table, name: str, dtype: np.dtype, a: int) -> None:
        """Column `name`'s values fit `dtype` (the compact one it is copied into)."""
        if np.can_cast(p.schema.field(name).type.to_pandas_dtype(), dtype):
            self._next()
            return
        info = np.iinfo(dtype)
        self.rows(name, f"outside the {dtype} range {info.min}..{info.max}", a,
                  lambda: (_col(p, name) < info.min) | (_col(p, name) > info.max))

    def done(self, n: int, seen: int) -> None:
        """After the stream (or when it holds more than `n` rows): the first failed check's error, else an
        error if the stream did not hold `n` rows."""
        if self.failed is not None:
            _, name, row, count, what = self.failed
            if row is None:
                raise DatasetError(what)
            _fail(self.where, name, row, count, what)
        if seen != n:
            raise DatasetError(f"{self._file()}: {seen} rows read, {n} expected (data changed during the run?)")


def _fail(path: Where, name: str, row: int, count: int, what: str) -> None:
    """`path`: where the rows are; a callable maps a row of part files read together to (file, row in it)."""
    if callable(path):
        path, row = path(row)
    raise DatasetError(f"{path}: column {name!r} row {row}: {what} ({count} bad rows)")


def load_store(path: Path) -> SequenceStore:
    """The store of one events file (`load_dataset` reads a folder's events in either layout)."""
    return store_from_table(_read(path, EVENT_COLUMNS), str(path))


def store_from_table(t: pa.Table, where: Where, users: tuple[int, int] | None = None, times: bool = True) -> SequenceStore:
    """The store of an events table (sorted by user then pos): `store_from_tables` of the one table."""
    return store_from_tables([t], t.num_rows, where, users, times)


def store_from_tables(tables: Iterable[pa.Table], n: int, where: Where, users: tuple[int, int] | None = None,
                      times: bool = True) -> SequenceStore:
    """The store of the `n` events of `tables` read one after another (a table, or a worker's Ray blocks
    streamed one at a time), sorted by user then pos. `users` = (first, end): they hold the events of users
    first..end-1 only (a worker's shard; rows are then counted within it in errors). `times`: also keep the
    timestamps (training and scoring never read them; a worker's shard leaves them out, `ts` is then None).
    The ids are copied once into int32 arrays allocated up front (the store holds no table buffer), checked
    and converted PIECE rows at a time, so the only copy of the data a load makes is the store itself."""
    first = users[0] if users else 0
    names = [c for c in EVENT_COLUMNS if times or c != "ts"]
    checks = _Checks(where)
    counts = np.zeros(users[1] - first if users else 0, np.int64)
    # item and cate are written through reversed views of `reversed_padded`, whose zero padding past the
    # events (the longest sequence + 1) is known only at the end: the arrays are grown in place then
    rev_item, rev_cate = np.empty(n, np.int32), np.empty(n, np.int32)
    item, cate = rev_item[::-1], rev_cate[::-1]
    ts = np.empty(n, np.int64) if times else None
    # carried from piece to piece by the order and position checks: the last user seen, and the row its
    # events start at
    last_user, run_start = -1, 0
    for a, p in _checked_pieces(tables, n, checks):
        m = p.num_rows
        seen = a + m
        checks.integers(p, names, a)
        checks.rows("user", "negative user id" if users is None else f"user id below the shard's first user {first}",
                    a, lambda: _col(p, "user") < first)
        if users is not None:
            checks.rows("user", f"user id at or above the shard's end {users[1]}", a, lambda: _col(p, "user") >= users[1])
        prev_user = last_user

        def unsorted() -> np.ndarray:
            nonlocal last_user
            u = _col(p, "user")
            bad = np.zeros(m, bool)
            np.less(u[1:], u[:-1], out=bad[1:])
            bad[0] = a > 0 and u[0] < prev_user
            last_user = int(u[-1])
            return bad

        checks.rows("user", "events not sorted by user", a, unsorted)

        def pos_bad() -> np.ndarray:
            # sorted: a user's events start at its first row (offsets[user], without the whole column)
            nonlocal run_start
            u = _col(p, "user")
            idx = np.arange(a, a + m, dtype=np.int64)
            new = np.empty(m, bool)
            new[0] = a == 0 or u[0] != prev_user
            np.not_equal(u[1:], u[:-1], out=new[1:])
            start = np.where(new, idx, -1)
            start[0] = a if new[0] else run_start
            np.maximum.accumulate(start, out=start)
            run_start = int(start[-1])
            return _col(p, "pos") != idx - start

        checks.rows("pos", "pos must be 0, 1, 2, ... within each user in order", a, pos_bad)
        checks.rows("item", "item ids start at 1 (0 is padding)", a, lambda: _col(p, "item") <= 0)
        checks.rows("cate", "category ids start at 1 (0 is padding)", a, lambda: _col(p, "cate") <= 0)
        checks.fits(p, "item", item.dtype, a)
        checks.fits(p, "cate", cate.dtype, a)
        if ts is not None:
            checks.fits(p, "ts", ts.dtype, a)
        if not checks.ok:  # nothing is copied; the stream is read on, for the first bad row and the count
            continue
        c = np.bincount(_col(p, "user") - first)
        if users is None and len(c) > len(counts):
            counts = np.r_[counts, np.zeros(len(c) - len(counts), np.int64)]
        counts[:len(c)] += c
        item[a:seen] = _col(p, "item")
        cate[a:seen] = _col(p, "cate")
        if ts is not None:
            ts[a:seen] = _col(p, "ts")
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    pad = int(counts.max(initial=0)) + 1
    del item, cate  # views of the arrays grown next (realloc may move them)
    for rev in (rev_item, rev_cate):
        rev.resize(n + pad, refcheck=False)  # the new tail is zeroed; a large array is remapped, not copied
    store = SequenceStore(offsets, rev_item[:n][::-1], rev_cate[:n][::-1], ts, first)
    store.__dict__["reversed_padded"] = (rev_item, rev_cate)  # the cached_property's value, already built
    return store


def samples_from_table(t: pa.Table, where: Where, store: SequenceStore) -> Samples:
    """Checked samples of a split table whose users `store` holds: `samples_from_tables` of the one table."""
    return samples_from_tables([t], t.num_rows, where, store)


def samples_from_tables(tables: Iterable[pa.Table], n: int, where: Where, store: SequenceStore) -> Samples:
    """Checked samples of the `n` rows of `tables` read one after another (a split table, or a worker's Ray
    blocks streamed one at a time), whose users `store` holds: ids as int32 and the label as float32, in
    arrays allocated up front and filled PIECE rows at a time (no table buffer is kept)."""
    first, end = store.first_user, store.first_user + store.n_users
    lengths = store.lengths
    checks = _Checks(where)
    user, pos, item, cate = (np.empty(n, np.int32) for _ in range(4))
    label = np.empty(n, np.float32)
    evidence: list[np.ndarray] | None = None
    p_label: np.ndarray | None = None
    for a, p in _checked_pieces(tables, n, checks):
        seen = a + p.num_rows
        checks.integers(p, SAMPLE_COLUMNS, a)
        checks.rows("user", f"user id outside {first}..{end - 1}", a,
                    lambda: (_col(p, "user") < first) | (_col(p, "user") >= end))
        checks.rows("pos", "pos outside the user's sequence", a,
                    lambda: (_col(p, "pos") < 0) | (_col(p, "pos") >= lengths[_col(p, "user") - first]))
        checks.rows("label", "label must be 0 or 1", a, lambda: (_col(p, "label") != 0) & (_col(p, "label") != 1))
        checks.rows("item", "item ids start at 1 (0 is padding)", a, lambda: _col(p, "item") <= 0)
        for name in ("user", "pos", "item", "cate"):
            checks.fits(p, name, np.dtype(np.int32), a)
        if not checks.ok:
            continue
        for name, out in (("user", user), ("pos", pos), ("item", item), ("cate", cate), ("label", label)):
            out[a:seen] = _col(p, name)
        if "evidence" in p.column_names:
            col = p.column("evidence").combine_chunks()
            offsets = col.offsets.to_numpy()
            flat = col.flatten().to_numpy().astype(np.int64)
            if evidence is None:
                evidence = []
            evidence.extend(np.split(flat, (offsets - offsets[0])[1:-1]))
        if "p_label" in p.column_names:
            if p_label is None:
                p_label = np.empty(n, np.float64)
            p_label[a:seen] = _col(p, "p_label")
    return Samples(user, pos, item, cate, label, evidence, p_label)


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
    The ids are widened to int64 here, per batch (what torch indexes with); the store and samples keep
    the files' int32.
    """
    user = samples.user[rows].astype(np.int64)
    pos = samples.pos[rows].astype(np.int64)
    n = np.minimum(pos, max_len)                                   # [B] history lengths
    W = int(n.max(initial=0))
    # Each history is one contiguous slice of the reversed store: copy fixed-width windows (a strided
    # view, no per-row Python), then zero what lies beyond each row's length.
    start = len(store.item) - (store.offsets[user - store.first_user] + pos)  # [B]
    j = np.arange(W, dtype=np.int64)
    valid = j[None, :] < n[:, None]                                # [B, W]
    rev_item, rev_cate = store.reversed_padded
    hist_item = np.multiply(sliding_window_view(rev_item, W)[start], valid, dtype=np.int64)
    hist_cate = np.multiply(sliding_window_view(rev_cate, W)[start], valid, dtype=np.int64)
    hist_pos = (j[None, :] + 1) * valid
    if not trim and max_len > W:  # fixed width requested: pad the columns no row reaches
        hist_item, hist_cate, hist_pos = (np.pad(a, ((0, 0), (0, max_len - W))) for a in (hist_item, hist_cate, hist_pos))
    return HistoryBatch(
        user=torch.from_numpy(user),
        target_item=torch.from_numpy(samples.item[rows].astype(np.int64)),
        target_cate=torch.from_numpy(samples.cate[rows].astype(np.int64)),
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
    return Timeline(item=torch.from_numpy(store.item[src].astype(np.int64)), cate=torch.from_numpy(store.cate[src].astype(np.int64)),
                    offsets=torch.from_numpy(offsets), row_user=torch.from_numpy(row_user.astype(np.int64)),
                    row_prefix=torch.from_numpy(pos.astype(np.int64)))


def batch_rows(n_rows: int, batch_size: int, shuffle: bool, seed: int | None = None, drop_last: bool = False) -> Iterator[np.ndarray]:
    """Row indices per batch. Every row is visited once per pass; the last batch may be partial."""
    order = np.random.default_rng(seed).permutation(n_rows) if shuffle else None
    stop = n_rows - (n_rows % batch_size if drop_last else 0)
    for a in range(0, stop, batch_size):
        # in file order each batch's range is made on its own (no index array over every row)
        yield order[a : a + batch_size] if order is not None else np.arange(a, min(a + batch_size, stop))


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
