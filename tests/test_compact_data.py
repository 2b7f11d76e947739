"""Loaded data keeps the files' compact dtypes (int32 ids, float32 labels, each id column held once) with the
values the old int64 loading gave, batches are widened to int64 as before, and the loaders' checks, run a
piece of rows at a time, report what one check over the whole table reported."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from helpers import dataset_error, set_rows
from recsys.data import sequences
from recsys.data.sequences import Samples, SequenceStore, assemble, samples_from_table, store_from_table

ID_COLUMNS = ("user", "pos", "item", "cate")


def _int64(t: pa.Table, name: str) -> np.ndarray:
    """A column as the loaders used to hold it."""
    return t.column(name).to_numpy().astype(np.int64)


def test_loaded_arrays_are_compact_and_equal_the_int64_values(bench_dir, bench_dataset):
    ds, st = bench_dataset, bench_dataset.store
    ev = pq.read_table(bench_dir / "events.parquet")
    assert (st.offsets.dtype, st.item.dtype, st.cate.dtype, st.ts.dtype) == (np.int64, np.int32, np.int32, np.int64)
    for name in ("item", "cate", "ts"):
        assert np.array_equal(getattr(st, name), _int64(ev, name)), name
    assert np.array_equal(st.offsets, np.r_[0, np.cumsum(np.bincount(_int64(ev, "user")))])
    # item and cate are held once: the store's arrays are the padded reversed ones read backwards
    rev_item, rev_cate = st.reversed_padded
    assert np.shares_memory(st.item, rev_item) and np.shares_memory(st.cate, rev_cate)
    assert rev_item.dtype == rev_cate.dtype == np.int32 and len(rev_item) == len(st.item) + st.lengths.max() + 1
    assert not rev_item[len(st.item):].any() and not rev_cate[len(st.cate):].any()
    old = {}
    for split, s in ds.splits.items():
        t = pq.read_table(bench_dir / f"{split}.parquet")
        for name in ID_COLUMNS:
            assert getattr(s, name).dtype == np.int32 and np.array_equal(getattr(s, name), _int64(t, name)), (split, name)
        assert s.label.dtype == np.float32 and np.array_equal(s.label, t.column("label").to_numpy().astype(np.float32))
        old[split] = Samples(*(_int64(t, n) for n in ID_COLUMNS), s.label)
    # the same batches as from int64 arrays, bit for bit, in the HistoryBatch contract's int64
    wide = SequenceStore(st.offsets, _int64(ev, "item"), _int64(ev, "cate"), _int64(ev, "ts"))
    rows = np.random.default_rng(0).choice(len(old["train"]), 2000, replace=False)
    for trim in (True, False):
        a, b = assemble(st, ds.splits["train"], rows, 200, trim), assemble(wide, old["train"], rows, 200, trim)
        for name in ("user", "target_item", "target_cate", "hist_item", "hist_cate", "hist_pos", "hist_len", "label"):
            x, y = getattr(a, name), getattr(b, name)
            assert x.dtype == y.dtype and torch.equal(x, y), name
        assert a.user.dtype == a.hist_item.dtype == a.hist_len.dtype == torch.int64
        ta, tb = a.timeline(), b.timeline()
        for name in ("item", "cate", "offsets", "row_user", "row_prefix"):
            x, y = getattr(ta, name), getattr(tb, name)
            assert x.dtype == y.dtype == torch.int64 and torch.equal(x, y), name
    for u in (0, 7, st.n_users - 1):
        for x, y in zip(st.user_events(u), wide.user_events(u)):
            assert x.dtype == y.dtype == np.int64 and np.array_equal(x, y)


def test_checks_by_pieces_name_the_first_bad_row_and_count_them_all(bench_dir, monkeypatch):
    ev = pq.read_table(bench_dir / "events.parquet")
    train = pq.read_table(bench_dir / "train.parquet")
    store = store_from_table(ev, "ev")
    # chunks that do not line up with the pieces (Ray blocks, part files)
    chunked = lambda t: pa.concat_tables([t.slice(0, 777), t.slice(777, 3000), t.slice(3777)])  # noqa: E731
    user = _int64(ev, "user")
    edge = int(np.flatnonzero((user[1:] == user[:-1]) & (np.arange(1, len(user)) % 1000 == 0) & (user[1:] > 0))[0]) + 1
    cases = [
        (lambda t: set_rows(t, "item", [1500, 2999, 3000, 40_000], 0), "ev: column 'item' row 1500: item ids start at 1 (0 is padding) (4 bad rows)"),
        (lambda t: set_rows(t, "cate", [999, 1000], -1), "ev: column 'cate' row 999: category ids start at 1 (0 is padding) (2 bad rows)"),
        # the only decrease is from the last row of one piece to the first of the next
        (lambda t: set_rows(t, "user", [edge], int(user[edge]) - 1), f"ev: column 'user' row {edge}: events not sorted by user (1 bad rows)"),
        (lambda t: set_rows(t, "pos", [5, 2500], 10**6), "ev: column 'pos' row 5: pos must be 0, 1, 2, ... within each user in order (2 bad rows)"),
    ]
    for breaks, want in cases:
        bad = breaks(ev)
        for piece in (sequences.PIECE, 1000, 333):
            monkeypatch.setattr(sequences, "PIECE", piece)
            assert dataset_error(lambda: store_from_table(bad, "ev")) == want
            assert dataset_error(lambda: store_from_table(chunked(bad), "ev")) == want
        monkeypatch.undo()
    sample_cases = [
        (lambda t: set_rows(t, "pos", [10, 1000, 2001], 10**6), "tr: column 'pos' row 10: pos outside the user's sequence (3 bad rows)"),
        (lambda t: set_rows(t, "label", [4000, 4001], 2), "tr: column 'label' row 4000: label must be 0 or 1 (2 bad rows)"),
        (lambda t: set_rows(t, "item", [999], 0), "tr: column 'item' row 999: item ids start at 1 (0 is padding) (1 bad rows)"),
    ]
    for breaks, want in sample_cases:
        bad = breaks(train)
        for piece in (sequences.PIECE, 1000, 333):
            monkeypatch.setattr(sequences, "PIECE", piece)
            assert dataset_error(lambda: samples_from_table(bad, "tr", store)) == want
            assert dataset_error(lambda: samples_from_table(chunked(bad), "tr", store)) == want
        monkeypatch.undo()
    # and a good table loads the same whatever the pieces
    monkeypatch.setattr(sequences, "PIECE", 333)
    small = store_from_table(chunked(ev), "ev")
    assert all(np.array_equal(getattr(small, n), getattr(store, n)) for n in ("offsets", "item", "cate", "ts"))
    s = samples_from_table(chunked(train), "tr", small)
    assert all(np.array_equal(getattr(s, n), _int64(train, n)) for n in ID_COLUMNS)


def test_blocks_with_nulls_or_ids_past_int32_are_named(bench_dir):
    """Ray blocks reach the loaders without the file reader's checks."""
    ev = pq.read_table(bench_dir / "events.parquet")
    item = ev.column("item").to_pylist()
    item[12] = None
    nulls = ev.set_column(ev.schema.get_field_index("item"), "item", pa.array(item, pa.int32()))
    assert dataset_error(lambda: store_from_table(nulls, "ev")) == "ev: column 'item' row 12: null value (1 bad rows)"
    wide = ev.set_column(ev.schema.get_field_index("cate"), "cate", pa.array(_int64(ev, "cate"), pa.int64()))
    assert np.array_equal(store_from_table(wide, "ev").cate, _int64(ev, "cate"))  # int64 files load when ids fit
    big = set_rows(wide, "cate", [30], 2**31)
    assert dataset_error(lambda: store_from_table(big, "ev")) == \
        "ev: column 'cate' row 30: outside the int32 range -2147483648..2147483647 (1 bad rows)"
