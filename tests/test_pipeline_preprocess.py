"""Ray preprocessing equals the single-process data layer (recsys.data.prepare) on the same real input and
seed: same events, same samples, same negatives; re-running replaces; bad rows are counted, not dropped."""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from pipelines.preprocess import run_preprocess
from pipelines.runtime import init_ray
from recsys.config.data import SplitConfig
from pipelines.shard_io import read_shard, shard_datasets
from recsys.data.layout import data_files, files_for_users, relative
from recsys.data.manifest import FILE as MANIFEST
from recsys.data.manifest import USER_ROWS, read_manifest, write_manifest
from recsys.data.prepare import prepare
from recsys.data.raw import open_raw
from recsys.data.report import BadInputError
from recsys.data.report import describe
from recsys.data.sequences import load_dataset
from recsys.data.shards import id_space, plan_shards, shard_from_tables

FILES = ("events", "train", "val", "test")
# Appended to a real Taobao log: each line is one kind of bad row the loader counts under lenient=True.
BAD_LINES = ["abc,1,2,pv,1511544070", "1,2,3,pv", "1,2,3,teleport,1511544070", "1,2,3,pv,yesterday", "-5,2,3,pv,1511544070"]


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    started = init_ray(num_cpus=2, object_store_mb=256)
    yield
    if started:
        ray.shutdown()


def read_all(folder, name):
    """A data name's rows, its files (either layout) read in user order."""
    return pa.concat_tables([pq.read_table(f) for f in data_files(folder, name)])


def assert_same_folder(a, b):
    """`a` (single-file layout, prepare) holds the same data as `b` (part files, preprocess)."""
    for f in FILES:
        assert data_files(a, f) == [a / f"{f}.parquet"]
        assert len(data_files(b, f)) > 1 and not (b / f"{f}.parquet").exists(), f  # parts, never concatenated
        ta, tb = read_all(a, f), read_all(b, f)
        assert ta.schema == tb.schema, f
        assert ta.num_rows == tb.num_rows, f
        assert ta.equals(tb), f"{f} differs"
    # the raw -> dense vocabulary serving maps catalogue ids with: byte-identical
    assert (a / "vocab.safetensors").read_bytes() == (b / "vocab.safetensors").read_bytes()
    # the manifests: the same rows per user; part files (one per user range) in user order, disjoint, and the
    # entries the tasks reported equal to what reading the files gives
    ma, mb = read_manifest(a), read_manifest(b)
    for f in FILES:
        assert np.array_equal(ma.user_rows(f), mb.user_rows(f)), f
        parts = [mb.files[relative(b, p)] for p in data_files(b, f)]
        assert sum(e["rows"] for e in parts) == ma.files[f"{f}.parquet"]["rows"]
        groups = [g for e in parts for g in e["row_groups"] if g["rows"]]
        assert all(g["max_user"] < h["min_user"] for g, h in itertools.pairwise(groups)), f
    written = json.loads((b / MANIFEST).read_text())
    rebuilt = tmp_copy(b)
    assert json.loads((rebuilt / MANIFEST).read_text())["files"] == written["files"]
    assert (rebuilt / USER_ROWS).read_bytes() == (b / USER_ROWS).read_bytes()
    # every loader reads both layouts the same
    da, db = load_dataset(a), load_dataset(b)
    assert np.array_equal(da.store.offsets, db.store.offsets) and np.array_equal(da.store.item, db.store.item)
    for s in ("train", "val", "test"):
        assert np.array_equal(da.splits[s].item, db.splits[s].item) and np.array_equal(da.splits[s].user, db.splits[s].user)
    assert id_space(a)[:3] == id_space(b)[:3]
    assert describe(a) | {"folder": ""} == describe(b) | {"folder": ""}
    for world, split in ((3, "train"), (4, "val")):
        assert plan_shards(a, world, split=split) == plan_shards(b, world, split=split)


