"""Where the real data lives (never copied into the repo).

Data roots share one layout (`data/<source>/...` raw files, `benchmarks/<name>/` fixed benchmarks) and are
searched in this order, the first root that holds the wanted folder wins:
  1. `$RECSYS_SHARED` (the project's shared folder, wherever it is),
  2. `../shared` beside the working directory (the layout of a checkout next to shared/),
  3. the download cache, `$RECSYS_DATA` or `~/.cache/recsys` (`recsys data fetch ml-latest-small` fills it).
Nothing is resolved against the install location: an installed package finds data the same way.
"""

from __future__ import annotations

import os
from pathlib import Path

FETCH_HINT = "recsys data fetch ml-latest-small"
# The source checkout, for tests and scripts that read the repository's own files; never used to find data.
REPO_ROOT = Path(__file__).resolve().parent.parent


class DataNotFoundError(FileNotFoundError):
    """A dataset is in none of the data roots."""


def cache_dir() -> Path:
    """The download cache: `$RECSYS_DATA`, else `~/.cache/recsys`."""
    env = os.environ.get("RECSYS_DATA")
    return Path(env) if env else Path.home() / ".cache" / "recsys"


def data_roots() -> list[Path]:
    """The roots searched for data, in order (some may not exist)."""
    roots = []
    if env := os.environ.get("RECSYS_SHARED"):
        roots.append(Path(env))
    roots += [Path.cwd().parent / "shared", cache_dir()]
    return roots


def find_data(relpath: str | Path) -> Path:
    """The first root holding `relpath` (e.g. 'benchmarks/ml-latest-small'); DataNotFoundError otherwise."""
    for root in data_roots():
        if (root / relpath).exists():
            return root / relpath
    tried = ", ".join(str(r) for r in data_roots())
    raise DataNotFoundError(f"{relpath} not found in any data root ({tried}); set RECSYS_SHARED to the shared "
                            f"folder, or download it with `{FETCH_HINT}`")


def benchmark_dir(name: str = "ml-latest-small") -> Path:
    return find_data(Path("benchmarks") / name)


def raw_dir(source: str) -> Path:
    """A raw data folder or file, e.g. 'movielens/ml-latest-small' or 'taobao-sample/UserBehavior.csv'."""
    return find_data(Path("data") / source)
