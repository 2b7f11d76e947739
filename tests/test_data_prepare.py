"""Preprocessing: the MovieLens raw files must reproduce the fixed benchmark's events and split rows; the
pure steps are checked against plain per-user references."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from recsys.config.data import SplitConfig
from recsys.data.prepare import (densify, prepare, sample_negatives, split_of_events, user_item_keys)
from recsys.data.raw import read_movielens, read_taobao
from recsys.data.report import describe


@pytest.fixture(scope="module")
def ml_prepared(movielens_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ml")
    meta = prepare(read_movielens(movielens_dir), out, seed=7)
    return out, meta


def read(folder, name):
    return pq.read_table(folder / f"{name}.parquet")


def test_movielens_reproduces_the_benchmark(ml_prepared, bench_dir):
    out, meta = ml_prepared
    bench = bench_dir
    assert read(out, "events").equals(read(bench, "events"))
    for name, n in (("train", 232_800), ("val", 30_279), ("test", 30_279)):
        ours, theirs = read(out, name), read(bench, name)
        assert ours.schema == theirs.schema
        assert ours.num_rows == theirs.num_rows == n == meta["rows"][name]
        assert ours.select(["user", "pos", "label"]).equals(theirs.select(["user", "pos", "label"]))
        pos = ours["label"].to_numpy() == 1
        assert ours.filter(pos).equals(theirs.filter(theirs["label"].to_numpy() == 1))
    assert (meta["n_users"], meta["n_items"], meta["n_categories"], meta["n_events"]) == (610, 9724, 19, 100_836)
    assert meta["load_report"]["rows_kept"] == 100_836
    assert json.loads((out / "meta.json").read_text()) == meta
    d = describe(out)
    assert d["history_length"] == {"mean": 165.3, "max": 2698}
    assert d["rows"] == meta["rows"]


def test_negatives_follow_the_protocol(ml_prepared):
    out, _ = ml_prepared
    ev = read(out, "events").to_pandas()
    seen = set(zip(ev.user, ev.item))
    item_cate = dict(zip(ev.item, ev.cate))
    for name in ("train", "test"):
        t = read(out, name).to_pandas()
        items = t.item.to_numpy().reshape(-1, 3)
        assert (t.label.to_numpy().reshape(-1, 3) == [1, 0, 0]).all()
        assert (items[:, 1] != items[:, 2]).all()
        neg = t[t.label == 0]
        assert not any((u, i) in seen for u, i in zip(neg.user, neg.item))
        assert (neg.cate.to_numpy() == neg.item.map(item_cate).to_numpy()).all()
    # Drawn by popularity: negatives are far more popular than a uniform draw over items.
    pop = ev.item.value_counts()
    neg = read(out, "train").to_pandas().query("label == 0")
    assert pop.reindex(neg.item).mean() > 3 * pop.mean()


def test_deterministic_per_seed_and_overwrites(movielens_dir, ml_prepared, tmp_path):
    out, meta = ml_prepared
    raw = movielens_dir
    again = prepare(read_movielens(raw), out, seed=7)  # into the same folder: replaced, not appended
    assert again["rows"] == meta["rows"] and read(out, "train").num_rows == 232_800
    other = prepare(read_movielens(raw), tmp_path, seed=8)
    assert other["rows"] == meta["rows"]
    assert not read(tmp_path, "train").equals(read(out, "train"))
    assert not list(out.glob("*.tmp"))


def test_negatives_do_not_depend_on_partitioning():
    """Drawing for a subset of users (one Ray partition) gives those users' rows of the full draw."""
    rng = np.random.default_rng(0)
    n_items, users = 300, 40
    user = np.repeat(np.arange(users), 50)
    item = rng.integers(1, n_items + 1, len(user))
    keys = user_item_keys(user, item, n_items)
    pop = np.bincount(item, minlength=n_items + 1)
    pos = np.tile(np.arange(50), users)
    full = sample_negatives(user, pos, keys, pop, 2, seed=3)
    part = user >= 25
    sub_keys = user_item_keys(user[part], item[part], n_items)
    np.testing.assert_array_equal(sample_negatives(user[part], pos[part], sub_keys, pop, 2, seed=3), full[part])


