"""A dataset folder's manifest: what a shard planner needs without reading the data.

`manifest.json` (written by `recsys.data.prepare` and `pipelines.preprocess` after the data files) records
per data file (either layout of `recsys.data.layout`: "events.parquet" or "events/part-00000.parquet", ...)
its rows, smallest and largest user id, and per Parquet row group its rows and user bounds;
`user_rows.parquet` beside it holds per dense user (row u = user u) the user's events and rows per split.
A planner then reads O(users) integers (`user_rows(split)`) instead of a split's whole `user` column
(O(rows): every row carries its negatives), and a reader sees from the row-group bounds which row groups
hold a user range.

A manifest is checked against the files' Parquet footers on read (rows and row groups, cheap), so a folder
whose files were rewritten after the manifest is an error naming the file and the field, not a wrong plan.
`pipelines.preprocess` writes it from what its range tasks report (`save_manifest`), never re-reading data
on the driver; `write_manifest` reads the files' user columns (single-process writers, which hold them).
A folder without a manifest (the fixed benchmark in ../shared) has `read_manifest(...) is None`: planners
fall back to reading the column.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recsys.data.layout import DatasetError, data_files, relative
from recsys.data.schemas import SPLITS

FILE = "manifest.json"
USER_ROWS = "user_rows.parquet"
FORMAT = "recsys-manifest/1"
DATA = ("events", *SPLITS)  # user_rows.parquet's columns: events and rows per split of each user


@dataclass(frozen=True)
class Manifest:
    folder: Path
    users: int                 # dense users 0..users-1
    files: dict[str, dict]     # file relative to the folder -> {rows, min_user, max_user, row_groups: [{rows, min_user, max_user}]}

    def user_rows(self, name: str) -> np.ndarray:
        """[users] int64: rows of `name` ("events" or a split) per user."""
        return pq.read_table(self.folder / USER_ROWS, columns=[name]).column(name).to_numpy().astype(np.int64)


def _user_bounds(path: Path) -> tuple[dict, np.ndarray]:
    """A file's manifest entry (row groups from the footer, user bounds from reading the column per row
    group: statistics are optional in Parquet) and its rows per user."""
    f = pq.ParquetFile(path)
    groups, counts = [], np.zeros(0, np.int64)
    for g in range(f.metadata.num_row_groups):
        u = f.read_row_group(g, columns=["user"]).column("user").to_numpy().astype(np.int64)
        groups.append({"rows": len(u), "min_user": int(u.min()) if len(u) else None, "max_user": int(u.max()) if len(u) else None})
        if len(u) and u.min() < 0:
            raise DatasetError(f"{path}: column 'user' row group {g}: negative user id")
        c = np.bincount(u)
        if len(c) > len(counts):
            counts = np.r_[counts, np.zeros(len(c) - len(counts), np.int64)]
        counts[: len(c)] += c
    users = [x for g in groups for x in (g["min_user"], g["max_user"]) if x is not None]
    entry = {"rows": int(f.metadata.num_rows), "min_user": min(users, default=None), "max_user": max(users, default=None),
             "row_groups": groups}
    return entry, counts


def write_manifest(folder: str | Path) -> dict:
    """Write manifest.json and user_rows.parquet for the data files in `folder`, reading their user columns.
    Returns the manifest."""
    folder = Path(folder)
    entries, counts = {}, {}
    for name in DATA:
        counts[name] = np.zeros(0, np.int64)
        for f in data_files(folder, name):
            entries[relative(folder, f)], c = _user_bounds(f)
            counts[name] = _add(counts[name], c)
    users = len(counts["events"])
    for name, c in counts.items():
        if len(c) > users:
            raise DatasetError(f"{folder}: {name}: column 'user': user {len(c) - 1} has no events")
    return save_manifest(folder, entries, {name: np.r_[c, np.zeros(users - len(c), np.int64)] for name, c in counts.items()})


def _add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if len(b) > len(a):
        a, b = b.copy(), a
    a[: len(b)] += b
    return a


def save_manifest(folder: str | Path, entries: dict[str, dict], user_rows: dict[str, np.ndarray]) -> dict:
    """Write manifest.json (`entries`: per data file, as `_user_bounds` makes them) and user_rows.parquet
    (`user_rows`: per name in DATA, rows per dense user, all the same length), each replaced atomically, the
    manifest last, so a manifest never describes files it has not seen. Returns the manifest."""
    folder = Path(folder)
    users = len(user_rows["events"])
    table = pa.table({name: np.asarray(user_rows[name], np.int64) for name in DATA})
    tmp = folder / (USER_ROWS + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, folder / USER_ROWS)
    manifest = {"format": FORMAT, "users": users, "user_rows": USER_ROWS, "files": entries}
    tmp = folder / (FILE + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, folder / FILE)
    return manifest


def _int(where: str, field: str, value, lowest: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < lowest:
        raise DatasetError(f"{where}: field {field!r} must be an integer >= {lowest}, got {value!r}")
    return value


def _check_file(folder: Path, where: str, fname: str, e, users: int) -> int:
    """One file's entry against its footer; returns its rows."""
    at = f"{where} files[{fname!r}]"
    if not isinstance(e, dict):
        raise DatasetError(f"{at}: missing")
    rows = _int(at, "rows", e.get("rows"))
    md = pq.ParquetFile(folder / fname).metadata
    if rows != md.num_rows:
        raise DatasetError(f"{at}: field 'rows' is {rows}, {fname} has {md.num_rows} (rewritten after the manifest?)")
    groups = e.get("row_groups")
    if not isinstance(groups, list) or len(groups) != md.num_row_groups:
        raise DatasetError(f"{at}: field 'row_groups' must list the file's {md.num_row_groups} row groups")
    for g, rg in enumerate(groups):
        gat = f"{at} row_groups[{g}]"
        if not isinstance(rg, dict) or _int(gat, "rows", rg.get("rows")) != md.row_group(g).num_rows:
            raise DatasetError(f"{gat}: field 'rows' does not match {fname}'s row group {g} ({md.row_group(g).num_rows} rows)")
        if rg["rows"]:
            lo, hi = _int(gat, "min_user", rg.get("min_user")), _int(gat, "max_user", rg.get("max_user"))
            if lo > hi or hi >= users:
                raise DatasetError(f"{gat}: fields 'min_user' {lo}, 'max_user' {hi} must satisfy min <= max < users ({users})")
    return rows


