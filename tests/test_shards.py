"""User-range shards (what one training worker holds) and the loop's per-rank batch order, without Ray."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from recsys.data.sequences import DatasetError, assemble, batch_rows, timeline
from recsys.data.shards import (
    folder_vocabulary,
    id_space,
    plan_shards,
    shard_from_tables,
    split_users,
)
from recsys.train.loop import epoch_batches, per_rank_batch


def test_split_users_cuts_contiguous_ranges_with_about_equal_rows():
    rows = np.random.default_rng(0).integers(0, 40, 500)
    for world in (1, 2, 3, 7):
        plan = split_users(rows, world)
        assert plan.bounds[0] == 0 and plan.bounds[-1] == 500 and list(plan.bounds) == sorted(set(plan.bounds))
        assert plan.rows == tuple(int(rows[a:b].sum()) for a, b in zip(plan.bounds[:-1], plan.bounds[1:]))
        assert sum(plan.rows) == rows.sum()
        assert max(plan.rows) - min(plan.rows) <= 2 * rows.max()  # one user's rows off the ideal cut
    with pytest.raises(DatasetError, match="train split: 3 rows cannot be split over 4 workers"):
        split_users(np.array([1, 0, 2]), 4)
    with pytest.raises(DatasetError, match="use fewer workers"):
        split_users(np.array([5, 0, 0, 1]), 3)


def test_batch_size_must_split_evenly_over_the_workers():
    assert per_rank_batch(2048, 4) == 512
    with pytest.raises(ValueError, match="train.batch_size 2048 must be a multiple of the 3 workers"):
        per_rank_batch(2048, 3)


def test_one_rank_keeps_the_trainers_order_and_ranks_take_equal_batches():
    # one process: exactly the batches batch_rows always gave (so single-process runs did not change)
    for epoch in (0, 3):
        got = list(epoch_batches(1000, 1000, 128, 7, epoch, 0))
        want = list(batch_rows(1000, 128, shuffle=True, seed=7 * 100_003 + epoch))
        assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))
    # two ranks of 1000 and 900 rows: 8 steps of 128 (the last 1000 - 7 * 128 = 104) on both; each rank
    # visits all its rows, the smaller one wraps around its own order
    big, small = list(epoch_batches(1000, 1000, 128, 7, 0, 0)), list(epoch_batches(900, 1000, 128, 7, 0, 1))
    assert [len(b) for b in big] == [len(b) for b in small] == [128] * 7 + [104]
    assert np.array_equal(np.sort(np.concatenate(big)), np.arange(1000))
    seen = np.concatenate(small)
    assert set(seen.tolist()) == set(range(900)) and len(seen) == 1000
    assert not np.array_equal(small[0], big[0][: len(small[0])])  # ranks draw different orders


def test_a_shard_holds_its_users_and_builds_the_same_histories(bench_dir, bench_dataset):
    plan = plan_shards(bench_dir, 3, users=90)
    assert plan.bounds[0] == 0 and plan.bounds[-1] == 90
    ds = bench_dataset
    n_items, n_cates, n_users, _ = id_space(bench_dir)
    assert (n_items, n_cates, n_users) == (ds.n_items, ds.n_cates, ds.store.n_users)
    for rank in range(3):
        lo, hi = plan.users(rank)
        rows = [("user", ">=", lo), ("user", "<", hi)]
        read = {s: pq.read_table(bench_dir / f"{s}.parquet", filters=rows) for s in ("train", "val")}
        shard = shard_from_tables(pq.read_table(bench_dir / "events.parquet", filters=rows), read, bench_dir, plan, rank,
                                  n_items, n_cates, {})
        assert shard.store.first_user == lo and shard.store.n_users == hi - lo
        assert len(shard.store.item) == int(ds.store.offsets[hi] - ds.store.offsets[lo])
        for split in ("train", "val"):
            whole, part = ds.splits[split], shard.splits[split]
            keep = (whole.user >= lo) & (whole.user < hi)
            assert np.array_equal(part.user, whole.user[keep]) and np.array_equal(part.pos, whole.pos[keep])
            # the shard's histories (its own events, user ids offset) equal the whole store's
            idx = np.flatnonzero(keep)[::7]
            a = assemble(shard.store, part, np.arange(len(part))[::7], 50)
            b = assemble(ds.store, whole, idx, 50)
            for f in ("hist_item", "hist_cate", "hist_pos", "hist_len", "target_item", "label"):
                assert torch.equal(getattr(a, f), getattr(b, f)), (rank, split, f)
            ta, tb = timeline(shard.store, part.user[:50], part.pos[:50]), timeline(ds.store, whole.user[keep][:50], whole.pos[keep][:50])
            assert torch.equal(ta.item, tb.item) and torch.equal(ta.offsets, tb.offsets)
    vocab, want = folder_vocabulary(bench_dir, n_items, n_cates), ds.vocabulary()
    assert (vocab.n_items, vocab.n_cates) == (want.n_items, want.n_cates)
    assert np.array_equal(vocab.category_of(np.arange(n_items)), want.category_of(np.arange(n_items)))


def test_a_shard_names_rows_outside_its_users(bench_dir):
    plan = split_users(np.array([10, 10, 10, 10]), 2)  # users 0-1 and 2-3
    events = pq.read_table(bench_dir / "events.parquet", filters=[("user", "<", 3)])  # one user too many
    train = pq.read_table(bench_dir / "train.parquet", filters=[("user", "<", 2)])
    with pytest.raises(DatasetError, match=r"\(users 0\.\.1\) events.parquet: column 'user' row \d+: user id at or above the shard's end 2"):
        shard_from_tables(events, {"train": train}, bench_dir, plan, 0, 10, 10, {})