def test_negative_distribution_is_popularity_among_unseen_items():
    n_items = 10
    pop = np.array([0, 100, 50, 40, 30, 20, 10, 5, 3, 2, 1])
    keys = user_item_keys(np.zeros(2, np.int64), np.array([1, 3]), n_items)  # user 0 saw items 1 and 3
    R = 40_000
    got = sample_negatives(np.zeros(R, np.int64), np.arange(R), keys, pop, 1, seed=1)[:, 0]
    allowed = np.setdiff1d(np.arange(1, n_items + 1), [1, 3])
    expect = pop[allowed] / pop[allowed].sum()
    freq = np.bincount(got, minlength=n_items + 1)[allowed] / R
    assert set(np.unique(got)) <= set(allowed)
    np.testing.assert_allclose(freq, expect, atol=0.01)


def test_exact_fallback_when_the_user_saw_the_popular_items():
    n_items = 1000
    pop = np.ones(n_items + 1, np.int64)
    pop[1:998] = 10**6  # the user saw all popular items: rejection almost never succeeds
    keys = user_item_keys(np.zeros(997, np.int64), np.arange(1, 998), n_items)
    got = sample_negatives(np.zeros(5, np.int64), np.arange(5), keys, pop, 2, seed=0)
    assert set(got.ravel()) <= {998, 999, 1000} and (got[:, 0] != got[:, 1]).all()
    with pytest.raises(ValueError, match="fewer than 4 items"):
        sample_negatives(np.zeros(1, np.int64), np.zeros(1, np.int64), keys, pop, 4, seed=0)


def test_split_of_events_matches_a_per_user_reference():
    rng = np.random.default_rng(1)
    lengths = np.r_[1, 3, 6, 7, 25, 35, rng.integers(1, 400, 50)]
    offsets = np.r_[0, np.cumsum(lengths)]
    cfg = SplitConfig()
    got = split_of_events(offsets, cfg)
    for u, n in enumerate(lengths):
        n_test = max(1, round(0.1 * n))  # Python's round is half-to-even, as the benchmark
        expect = [2 if p >= n - n_test else 1 if p >= n - 2 * n_test else 0 for p in range(n)]
        expect = [-1 if p < cfg.min_history else s for p, s in enumerate(expect)]
        assert got[offsets[u]:offsets[u + 1]].tolist() == expect, (u, n)


def test_densify_sorts_by_time_then_original_item_and_keeps_item_categories():
    user = np.array([50, 10, 10, 10, 50])
    item = np.array([7, 9, 3, 5, 3])
    cate = np.array([2, 4, 1, 1, 1])
    ts = np.array([5, 9, 9, 1, 4]) * 1000
    ev = densify(user, item, cate, ts)
    assert ev.user.tolist() == [0, 0, 0, 1, 1] and ev.pos.tolist() == [0, 1, 2, 0, 1]
    assert ev.item_ids[ev.item - 1].tolist() == [5, 3, 9, 3, 7]
    assert ev.cate_ids[ev.cate - 1].tolist() == [1, 1, 4, 1, 2]
    assert ev.ts.tolist() == [1, 9, 9, 4, 5] and ev.cate_conflicts == 0