def read_manifest(folder: str | Path) -> Manifest | None:
    """The folder's checked manifest, or None if it has none."""
    folder = Path(folder)
    path = folder / FILE
    if not path.is_file():
        return None
    where = str(path)
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{where}: not JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise DatasetError(f"{where}: field 'format' must be {FORMAT!r}, got {m.get('format') if isinstance(m, dict) else m!r}")
    users = _int(where, "users", m.get("users"))
    files = m.get("files")
    if not isinstance(files, dict):
        raise DatasetError(f"{where}: field 'files' must be an object of file entries")
    listed = set()
    totals = dict.fromkeys(DATA, 0)
    for name in DATA:
        for path in data_files(folder, name):
            fname = relative(folder, path)
            listed.add(fname)
            totals[name] += _check_file(folder, where, fname, files.get(fname), users)
    extra = sorted(set(files) - listed)
    if extra:
        raise DatasetError(f"{where}: field 'files' lists {extra[:3]}, which the folder does not hold")
    table_path = folder / m.get("user_rows", USER_ROWS)
    if not table_path.is_file():
        raise DatasetError(f"{table_path}: file not found (field 'user_rows' of {where})")
    table = pq.read_table(table_path)
    if table.num_rows != users or set(table.column_names) != set(DATA):
        raise DatasetError(f"{table_path}: must hold {users} rows (field 'users' of {where}) with columns {list(DATA)}, "
                           f"has {table.num_rows} rows, columns {table.column_names}")
    for name in DATA:
        total = pa.compute.sum(table.column(name)).as_py() or 0
        if total != totals[name]:
            raise DatasetError(f"{table_path}: column {name!r} sums to {total} rows, {where} lists {totals[name]}")
    return Manifest(folder, users, files)
