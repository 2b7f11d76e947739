"""Where a dataset folder's data lives: the one place that knows the two layouts.

- single file: `events.parquet`, `train.parquet`, ... (the fixed benchmark, `recsys.data.prepare`, synthetic);
- part files: `events/part-00000.parquet`, `train/part-00000.parquet`, ... (`pipelines.preprocess`: one
  part per contiguous dense-user range, parts in user order, written by the range's task and never
  concatenated, so no process ever holds a whole split).

Every reader lists a data name's files with `data_files` (in user order) and reads them in that order;
a reader of a user range asks `files_for_users`, which keeps the files the manifest's user bounds say
overlap the range (all files where there is no manifest: the Parquet row-group statistics still prune).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np


class DatasetError(ValueError):
    """A dataset folder is malformed; the message names the file, column and (first bad) row."""


PART_PREFIX = "part-"


def part_name(index: int) -> str:
    return f"{PART_PREFIX}{index:05d}.parquet"


def _part_key(p: Path) -> tuple[int, str]:
    # numeric order, whatever the width: part-100000 comes after part-99999
    return len(p.name), p.name


def data_files(folder: str | Path, name: str) -> list[Path]:
    """The files of `name` ("events" or a split) in user order: [folder/name.parquet], or the part files
    of folder/name/. Raises DatasetError naming the folder if there is neither (or both)."""
    folder = Path(folder)
    single, parts = folder / f"{name}.parquet", folder / name
    if single.is_file():
        if parts.is_dir():
            raise DatasetError(f"{folder}: both {single.name} and {name}/ exist (one layout per data name)")
        return [single]
    if parts.is_dir():
        files = sorted((p for p in parts.iterdir() if p.name.startswith(PART_PREFIX) and p.suffix == ".parquet"), key=_part_key)
        if files:
            return files
        raise DatasetError(f"{parts}: no {PART_PREFIX}*.parquet files")
    raise DatasetError(f"{single}: file not found (nor part files under {parts}/)")


def remove_parts(folder: str | Path, names: tuple[str, ...]) -> None:
    """Delete the part-file folders of `names`: a single-file writer rewriting a folder that preprocessing
    wrote must not leave the old parts beside its files (`data_files` refuses both layouts for one name)."""
    import shutil

    for name in names:
        if (Path(folder) / name).is_dir():
            shutil.rmtree(Path(folder) / name)


def has_data(folder: str | Path, name: str) -> bool:
    folder = Path(folder)
    return (folder / f"{name}.parquet").is_file() or (folder / name).is_dir()


def is_dataset(folder: str | Path) -> bool:
    """Whether `folder` looks like a dataset folder (events and training rows, either layout)."""
    return Path(folder).is_dir() and has_data(folder, "events") and has_data(folder, "train")


def relative(folder: str | Path, path: Path) -> str:
    """A data file's name relative to its folder ("events.parquet", "events/part-00003.parquet"): the
    manifest's key."""
    return path.relative_to(folder).as_posix()


def files_for_users(folder: str | Path, name: str, lo: int, hi: int, manifest=None) -> list[Path]:
    """The files of `name` that may hold users lo..hi-1, in user order: by the per-file user bounds of
    `manifest` (the folder's `recsys.data.manifest.read_manifest`, read once by the caller), else every file."""
    files = data_files(folder, name)
    if manifest is None:
        return files
    keep = []
    for f in files:
        e = manifest.files[relative(folder, f)]
        if e["rows"] and e["min_user"] < hi and e["max_user"] >= lo:
            keep.append(f)
    return keep


def row_locator(files: list[Path], rows: list[int]) -> Callable[[int], tuple[str, int]]:
    """Row r of the files read one after another -> (file, row within that file), for error messages."""
    ends = np.cumsum(rows)

    def locate(r: int) -> tuple[str, int]:
        i = int(np.searchsorted(ends, r, side="right"))
        return str(files[i]), int(r - (ends[i - 1] if i else 0))

    return locate