def tmp_copy(folder):
    """A copy of `folder` whose manifest is rebuilt by reading its files (the single-process way)."""
    dest = folder.with_name(folder.name + "-reread")
    shutil.copytree(folder, dest)
    write_manifest(dest)
    return dest


@pytest.fixture(scope="module")
def bad_taobao(taobao_csv, tmp_path_factory):
    path = tmp_path_factory.mktemp("raw") / "UserBehavior.csv"
    shutil.copy(taobao_csv, path)
    with open(path, "a") as f:
        f.write("\n".join(BAD_LINES) + "\n")
    return path


def test_movielens_equals_single_process_across_partitions(movielens_dir, tmp_path):
    src = movielens_dir
    want = prepare(open_raw(src), tmp_path / "single", seed=7)
    # ~100k events in ranges of ~20k: several user ranges, so the partitioned path is what is compared.
    got = run_preprocess(src, tmp_path / "ray", seed=7, partition_events=20_000)
    ray_info = got.pop("ray")
    assert ray_info["partitions"] >= 4 and ray_info["read_tasks"] == 1
    assert got == want
    assert_same_folder(tmp_path / "single", tmp_path / "ray")
    assert len(data_files(tmp_path / "ray", "events")) == ray_info["partitions"]
    # the driver received the user counts only (one row per user); the item maps stayed in tasks
    assert ray_info["driver_rows"] == want["n_users"] < want["n_items"]
    # per-rank reading on Ray (training workers, evaluation actors): the same shards from both layouts, each
    # rank reading only the part files that overlap its users
    single, parts = tmp_path / "single", tmp_path / "ray"
    plan = plan_shards(parts, 2)
    n_items, n_cates, _, meta = id_space(parts)
    datasets = shard_datasets(parts, plan, ("train",))
    for rank in range(2):
        lo, hi = plan.users(rank)
        assert len(files_for_users(parts, "train", lo, hi, read_manifest(parts))) < len(data_files(parts, "train"))
        b = read_shard(lambda n: datasets[f"{n}.{rank}"], parts, plan, rank, ("train",), n_items, n_cates, meta)
        rows = [("user", ">=", lo), ("user", "<", hi)]
        a = shard_from_tables(pq.read_table(single / "events.parquet", filters=rows),
                              {"train": pq.read_table(single / "train.parquet", filters=rows)}, single, plan, rank,
                              n_items, n_cates, meta)
        assert np.array_equal(a.store.offsets, b.store.offsets) and np.array_equal(a.store.item, b.store.item)
        assert np.array_equal(a.splits["train"].item, b.splits["train"].item) and len(b.splits["train"]) == plan.rows[rank]


def test_byte_ranges_bad_rows_counted_and_rerun_overwrites(bad_taobao, tmp_path):
    split = SplitConfig(negatives=3)
    want = prepare(open_raw(bad_taobao, lenient=True), tmp_path / "single", seed=1, split=split)
    out = tmp_path / "ray"
    # the ~530 kB CSV in ~100 kB byte ranges, one read task each: the same rows, report and line numbers
    first = run_preprocess([bad_taobao], out, seed=1, lenient=True, split=split, partition_events=5_000,
                           split_bytes=100_000)
    assert first["ray"]["read_tasks"] == 6
    report = first["load_report"]
    assert sum(report["skipped"].values()) == len(BAD_LINES)
    assert report["rows_read"] == report["rows_kept"] + len(BAD_LINES) + sum(report["filtered"].values())
    assert len(report["examples"]) == len(BAD_LINES)  # each names its file and line
    first.pop("ray")
    assert first == want
    assert_same_folder(tmp_path / "single", out)
    # A second run into the same folder, with another seed: replaced, not appended, no stale files.
    second = run_preprocess([bad_taobao], out, seed=2, lenient=True, split=split, partition_events=5_000)
    assert second["rows"] == first["rows"]
    for f in FILES:
        assert read_all(out, f).num_rows == (first["n_events"] if f == "events" else first["rows"][f])
    assert read_all(out, "train").column("item") != pq.read_table(tmp_path / "single/train.parquet").column("item")
    assert sorted(p.name for p in out.iterdir()) == sorted(list(FILES) + ["manifest.json", "meta.json", "user_rows.parquet", "vocab.safetensors"])
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".ray")]  # temp folders cleaned up


