"""Ray preprocessing equals the single-process data layer (recsys.data.prepare) on the same real input and
seed: same events, same samples, same negatives; re-running replaces; bad rows are counted, not dropped."""

from __future__ import annotations

import itertools
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray

from pipelines.preprocess import run_preprocess
from pipelines.runtime import init_ray
from recsys.config.data import SplitConfig
from recsys.data.manifest import read_manifest
from recsys.data.prepare import prepare
from recsys.data.raw import open_raw
from recsys.data.report import BadInputError
from recsys.data.sequences import load_dataset

FILES = ("events", "train", "val", "test")
# Appended to a real Taobao log: each line is one kind of bad row the loader counts under lenient=True.
BAD_LINES = ["abc,1,2,pv,1511544070", "1,2,3,pv", "1,2,3,teleport,1511544070", "1,2,3,pv,yesterday", "-5,2,3,pv,1511544070"]


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    started = init_ray(num_cpus=2, object_store_mb=256)
    yield
    if started:
        ray.shutdown()


def assert_same_folder(a, b):
    for f in FILES:
        ta, tb = pq.read_table(a / f"{f}.parquet"), pq.read_table(b / f"{f}.parquet")
        assert ta.schema == tb.schema, f
        assert ta.num_rows == tb.num_rows, f
        assert ta.equals(tb), f"{f}.parquet differs"
    # the raw -> dense vocabulary serving maps catalogue ids with: byte-identical
    assert (a / "vocab.safetensors").read_bytes() == (b / "vocab.safetensors").read_bytes()
    # the manifests: the same rows per user; row groups (one per user range here) in user order, disjoint
    ma, mb = read_manifest(a), read_manifest(b)
    for f in FILES:
        assert np.array_equal(ma.user_rows(f), mb.user_rows(f)), f
        groups = [g for g in mb.files[f"{f}.parquet"]["row_groups"] if g["rows"]]
        assert all(g["max_user"] < h["min_user"] for g, h in itertools.pairwise(groups)), f


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
    assert got.pop("partitions") >= 4
    assert got == want
    assert_same_folder(tmp_path / "single", tmp_path / "ray")
    assert len(read_manifest(tmp_path / "ray").files["events.parquet"]["row_groups"]) >= 4
    ds = load_dataset(tmp_path / "ray")  # the output is a dataset folder the trainer can load
    assert len(ds.splits["train"]) == want["rows"]["train"]


def test_bad_rows_counted_and_rerun_overwrites(bad_taobao, tmp_path):
    split = SplitConfig(negatives=3)
    want = prepare(open_raw(bad_taobao, lenient=True), tmp_path / "single", seed=1, split=split)
    out = tmp_path / "ray"
    first = run_preprocess([bad_taobao], out, seed=1, lenient=True, split=split, partition_events=5_000)
    report = first["load_report"]
    assert sum(report["skipped"].values()) == len(BAD_LINES)
    assert report["rows_read"] == report["rows_kept"] + len(BAD_LINES) + sum(report["filtered"].values())
    assert len(report["examples"]) == len(BAD_LINES)  # each names its file and line
    first.pop("partitions")
    assert first == want
    assert_same_folder(tmp_path / "single", out)
    # A second run into the same folder, with another seed: replaced, not appended, no stale files.
    second = run_preprocess([bad_taobao], out, seed=2, lenient=True, split=split, partition_events=5_000)
    assert second["rows"] == first["rows"]
    for f in FILES:
        assert pq.read_table(out / f"{f}.parquet").num_rows == (first["n_events"] if f == "events" else first["rows"][f])
    assert pq.read_table(out / "train.parquet").column("item") != pq.read_table(tmp_path / "single/train.parquet").column("item")
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{f}.parquet" for f in FILES] + ["manifest.json", "meta.json", "user_rows.parquet", "vocab.safetensors"])
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".ray")]  # temp folders cleaned up


def test_strict_mode_names_the_bad_row(bad_taobao, tmp_path):
    with pytest.raises(BadInputError, match=r"UserBehavior.csv, row 1432[2-6]"):
        run_preprocess(bad_taobao, tmp_path / "strict", seed=1)
    assert not (tmp_path / "strict").exists()  # nothing half-written under the final name
