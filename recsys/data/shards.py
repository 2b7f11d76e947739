"""User-range shards of a dataset folder: what one data-parallel training worker holds.

A shard is a contiguous range of dense user ids with every event and every sample row of those users, and
nothing else: a row's history is its own user's earlier events, so a worker builds every history it
trains or validates on from its own range (`recsys.data.sequences.store_from_table` with the range).

The ranges are a pure function of the folder and the number of ranks (`plan_shards`): cut where the
running count of a split's rows (training rows for training, the evaluated split's for evaluation)
crosses r / N of the total, so the ranks get about equal rows and a rerun or a resumed run gets the same
split. The driver reads the rows per user from the folder's manifest (`recsys.data.manifest`, O(users)),
or, for a folder without one (the fixed benchmark), the split's `user` column in batches (O(rows) time,
O(users) memory); the ids' extent comes from Parquet statistics; workers read their ranges.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recsys.data.layout import data_files
from recsys.data.manifest import FILE as MANIFEST
from recsys.data.manifest import read_manifest
from recsys.data.schemas import SPLITS
from recsys.data.sequences import (
    Dataset,
    DatasetError,
    Samples,
    SequenceStore,
    samples_from_tables,
    store_from_tables,
)
from recsys.vocab import FILE as VOCAB_FILE
from recsys.vocab import Vocabulary


@dataclass(frozen=True)
class ShardPlan:
    """Rank r holds users bounds[r]..bounds[r + 1] - 1 and rows[r] rows of `split` (the split the ranges
    were balanced on)."""

    bounds: tuple[int, ...]
    rows: tuple[int, ...]
    split: str = "train"

    @property
    def world(self) -> int:
        return len(self.rows)

    def users(self, rank: int) -> tuple[int, int]:
        return self.bounds[rank], self.bounds[rank + 1]


@dataclass
class Shard:
    """One rank's part of a dataset: its users' events (`store`) and sample rows (`splits`), plus what every
    rank shares (the id space, the folder's meta, the plan)."""

    store: SequenceStore
    splits: dict[str, Samples]
    n_items: int
    n_cates: int
    meta: dict
    plan: ShardPlan
    rank: int


def split_users(rows_per_user: np.ndarray, world: int, split: str = "train") -> ShardPlan:
    """Contiguous user ranges with about equal rows of `split`, each with at least one."""
    rows_per_user = np.asarray(rows_per_user, np.int64)
    total = int(rows_per_user.sum())
    if world < 1:
        raise ValueError(f"workers: {world}, need at least 1")
    if total < world:
        raise DatasetError(f"{split} split: {total} rows cannot be split over {world} workers")
    cum = np.cumsum(rows_per_user)
    # rank r starts at the first user whose running row count reaches r / N of the total
    cuts = [int(np.searchsorted(cum, r * total / world, side="right")) for r in range(1, world)]
    bounds = (0, *cuts, len(rows_per_user))
    rows = tuple(int(rows_per_user[a:b].sum()) for a, b in itertools.pairwise(bounds))
    if min(rows) == 0:
        raise DatasetError(f"{split} split: the users cannot be cut into {world} ranges that all hold rows "
                           f"(rows per range {list(rows)}): use fewer workers")
    return ShardPlan(tuple(int(b) for b in bounds), rows, split)


def _column_max(path: Path, column: str) -> int:
    """Largest value of an integer column, from the row-group statistics where written (else read)."""
    md = pq.ParquetFile(path).metadata
    idx = md.schema.names.index(column)
    best = -1
    for g in range(md.num_row_groups):
        col = md.row_group(g).column(idx)
        if col.num_values == 0:
            continue
        st = col.statistics
        if st is None or not st.has_min_max:
            values = pq.read_table(path, columns=[column]).column(column)
            return int(pa.compute.max(values).as_py()) if len(values) else -1
        best = max(best, int(st.max))
    return best


def id_space(folder: str | Path) -> tuple[int, int, int, dict]:
    """(n_items, n_cates, n_users, meta) of a dataset folder without loading it: the same id space as
    `recsys.data.sequences.load_dataset` (largest id in the events and every split, or meta's counts, + 1)."""
    folder = Path(folder)
    events = data_files(folder, "events")
    files = events + [f for s in SPLITS for f in data_files(folder, s)]
    meta_path = folder / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    n_items = max(max(_column_max(f, "item") for f in files), int(meta.get("n_items", 0))) + 1
    n_cates = max(max(_column_max(f, "cate") for f in files), int(meta.get("n_categories", meta.get("n_cates", 0)))) + 1
    return n_items, n_cates, max(_column_max(f, "user") for f in events) + 1, meta


def folder_vocabulary(folder: str | Path, n_items: int, n_cates: int) -> Vocabulary:
    """`Dataset.vocabulary()` of a folder without loading it: its vocab.safetensors, else the identity with
    each item's smallest category, from the events' item and category columns read in batches."""
    folder = Path(folder)
    if (folder / VOCAB_FILE).is_file():
        vocab = Vocabulary.load(folder / VOCAB_FILE)
        if (vocab.n_items, vocab.n_cates) != (n_items, n_cates):
            raise DatasetError(f"{folder / VOCAB_FILE}: {vocab.n_items - 1} items and {vocab.n_cates - 1} categories, "
                               f"the dataset has {n_items - 1} and {n_cates - 1}")
        return vocab
    none = np.iinfo(np.int64).max
    item_cate = np.full(n_items, none, np.int64)
    batches = (b for f in data_files(folder, "events") for b in pq.ParquetFile(f).iter_batches(columns=["item", "cate"], batch_size=1 << 20))
    for batch in batches:
        np.minimum.at(item_cate, batch.column(0).to_numpy().astype(np.int64), batch.column(1).to_numpy().astype(np.int64))
    item_cate[item_cate == none] = 0
    item_cate[0] = 0
    return Vocabulary.identity(n_items, n_cates, item_cate)


def plan_shards(folder: str | Path, world: int, users: int | None = None, split: str = "train") -> ShardPlan:
    """The shard plan of `folder` over `world` ranks, balanced on `split`'s rows per user (from the manifest,
    else counted from the split's user column in batches). `users`: only users 0..users-1 (quick runs;
    `trainer.user_subset`'s rows)."""
    folder = Path(folder)
    n_users = n_all = id_space(folder)[2]
    if users is not None:
        n_users = min(n_users, users)
    manifest = read_manifest(folder)
    if manifest is not None:
        if manifest.users != n_all:
            raise DatasetError(f"{folder / MANIFEST}: field 'users' is {manifest.users}, the events hold {n_all} users")
        return split_users(manifest.user_rows(split)[:n_users], world, split)
    counts = np.zeros(n_users, np.int64)
    for batch in (b for f in data_files(folder, split) for b in pq.ParquetFile(f).iter_batches(columns=["user"], batch_size=1 << 20)):
        u = batch.column(0).to_numpy().astype(np.int64)
        u = u[(u >= 0) & (u < n_users)]  # ids outside the events' range are reported by the workers' checks
        counts += np.bincount(u, minlength=n_users)
    return split_users(counts, world, split)


def shard_rows(folder: str | Path, name: str, lo: int, hi: int, manifest=None) -> int:
    """Rows of `name` ("events" or a split) of users lo..hi-1: from the manifest's rows per user (the folder's
    `read_manifest`, read once by the caller), else counted from the files' `user` column in batches."""
    if manifest is not None:
        return int(manifest.user_rows(name)[lo:hi].sum())
    n = 0
    for f in data_files(folder, name):
        for b in pq.ParquetFile(f).iter_batches(columns=["user"], batch_size=1 << 20):
            u = b.column(0).to_numpy()
            n += int(np.count_nonzero((u >= lo) & (u < hi)))
    return n


def shard_from_blocks(blocks: Callable[[str], Iterable[pa.Table]], rows: Callable[[str], int], folder: str | Path,
                      plan: ShardPlan, rank: int, splits: tuple[str, ...], n_items: int, n_cates: int, meta: dict) -> Shard:
    """A rank's shard from `blocks(name)`, its users' rows of events and of each split in file order (tables,
    or Ray blocks fetched one at a time), `rows(name)` of them. Each block is copied into arrays allocated up
    front and let go, so a worker holds one block of a stream at a time besides its arrays, and the copy is
    the only one; the events' times are not loaded (nothing a worker trains or scores reads them)."""
    lo, hi = plan.users(rank)
    where = f"{Path(folder)} (users {lo}..{hi - 1})"
    store = store_from_tables(blocks("events"), rows("events"), f"{where} events.parquet", (lo, hi), times=False)
    loaded = {s: samples_from_tables(blocks(s), rows(s), f"{where} {s}.parquet", store) for s in splits}
    if plan.split in loaded and len(loaded[plan.split]) != plan.rows[rank]:
        raise DatasetError(f"{where} {plan.split}.parquet: {len(loaded[plan.split])} rows read, the plan counted "
                           f"{plan.rows[rank]} (file changed during the run?)")
    return Shard(store, loaded, n_items, n_cates, meta, plan, rank)


def shard_from_tables(events: pa.Table, splits: dict[str, pa.Table], folder: str | Path, plan: ShardPlan, rank: int,
                      n_items: int, n_cates: int, meta: dict) -> Shard:
    """A rank's shard from its users' rows of events.parquet and of each split (in file order)."""
    tables = {"events": events} | splits
    return shard_from_blocks(lambda name: [tables[name]], lambda name: tables[name].num_rows, folder, plan, rank,
                             tuple(splits), n_items, n_cates, meta)


def whole(dataset: Dataset) -> Shard:
    """The whole in-memory dataset as the one shard of a single-process run."""
    n_users = dataset.store.n_users
    plan = ShardPlan((0, n_users), (len(dataset.splits["train"]),))
    return Shard(dataset.store, dataset.splits, dataset.n_items, dataset.n_cates, dataset.meta, plan, 0)
