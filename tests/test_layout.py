"""Dataset folders in the part-file layout (what distributed preprocessing writes) read like the single-file
layout (the fixed benchmark): built here from the benchmark itself by cutting every file at user bounds,
without Ray."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys.data.layout import DatasetError, data_files, files_for_users, is_dataset, part_name
from recsys.data.manifest import read_manifest, write_manifest
from recsys.data.report import describe
from recsys.data.sequences import load_dataset
from recsys.data.shards import folder_vocabulary, id_space, plan_shards

NAMES = ("events", "train", "val", "test")
CUTS = (0, 150, 151, 400, 610)  # part 1 holds one user only


@pytest.fixture(scope="module")
def parts(bench_dir, tmp_path_factory):
    """The benchmark folder with every file cut into part files at CUTS (user order), plus a manifest."""
    out = tmp_path_factory.mktemp("parts") / "ml"
    out.mkdir()
    for name in NAMES:
        (out / name).mkdir()
        t = pq.read_table(bench_dir / f"{name}.parquet")
        user = t.column("user").to_numpy()
        for p, (lo, hi) in enumerate(zip(CUTS[:-1], CUTS[1:])):
            a, b = np.searchsorted(user, [lo, hi])
            pq.write_table(t.slice(a, b - a), out / name / part_name(p), row_group_size=20_000)
    write_manifest(out)
    return out


def test_both_layouts_load_the_same(bench_dir, parts):
    assert is_dataset(parts) and is_dataset(bench_dir)
    assert [f.name for f in data_files(parts, "train")] == [part_name(p) for p in range(4)]
    a, b = load_dataset(bench_dir), load_dataset(parts)
    assert (a.n_items, a.n_cates) == (b.n_items, b.n_cates)
    for field in ("offsets", "item", "cate", "ts"):
        assert np.array_equal(getattr(a.store, field), getattr(b.store, field)), field
    for s in ("train", "val", "test"):
        for field in ("user", "pos", "item", "cate", "label"):
            assert np.array_equal(getattr(a.splits[s], field), getattr(b.splits[s], field)), (s, field)
    assert id_space(bench_dir)[:3] == id_space(parts)[:3]
    n_items, n_cates = a.n_items, a.n_cates
    assert np.array_equal(folder_vocabulary(bench_dir, n_items, n_cates).item_cate, folder_vocabulary(parts, n_items, n_cates).item_cate)
    assert describe(bench_dir) | {"folder": ""} == describe(parts) | {"folder": ""}
    for world, split in ((1, "train"), (3, "train"), (5, "val")):
        assert plan_shards(bench_dir, world, split=split) == plan_shards(parts, world, split=split)


def test_a_user_range_opens_only_the_parts_that_hold_it(parts, bench_dir):
    m = read_manifest(parts)
    assert [f.name for f in files_for_users(parts, "train", 150, 151, m)] == [part_name(1)]
    assert [f.name for f in files_for_users(parts, "val", 100, 160, m)] == [part_name(p) for p in (0, 1, 2)]
    assert [f.name for f in files_for_users(parts, "events", 400, 610, m)] == [part_name(3)]
    # a folder without a manifest: every file (the Parquet statistics prune row groups)
    assert files_for_users(bench_dir, "train", 0, 10, read_manifest(bench_dir)) == [bench_dir / "train.parquet"]
    assert data_files(bench_dir, "events") == [bench_dir / "events.parquet"]


def test_part_name_order_is_numeric_beyond_five_digits(tmp_path):
    (tmp_path / "train").mkdir()
    for p in (99_999, 100_000, 3):
        (tmp_path / "train" / part_name(p)).touch()
    assert [f.name for f in data_files(tmp_path, "train")] == [part_name(3), part_name(99_999), part_name(100_000)]


def test_errors_name_the_part_file_and_its_row(parts, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(parts, bad)
    (bad / "manifest.json").unlink()
    t = pq.read_table(parts / "val" / part_name(2))
    label = t.column("label").to_numpy().copy()
    label[7] = 3
    pq.write_table(t.set_column(t.column_names.index("label"), "label", pa.array(label, t.column("label").type)),
                   bad / "val" / part_name(2))
    with pytest.raises(DatasetError, match=rf"val/{part_name(2)}: column 'label' row 7: label must be 0 or 1"):
        load_dataset(bad)
    # a part file the manifest does not list, or one layout twice, is an error naming it
    shutil.copytree(parts, tmp_path / "extra")
    shutil.copy(parts / "train" / part_name(3), tmp_path / "extra" / "train" / part_name(4))
    with pytest.raises(DatasetError, match=rf"files\['train/{part_name(4)}'\]: missing"):
        read_manifest(tmp_path / "extra")
    shutil.copy(parts / "test" / part_name(0), tmp_path / "extra" / "test.parquet")
    with pytest.raises(DatasetError, match=r"both test.parquet and test/ exist"):
        data_files(tmp_path / "extra", "test")


def test_a_single_file_writer_replaces_a_part_layout(parts, taobao_csv, tmp_path):
    """prepare into a folder that preprocessing wrote: the old parts go, the new files load."""
    from recsys.data.prepare import prepare
    from recsys.data.raw import open_raw

    out = tmp_path / "ds"
    shutil.copytree(parts, out)
    meta = prepare(open_raw(taobao_csv), out, seed=0)
    for name in NAMES:
        assert data_files(out, name) == [out / f"{name}.parquet"]
    assert len(load_dataset(out).splits["train"]) == meta["rows"]["train"]
    assert read_manifest(out).users == meta["n_users"]