def test_taobao_sample_prepares_and_loads(taobao_csv, tmp_path):
    from recsys.data.sequences import load_dataset

    stream = read_taobao(taobao_csv)
    meta = prepare(stream, tmp_path, seed=0)
    assert meta["n_events"] == 14_316 and meta["load_report"]["rows_read"] == 14_321
    ev = read(tmp_path, "events").to_pandas()
    assert (ev.groupby("user").ts.apply(lambda s: s.is_monotonic_increasing)).all()
    ds = load_dataset(tmp_path)
    assert len(ds.splits["test"]) == meta["rows"]["test"] > 0
    # the vocabulary beside the dense ids (what a bundle ships for serving's catalogue ids): every raw item
    # is known, with the smallest raw category it was seen with, which is the events' dense category
    from recsys.data.prepare import collect

    raw = collect(read_taobao(taobao_csv))
    v = ds.vocab
    dense, unknown = v.dense(raw["item_id"], "item")
    assert unknown == 0 and (v.item_ids[dense - 1] == raw["item_id"]).all() and v.n_items == meta["n_items"] + 1
    order = np.lexsort((raw["category_id"], raw["item_id"]))
    first = np.r_[True, np.diff(raw["item_id"][order]) != 0]
    smallest = raw["category_id"][order][first]
    assert (v.cate_ids[v.item_cate[1:] - 1] == smallest).all()
    assert (v.item_cate[ev.item.to_numpy()] == ev.cate.to_numpy()).all()
    assert (ds.n_items, ds.n_cates) == (meta["n_items"] + 1, meta["n_categories"] + 1)  # ids 1..count, row 0 pads
    # ids that no event uses (a catalogue larger than the log) still get their rows, from meta's counts
    (tmp_path / "meta.json").write_text(json.dumps({**meta, "n_items": meta["n_items"] + 5, "n_categories": meta["n_categories"] + 5}))
    ds = load_dataset(tmp_path)
    assert (ds.n_items, ds.n_cates) == (meta["n_items"] + 6, meta["n_categories"] + 6)


def test_manifest_describes_the_files_and_plans_like_the_column_read(ml_prepared, bench_dir, tmp_path):
    """prepare writes a manifest (rows and user bounds per file and row group, rows per user) that plans the
    same shards as the user-column read of a folder without one (the fixed benchmark: same files)."""
    import shutil

    from recsys.data.manifest import FILE, USER_ROWS, read_manifest
    from recsys.data.sequences import DatasetError
    from recsys.data.shards import plan_shards

    out, _ = ml_prepared
    assert read_manifest(bench_dir) is None  # the fixed benchmark has none and still plans (column read)
    m = read_manifest(out)
    assert m.users == 610
    for name in ("events", "train", "val", "test"):
        users = read(out, name).column("user").to_numpy()
        entry = m.files[f"{name}.parquet"]
        assert (entry["rows"], entry["min_user"], entry["max_user"]) == (len(users), users.min(), users.max())
        assert sum(g["rows"] for g in entry["row_groups"]) == len(users)
        assert np.array_equal(m.user_rows(name), np.bincount(users, minlength=610))
    for world, split in ((1, "train"), (3, "train"), (7, "val")):
        assert plan_shards(out, world, split=split) == plan_shards(bench_dir, world, split=split)
    assert plan_shards(out, 2, users=90) == plan_shards(bench_dir, 2, users=90)

    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    pq.write_table(read(out, "val").slice(0, 10), bad / "val.parquet")  # rewritten after the manifest
    with pytest.raises(DatasetError, match=r"manifest.json files\['val.parquet'\]: field 'rows' is 30279, val.parquet has 10"):
        plan_shards(bad, 2)
    shutil.copy(out / "val.parquet", bad / "val.parquet")
    doc = json.loads((out / FILE).read_text())
    doc["files"]["train.parquet"]["row_groups"][0]["max_user"] = 610
    (bad / FILE).write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match=r"files\['train.parquet'\] row_groups\[0\]: fields 'min_user' 0, 'max_user' 610"):
        read_manifest(bad)
    doc["files"]["train.parquet"]["row_groups"][0]["max_user"] = "609"
    (bad / FILE).write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match=r"row_groups\[0\]: field 'max_user' must be an integer >= 0, got '609'"):
        read_manifest(bad)
    shutil.copy(out / FILE, bad / FILE)
    pq.write_table(pq.read_table(out / USER_ROWS).slice(1), bad / USER_ROWS)
    with pytest.raises(DatasetError, match=r"user_rows.parquet: must hold 610 rows \(field 'users' of .*manifest.json\)"):
        read_manifest(bad)
    (bad / FILE).write_text("{")
    with pytest.raises(DatasetError, match=r"manifest.json: not JSON"):
        read_manifest(bad)
