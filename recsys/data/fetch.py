"""`recsys data fetch`: download a public dataset from its official source into the data cache, check every
file it keeps against a SHA-256 written here, and build the fixed benchmark from it.

The cache has the layout of the shared folder (`data/<source>/`, `benchmarks/<name>/`), so `recsys.paths`
finds a fetched dataset exactly where it would find the shared one. A download goes to a temporary file
and a folder is renamed into place only once complete and verified: an interrupted or corrupted fetch
leaves nothing that looks usable.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from recsys.paths import cache_dir


class FetchError(RuntimeError):
    """A download failed or a file did not match its checksum."""


@dataclass(frozen=True)
class Source:
    url: str
    raw: str                        # folder under data/ it unpacks to
    members: dict[str, str]         # file name in the archive's folder -> SHA-256 of its bytes
    benchmark: str | None = None    # folder under benchmarks/ built from it, if any


# GroupLens' ml-latest-small (generated 2018-09-26, frozen): the same bytes as ../shared/data/movielens.
SOURCES = {
    "ml-latest-small": Source(
        url="https://files.grouplens.org/datasets/movielens/ml-latest-small.zip",
        raw="movielens/ml-latest-small",
        members={"ratings.csv": "aa289ca83157595d0df6aea1be6a4ded676ddc4385472e8313a8ed9805352646",
                 "movies.csv": "5a5f32dd9bb3797b8e728a1b98958789d2b13f294a69fdfbc5727f8a9611aa07",
                 "README.txt": "63d22ac138e80fae37021797ed8e1b9424b5239dc576a137422adf783ae3f404"},
        benchmark="ml-latest-small"),
}
# Seed of the benchmark's negative sampling when it is rebuilt from the raw files. The shared benchmark's
# negatives came from another generator: events and positive rows are identical, negative items are not.
BENCHMARK_SEED = 7


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download(url: str, dest: Path, timeout_s: float) -> None:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r, open(dest, "wb") as f:
            shutil.copyfileobj(r, f, 1 << 20)
    except OSError as e:  # URLError, timeouts and refused connections are all OSErrors
        raise FetchError(f"download of {url} failed: {e}") from e


def _unpack(archive: Path, source: Source, dest: Path) -> None:
    """The archive's wanted members (found by file name, whatever folder they sit in) into `dest`, checked."""
    try:
        with zipfile.ZipFile(archive) as z:
            names = {Path(n).name: n for n in z.namelist() if not n.endswith("/")}
            for name, digest in source.members.items():
                if name not in names:
                    raise FetchError(f"{source.url}: archive has no {name}")
                with z.open(names[name]) as r, open(dest / name, "wb") as f:
                    shutil.copyfileobj(r, f, 1 << 20)
                got = sha256(dest / name)
                if got != digest:
                    raise FetchError(f"{source.url}: {name} has SHA-256 {got}, expected {digest}")
    except zipfile.BadZipFile as e:
        raise FetchError(f"{source.url}: not a zip archive ({e})") from e


def fetch(name: str, root: Path | None = None, url: str | None = None, timeout_s: float = 60.0,
          progress=print) -> Path:
    """Download `name` into `root` (default: the cache) unless already there; -> its benchmark folder (or raw
    folder when it has none). `url` overrides the official source (a mirror, or a test's own server)."""
    if name not in SOURCES:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(SOURCES))}")
    source, root = SOURCES[name], root or cache_dir()
    raw = root / "data" / source.raw
    if not all((raw / m).is_file() for m in source.members):
        raw.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=raw.parent, prefix=".fetch-") as tmp:
            archive, unpacked = Path(tmp) / "archive.zip", Path(tmp) / "raw"
            unpacked.mkdir()
            progress(f"downloading {url or source.url}")
            _download(url or source.url, archive, timeout_s)
            _unpack(archive, source, unpacked)
            shutil.rmtree(raw, ignore_errors=True)
            unpacked.rename(raw)
        progress(f"{name}: {len(source.members)} files verified (SHA-256) in {raw}")
    if source.benchmark is None:
        return raw
    bench = root / "benchmarks" / source.benchmark
    if not (bench / "meta.json").is_file():  # prepare writes meta.json last
        from recsys.data.prepare import prepare
        from recsys.data.raw import read_movielens

        progress(f"building the benchmark {bench}")
        prepare(read_movielens(raw), bench, seed=BENCHMARK_SEED)
    return bench