def test_strict_mode_names_the_bad_row(bad_taobao, tmp_path):
    with pytest.raises(BadInputError, match=r"UserBehavior.csv, row 1432[2-6]"):
        run_preprocess(bad_taobao, tmp_path / "strict", seed=1)
    assert not (tmp_path / "strict").exists()  # nothing half-written under the final name


def test_strict_mode_names_a_bad_row_of_a_later_byte_range(taobao_csv, tmp_path):
    """Line 5000 (byte ~180k) lies in the second 120 kB range: its task knows the absolute number of its first
    line (counted before the reads), so the error names the file's line, not the range's."""
    lines = taobao_csv.read_text().splitlines(keepends=True)
    path = tmp_path / "UserBehavior.csv"
    path.write_text("".join(lines[:4999] + ["1,2,3,teleport,1511544070\n"] + lines[4999:]))
    assert 120_000 < len("".join(lines[:4999]).encode()) < 240_000
    with pytest.raises(BadInputError, match=r"UserBehavior.csv, row 5000, column 'behavior_type': unknown behaviour type"):
        run_preprocess(path, tmp_path / "strict", seed=1, split_bytes=120_000)
    assert not (tmp_path / "strict").exists()


def test_parquet_input_split_by_row_groups_equals_single_process(taobao_csv, tmp_path):
    """Our events Parquet with several row groups, one read task per row group: the same dataset."""
    events = tmp_path / "events.parquet"
    pq.write_table(open_raw(taobao_csv).read_all(), events, row_group_size=3_000)
    want = prepare(open_raw(events), tmp_path / "single", seed=3)
    got = run_preprocess(events, tmp_path / "ray", seed=3, partition_events=4_000, split_bytes=1)
    assert got.pop("ray")["read_tasks"] == pq.ParquetFile(events).metadata.num_row_groups >= 4
    assert got == want
    assert_same_folder(tmp_path / "single", tmp_path / "ray")


def fetched_rows(x) -> int:
    """Array elements and table rows in an object the driver fetched (nested containers and dataclasses)."""
    if isinstance(x, np.ndarray):
        return x.size
    if isinstance(x, pa.Table):
        return x.num_rows
    if dataclasses.is_dataclass(x):
        return sum(fetched_rows(getattr(x, f.name)) for f in dataclasses.fields(x))
    if isinstance(x, dict):
        return sum(fetched_rows(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return sum(fetched_rows(v) for v in x)
    return 0


def test_driver_fetches_no_item_data(taobao_csv, tmp_path, monkeypatch):
    """Issue 19: the driver's memory must not grow with the catalogue. Everything the driver process pulls
    from the object store (`ray.get`, which Ray Data's own block fetching calls too) is counted: the user
    map (ids and counts) and one row per user range, never a row per item; the output is still the
    single-process one."""
    want = prepare(open_raw(taobao_csv), tmp_path / "single", seed=4)
    fetched = []
    get = ray.get

    def counting_get(refs, *args, **kwargs):
        out = get(refs, *args, **kwargs)
        fetched.append(fetched_rows(out))
        return out

    monkeypatch.setattr(ray, "get", counting_get)
    got = run_preprocess(taobao_csv, tmp_path / "ray", seed=4, partition_events=4_000)
    monkeypatch.undo()
    ray_info = got.pop("ray")
    assert got == want
    assert_same_folder(tmp_path / "single", tmp_path / "ray")
    assert ray_info["driver_rows"] == want["n_users"]
    assert want["n_items"] > 10 * want["n_users"]  # so a per-item fetch could not hide under the bound
    assert sum(fetched) <= 2 * want["n_users"] + ray_info["partitions"]
