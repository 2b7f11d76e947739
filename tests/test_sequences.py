"""The sequence store and batch assembly, checked against a per-row Python oracle on real data."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys.data.sequences import DatasetError, assemble, batch_rows, iterate_batches, load_dataset, max_history


def test_benchmark_row_counts_match_readme(bench_dataset):
    ds = bench_dataset
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 232_800, "val": 30_279, "test": 30_279}
    assert ds.store.n_users == 610
    assert len(ds.store.item) == 100_836
    assert len(np.unique(ds.store.item)) == 9_724
    assert len(np.unique(ds.store.cate)) == 19
    assert max_history(ds.store) == 2_698
    assert ds.store.lengths.mean() == pytest.approx(165.3, abs=0.1)


def _oracle(ds, samples, r, L):
    u, p = samples.user[r], samples.pos[r]
    items, cates, _ = ds.store.user_events(u)
    hist = list(range(p - 1, max(p - L, 0) - 1, -1))  # most recent first
    return items[hist], cates[hist]


@pytest.mark.parametrize("L", [1, 7, 200, 3000])
def test_assemble_equals_per_row_oracle(bench_dataset, L):
    ds = bench_dataset
    s = ds.splits["test"]
    rows = np.random.default_rng(L).choice(len(s), 300, replace=False)
    b = assemble(ds.store, s, rows, L)
    mask = b.hist_mask.numpy()
    for i, r in enumerate(rows):
        items, cates = _oracle(ds, s, r, L)
        n = len(items)
        assert b.hist_len[i] == n
        np.testing.assert_array_equal(b.hist_item[i, :n].numpy(), items)
        np.testing.assert_array_equal(b.hist_cate[i, :n].numpy(), cates)
        np.testing.assert_array_equal(b.hist_pos[i, :n].numpy(), np.arange(1, n + 1))
        assert not b.hist_item[i, n:].any() and not b.hist_pos[i, n:].any() and mask[i].sum() == n
    assert b.target_item.tolist() == s.item[rows].tolist()
    assert b.label.tolist() == s.label[rows].tolist()


def test_fixed_width_equals_trimmed_then_padded(bench_dataset):
    ds = bench_dataset
    rows = np.arange(0, 5000, 7)
    a = assemble(ds.store, ds.splits["train"], rows, 3000, trim=True)
    b = assemble(ds.store, ds.splits["train"], rows, 3000, trim=False)
    assert b.hist_item.shape == (len(rows), 3000) and a.hist_item.shape[1] < 3000
    w = a.hist_item.shape[1]
    assert b.hist_item[:, :w].equal(a.hist_item) and not b.hist_item[:, w:].any()
    assert b.hist_pos[:, :w].equal(a.hist_pos) and b.hist_len.equal(a.hist_len)


def test_history_never_includes_target_or_future(bench_dataset):
    ds = bench_dataset
    s = ds.splits["val"]
    rows = np.arange(0, len(s), 97)
    b = assemble(ds.store, s, rows, 50)
    # the target's own event (positives) must not be in its history: its position is pos, history < pos
    starts = ds.store.offsets[s.user[rows]]
    last_ts = ds.store.ts[starts + s.pos[rows] - 1]
    assert (b.hist_len > 0).all()
    assert (last_ts <= ds.store.ts[starts + s.pos[rows]]).all()


def test_batches_cover_every_row_once_with_partial_last():
    seen = np.concatenate(list(batch_rows(10, 4, shuffle=True, seed=3)))
    assert sorted(seen.tolist()) == list(range(10))
    assert [len(r) for r in batch_rows(10, 4, shuffle=False)] == [4, 4, 2]
    assert [len(r) for r in batch_rows(10, 4, shuffle=False, drop_last=True)] == [4, 4]


def test_iterate_is_deterministic_for_a_seed(bench_dataset):
    ds = bench_dataset
    a = next(iterate_batches(ds.store, ds.splits["train"], 20, 64, shuffle=True, seed=7))
    b = next(iterate_batches(ds.store, ds.splits["train"], 20, 64, shuffle=True, seed=7))
    assert a.target_item.equal(b.target_item) and a.hist_item.equal(b.hist_item)


def _copy_bench(bench_dir, tmp_path, **replace):
    tmp_path.mkdir()
    for name in ("events", "train", "val", "test"):
        t = pq.read_table(bench_dir / f"{name}.parquet")
        if name in replace:
            t = replace[name](t)
        pq.write_table(t, tmp_path / f"{name}.parquet")
    return tmp_path


def test_bad_dataset_errors_name_file_column_row(bench_dir, tmp_path):
    def neg_item(t):
        item = t.column("item").to_numpy().copy()
        item[5] = -3
        return t.set_column(t.schema.get_field_index("item"), "item", pa.array(item))

    with pytest.raises(DatasetError, match=r"test\.parquet: column 'item' row 5"):
        load_dataset(_copy_bench(bench_dir, tmp_path / "a", test=neg_item))

    def drop_label(t):
        return t.drop(["label"])

    with pytest.raises(DatasetError, match=r"train\.parquet: missing column\(s\) \['label'\]"):
        load_dataset(_copy_bench(bench_dir, tmp_path / "b", train=drop_label))

    def bad_pos(t):
        pos = t.column("pos").to_numpy().copy()
        pos[2] = 10**6
        return t.set_column(t.schema.get_field_index("pos"), "pos", pa.array(pos))

    with pytest.raises(DatasetError, match=r"val\.parquet: column 'pos' row 2: pos outside"):
        load_dataset(_copy_bench(bench_dir, tmp_path / "c", val=bad_pos))

    with pytest.raises(DatasetError, match="not found"):
        load_dataset(tmp_path / "missing")
