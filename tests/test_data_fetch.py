"""`recsys data fetch` against a real HTTP server the test starts (serving zips it builds), and the order in
which data roots are searched."""

from __future__ import annotations

import functools
import http.server
import threading
import zipfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from recsys.data.fetch import SOURCES, FetchError, fetch, sha256
from recsys.net import free_port
from recsys.paths import DataNotFoundError, benchmark_dir, data_roots, find_data


@pytest.fixture
def http_dir(tmp_path):
    """-> (folder served, base URL): a real HTTP server on loopback for the test's files."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _zip(path: Path, files: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(f"ml-latest-small/{name}", data)


def test_fetch_downloads_verifies_and_builds_the_benchmark(movielens_dir, bench_dir, http_dir, tmp_path):
    www, base = http_dir
    _zip(www / "ml.zip", {n: (movielens_dir / n).read_bytes() for n in SOURCES["ml-latest-small"].members})
    cache = tmp_path / "cache"
    out = fetch("ml-latest-small", root=cache, url=f"{base}/ml.zip", progress=lambda m: None)
    assert out == cache / "benchmarks" / "ml-latest-small"
    for name, digest in SOURCES["ml-latest-small"].members.items():
        assert sha256(cache / "data" / "movielens" / "ml-latest-small" / name) == digest
    # the rebuilt benchmark has the shared one's events and positive rows (negatives come from our sampler)
    assert pq.read_table(out / "events.parquet").equals(pq.read_table(bench_dir / "events.parquet"))
    for split in ("train", "val", "test"):
        ours, theirs = pq.read_table(out / f"{split}.parquet"), pq.read_table(bench_dir / f"{split}.parquet")
        assert ours.select(["user", "pos", "label"]).equals(theirs.select(["user", "pos", "label"]))
    (www / "ml.zip").unlink()  # a second fetch finds everything in place and downloads nothing
    assert fetch("ml-latest-small", root=cache, url=f"{base}/ml.zip", progress=lambda m: None) == out


def test_a_corrupted_download_is_refused_and_leaves_nothing(http_dir, tmp_path):
    www, base = http_dir
    members = SOURCES["ml-latest-small"].members
    _zip(www / "bad.zip", {n: b"not the real file\n" for n in members})
    (www / "notzip.zip").write_bytes(b"<html>a proxy's error page</html>")
    cache = tmp_path / "cache"
    with pytest.raises(FetchError, match=r"ratings\.csv has SHA-256 [0-9a-f]{64}, expected " + members["ratings.csv"]):
        fetch("ml-latest-small", root=cache, url=f"{base}/bad.zip", progress=lambda m: None)
    with pytest.raises(FetchError, match="not a zip archive"):
        fetch("ml-latest-small", root=cache, url=f"{base}/notzip.zip", progress=lambda m: None)
    with pytest.raises(FetchError, match="404"):
        fetch("ml-latest-small", root=cache, url=f"{base}/missing.zip", progress=lambda m: None)
    with pytest.raises(FetchError, match="download of .* failed"):
        fetch("ml-latest-small", root=cache, url=f"http://127.0.0.1:{free_port()}/x.zip", progress=lambda m: None)
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        fetch("nope", root=cache)
    assert not (cache / "data" / "movielens" / "ml-latest-small").exists()
    assert not list((cache / "data" / "movielens").iterdir())  # no partial download left behind


def test_data_roots_in_order(tmp_path, monkeypatch):
    shared, beside, cache = tmp_path / "s", tmp_path / "shared", tmp_path / "c"
    work = tmp_path / "repo"
    for root in (shared, beside, cache):
        (root / "benchmarks" / "b").mkdir(parents=True)
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("RECSYS_SHARED", str(shared))
    monkeypatch.setenv("RECSYS_DATA", str(cache))
    assert data_roots() == [shared, beside, cache]
    assert benchmark_dir("b") == shared / "benchmarks" / "b"
    (shared / "benchmarks" / "b").rmdir()
    assert benchmark_dir("b") == beside / "benchmarks" / "b"
    (beside / "benchmarks" / "b").rmdir()
    assert benchmark_dir("b") == cache / "benchmarks" / "b"
    (cache / "benchmarks" / "b").rmdir()
    with pytest.raises(DataNotFoundError, match="recsys data fetch ml-latest-small"):
        find_data("benchmarks/b")
    monkeypatch.delenv("RECSYS_SHARED")
    monkeypatch.delenv("RECSYS_DATA")
    assert data_roots() == [beside, Path.home() / ".cache" / "recsys"]
