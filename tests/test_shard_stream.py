"""A worker's shard streamed block by block (Ray blocks copied into arrays allocated up front, one block held
at a time) equals the reference load exactly, and the checks name what one check over the whole table named."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from helpers import dataset_error, set_rows
from pipelines.runtime import init_ray
from pipelines.shard_io import read_shard
from recsys.data import sequences
from recsys.data.sequences import store_from_table, store_from_tables
from recsys.data.shards import plan_shards, shard_from_blocks, shard_from_tables, shard_rows

ID_COLUMNS = ("user", "pos", "item", "cate")


def _blocks(t: pa.Table, sizes=(1, 777, 5000, 0, 12_345)) -> list[pa.Table]:
    """`t` cut into blocks of uneven sizes (an empty one too), the rest in one."""
    out, a = [], 0
    for s in sizes:
        out.append(t.slice(a, s))
        a += s
    return out + [t.slice(a)]


def _reference(bench_dir, lo: int, hi: int, splits) -> tuple[dict, dict]:
    """The rank's arrays straight from the files (int64), as a whole-table load held them."""
    rows = [("user", ">=", lo), ("user", "<", hi)]
    ev = pq.read_table(bench_dir / "events.parquet", filters=rows)
    u = ev.column("user").to_numpy().astype(np.int64)
    store = {"offsets": np.r_[0, np.cumsum(np.bincount(u - lo, minlength=hi - lo))],
             "item": ev.column("item").to_numpy().astype(np.int64), "cate": ev.column("cate").to_numpy().astype(np.int64)}
    samples = {}
    for s in splits:
        t = pq.read_table(bench_dir / f"{s}.parquet", filters=rows)
        samples[s] = {n: t.column(n).to_numpy().astype(np.int64) for n in ID_COLUMNS}
        samples[s]["label"] = t.column("label").to_numpy().astype(np.float32)
    return store, samples


def _assert_equals_reference(shard, ref_store, ref_samples) -> None:
    st = shard.store
    assert st.ts is None  # a worker's shard holds no times
    assert (st.offsets.dtype, st.item.dtype, st.cate.dtype) == (np.int64, np.int32, np.int32)
    for name, want in ref_store.items():
        assert np.array_equal(getattr(st, name), want), name
    rev_item, rev_cate = st.reversed_padded
    n, pad = len(st.item), int(st.lengths.max()) + 1
    assert np.shares_memory(st.item, rev_item) and np.shares_memory(st.cate, rev_cate)
    assert len(rev_item) == len(rev_cate) == n + pad and not rev_item[n:].any() and not rev_cate[n:].any()
    assert np.array_equal(rev_item[:n], ref_store["item"][::-1]) and np.array_equal(rev_cate[:n], ref_store["cate"][::-1])
    for s, want in ref_samples.items():
        got = shard.splits[s]
        for name in ID_COLUMNS:
            assert getattr(got, name).dtype == np.int32 and np.array_equal(getattr(got, name), want[name]), (s, name)
        assert got.label.dtype == np.float32 and np.array_equal(got.label, want["label"])
        assert got.evidence is None and got.p_label is None


def test_a_shard_streamed_in_blocks_equals_the_reference_load(bench_dir, monkeypatch):
    splits = ("train", "val")
    plan = plan_shards(bench_dir, 3)
    for piece in (sequences.PIECE, 333):
        monkeypatch.setattr(sequences, "PIECE", piece)
        for rank in range(plan.world):
            lo, hi = plan.users(rank)
            rows = [("user", ">=", lo), ("user", "<", hi)]
            tables = {n: pq.read_table(bench_dir / f"{n}.parquet", filters=rows) for n in ("events", *splits)}
            ref = _reference(bench_dir, lo, hi, splits)
            streamed = shard_from_blocks(lambda n: iter(_blocks(tables[n])), lambda n: shard_rows(bench_dir, n, lo, hi),
                                         bench_dir, plan, rank, splits, 0, 0, {})
            _assert_equals_reference(streamed, *ref)
            _assert_equals_reference(shard_from_tables(tables["events"], {s: tables[s] for s in splits}, bench_dir, plan,
                                                       rank, 0, 0, {}), *ref)


def test_a_shard_read_from_ray_blocks_equals_the_reference_load(bench_dir):
    started = init_ray(num_cpus=2, object_store_mb=256)
    try:
        splits = ("train",)
        plan = plan_shards(bench_dir, 2)
        for rank in range(plan.world):
            lo, hi = plan.users(rank)
            rows = [("user", ">=", lo), ("user", "<", hi)]
            # several blocks of uneven sizes in the object store, as a worker's materialised shard has
            datasets = {n: ray.data.from_arrow(_blocks(pq.read_table(bench_dir / f"{n}.parquet", filters=rows)))
                        for n in ("events", *splits)}
            assert datasets["events"].num_blocks() > 3
            shard = read_shard(datasets.__getitem__, bench_dir, plan, rank, splits, 0, 0, {})
            _assert_equals_reference(shard, *_reference(bench_dir, lo, hi, splits))
    finally:
        if started:
            ray.shutdown()


def test_streamed_checks_report_what_the_whole_table_check_reported(bench_dir, monkeypatch):
    ev = pq.read_table(bench_dir / "events.parquet")
    user = ev.column("user").to_numpy()
    cases = [
        # a later check's bad rows in an early block, an earlier check's in a later block: the earlier check wins
        lambda t: set_rows(set_rows(t, "item", [3], 0), "pos", [30_000], 10**6),
        lambda t: set_rows(set_rows(t, "cate", [2], 0), "item", [20_000, 40_000], 0),
        # the only decrease in users is across the edge of two blocks
        lambda t: set_rows(t, "user", [777], int(user[776]) - 1),
        lambda t: set_rows(t, "pos", [5, 6000, 50_000], 10**6),
        lambda t: set_rows(t, "user", [100, 90_000], -1),
    ]
    monkeypatch.setattr(sequences, "PIECE", 1000)
    for breaks in cases:
        bad = breaks(ev)
        want = dataset_error(lambda: store_from_table(bad, "ev"))
        assert dataset_error(lambda: store_from_tables(iter(_blocks(bad)), bad.num_rows, "ev")) == want
        assert dataset_error(lambda: store_from_tables(iter(_blocks(bad)), bad.num_rows, "ev", times=False)) == want
    # a stream that does not hold the rows it was sized for
    assert dataset_error(lambda: store_from_tables(iter(_blocks(ev)), ev.num_rows + 1, "ev")) == \
        f"ev: {ev.num_rows} rows read, {ev.num_rows + 1} expected (data changed during the run?)"
    assert dataset_error(lambda: store_from_tables(iter(_blocks(ev)), ev.num_rows - 1, "ev")) == \
        f"ev: {ev.num_rows} rows read, {ev.num_rows - 1} expected (data changed during the run?)"
