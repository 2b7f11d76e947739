"""Distributed preprocessing on Ray: raw logs -> a dataset folder with the same data as `recsys.data.prepare`'s,
in the part-file layout (`recsys.data.layout`: events/part-00000.parquet, train/part-00000.parquet, ...).

No per-row data passes through the driver, nor any per-item data: what reaches it is O(users) (the user map,
the per-range counts for the manifest) and a few scalars, so its memory does not grow with the catalogue.
Stages:
1. read: every input file is cut into spans (`recsys.data.raw.Span`): a CSV larger than `split_bytes` into
   byte ranges that tasks first align to line starts and count the newlines of (so each span knows the
   absolute line number of its first line: errors name the file and its line exactly as a whole-file read
   does), a Parquet file into groups of row groups. One Ray task per span runs the project's streaming raw
   loader (same validation, same per-line errors, same lenient counting) and writes the four columns
   preprocessing needs as a Parquet part; it returns its `LoadReport`, so bad rows are counted, merged
   and reported, never lost.
2. id maps (Ray Data): per-block partial counts of users and (item, category) pairs, summed by a
   distributed `groupby(...).sum()`; one task sorts the reduced counts (one row per user, one per pair)
   into the dense id maps, each item's category (smallest seen) and popularity, and writes the vocabulary.
   The driver receives the user map (it cuts the user ranges and writes the manifest's per-user rows) and
   the item and category counts; the item maps stay in the object store for the range tasks.
3. per-user work (Ray Data): events are assigned to contiguous dense-user ranges balanced by event count,
   at least one per CPU of the cluster, shuffled by range (`groupby().map_groups`), and each range is
   sorted, numbered, split and given its negatives with the pure functions of `recsys.data.prepare`.
   Negatives depend only on (seed, user, pos), so they equal the single-process draw whatever the
   partitioning. Each range writes its part of the events and of every split, and returns its rows, its
   files' row-group user bounds and its users' rows per split.
4. commit: the manifest (`recsys.data.manifest.save_manifest`) is written from what the ranges returned,
   with the meta, inside a fresh temporary folder that then replaces `out_dir`: re-running
   overwrites, never appends.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recsys.config.data import SplitConfig
from recsys.data.layout import part_name
from recsys.data.manifest import save_manifest
from recsys.data.prepare import (
    FORMAT,
    DenseEvents,
    split_of_events,
    split_rows,
    user_item_keys,
    write_vocabulary,
)
from recsys.data.raw import Span, csv_span, open_parquet, open_raw, parquet_files, raw_format
from recsys.data.report import BadInputError, LoadReport
from recsys.data.schemas import DATASET_EVENTS_SCHEMA, SPLITS
from recsys.vocab import Vocabulary

if TYPE_CHECKING:
    import ray

RAW_COLUMNS = ("user_id", "item_id", "category_id", "ts")
RAW_SCHEMA = pa.schema([pa.field(c, pa.int64()) for c in RAW_COLUMNS])
TARGET_PARTITION_EVENTS = 2_000_000  # events per user range at most: a few hundred MB of numpy
SPLIT_BYTES = 64 << 20  # input bytes per read task (CSV byte ranges, Parquet row groups)
DATA = ("events", *SPLITS)


@dataclass(frozen=True)
class UserMaps:
    """The user half of the id maps: the driver's (user ranges, manifest) and the range tasks'."""

    user_ids: np.ndarray    # [U] sorted original user ids; dense user = index
    user_counts: np.ndarray  # [U] events per user


@dataclass(frozen=True)
class ItemMaps:
    """The item half of the id maps: built in a task and read by the range tasks, never by the driver (it
    grows with the catalogue: 1.94M items at 100M events)."""

    item_ids: np.ndarray    # [I] sorted original item ids; dense item = index + 1
    cate_ids: np.ndarray    # [C] sorted original category ids; dense category = index + 1
    item_cate: np.ndarray   # [I + 1] dense category of each dense item (smallest seen), 0 for padding
    popularity: np.ndarray  # [I + 1] events per dense item
    cate_conflicts: int


# --------------------------------------------------------------------------------------------- stage 1


@dataclass(frozen=True)
class ReadTask:
    """One span of one input: `path` is what the loader opens (a MovieLens folder, a CSV or Parquet file),
    `file` the file the span is of, `span` None for the whole input."""

    path: str
    file: str
    span: Span | None


def _plan_reads(path: str, split_bytes: int) -> list[ReadTask | tuple[str, str, int, int]]:
    """An input's read tasks; a large CSV's byte ranges come back as (path, file, start, end), to be aligned
    and counted by `csv_span` before they become tasks. Only sizes and Parquet footers are read here."""
    fmt = raw_format(path)
    if fmt == "parquet":
        out: list = []
        for f in parquet_files(path):
            md = open_parquet(f).metadata
            groups, first, size, rows = [], 0, 0, 1
            for g in range(md.num_row_groups):
                size += md.row_group(g).total_byte_size
                if size >= split_bytes or g == md.num_row_groups - 1:
                    groups.append((first, g + 1, rows))
                    rows += sum(md.row_group(i).num_rows for i in range(first, g + 1))
                    first, size = g + 1, 0
            if len(groups) <= 1:  # whole file: the loader's own checks (an empty file is an error) apply
                out.append(ReadTask(str(f), str(f), None))
            else:
                out += [ReadTask(str(f), str(f), Span(a, b, r)) for a, b, r in groups]
        return out
    file = os.path.join(path, "ratings.csv") if fmt == "movielens" else path
    size = os.path.getsize(file)
    if size <= split_bytes:
        return [ReadTask(path, file, None)]
    return [(path, file, a, min(a + split_bytes, size)) for a in range(0, size, split_bytes)]


def _read_span(task: ReadTask, lenient: bool, out_dir: str, index: int) -> dict:
    """-> the span's LoadReport as a dict, or {"error": BadInputError fields} (the exception itself does
    not survive Ray's pickling, and the driver re-raises it with its file/row/column intact)."""
    stream = open_raw(task.path, lenient=lenient, span=task.span)
    writer = None
    try:
        for batch in stream:
            table = pa.Table.from_batches([batch]).select(list(RAW_COLUMNS)).cast(RAW_SCHEMA)
            if writer is None:
                writer = pq.ParquetWriter(os.path.join(out_dir, part_name(index)), RAW_SCHEMA)
            writer.write_table(table)
    except BadInputError as e:
        return {"error": [e.file, e.row, e.column, e.reason, e.value]}
    finally:
        if writer is not None:
            writer.close()
    return stream.report.to_dict()


def _merge_reports(reports: list[dict], source: str) -> dict:
    total = LoadReport(source=source)
    for r in reports:
        part = LoadReport(r["source"], r["rows_read"], r["rows_kept"], examples=list(r["examples"]))
        part.skipped.update(r["skipped"])
        part.filtered.update(r["filtered"])
        total.merge(part)
    return total.to_dict()


def read_inputs(paths: list[str], lenient: bool, out_dir: str, split_bytes: int) -> tuple[dict, int]:
    """Stage 1 on the connected Ray: every input's spans read into Parquet parts under `out_dir`. Returns the
    merged load report (its source named as `recsys.data.raw.open_raw` names the inputs) and the number of
    read tasks. Raises the earliest BadInputError (inputs in order, spans in file order)."""
    import ray

    planned = [t for p in paths for t in _plan_reads(p, split_bytes)]
    count = ray.remote(csv_span)
    ranges = [t for t in planned if not isinstance(t, ReadTask)]
    counted = iter(ray.get([count.remote(file, a, b) for _, file, a, b in ranges]))
    tasks: list[ReadTask] = []
    lines: dict[str, int] = {}  # newlines before the next span of each split file
    for t in planned:
        if isinstance(t, ReadTask):
            tasks.append(t)
            continue
        path, file, _, _ = t
        start, end, newlines = next(counted)
        before = lines.get(file, 0)
        tasks.append(ReadTask(path, file, Span(start, end, before + 1)))
        lines[file] = before + newlines
    read = ray.remote(_read_span)
    reports = ray.get([read.remote(t, lenient, out_dir, i) for i, t in enumerate(tasks)])
    for r in reports:
        if "error" in r:
            raise BadInputError(*r["error"])
    for file in lines:  # a split file's spans may each be empty; the file as a whole must not be
        if not sum(r["rows_read"] for t, r in zip(tasks, reports) if t.file == file):
            raise BadInputError(file, None, None, "file has no data rows")
    return _merge_reports(reports, ", ".join(open_raw(p).report.source for p in paths)), len(tasks)


# --------------------------------------------------------------------------------------------- stage 2


def _block_counts(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Partial counts of one block as rows (kind 0: user a; kind 1: item a with category b)."""
    users, n_u = np.unique(batch["user_id"], return_counts=True)
    pairs, n_p = np.unique(np.stack([batch["item_id"], batch["category_id"]], axis=1), axis=0, return_counts=True)
    return {
        "kind": np.r_[np.zeros(len(users), np.int8), np.ones(len(pairs), np.int8)],
        "a": np.r_[users, pairs[:, 0]].astype(np.int64),
        "b": np.r_[np.zeros(len(users), np.int64), pairs[:, 1]].astype(np.int64),
        "n": np.r_[n_u, n_p].astype(np.int64),
    }


def maps_from_counts(kind: np.ndarray, a: np.ndarray, b: np.ndarray, n: np.ndarray) -> tuple[UserMaps, ItemMaps]:
    """The id maps from reduced counts: one row per user (kind 0: user a, n events) and per (item a,
    category b) pair (kind 1), in any order. Equal to `recsys.data.prepare.densify`'s."""
    u, p = kind == 0, kind == 1
    order = np.argsort(a[u], kind="stable")
    user_ids, user_counts = a[u][order], n[u][order]
    order = np.lexsort((b[p], a[p]))  # by item, then category: the first pair of an item has its smallest category
    items, cates, pair_counts = a[p][order], b[p][order], n[p][order]
    item_ids, first = np.unique(items, return_index=True)
    cate_ids = np.unique(cates)
    item_cate = np.r_[0, np.searchsorted(cate_ids, cates[first]) + 1].astype(np.int64)
    popularity = np.r_[0, np.add.reduceat(pair_counts, first) if len(first) else []].astype(np.int64)
    return (UserMaps(user_ids, user_counts),
            ItemMaps(item_ids, cate_ids, item_cate, popularity, len(items) - len(item_ids)))


def _maps_task(vocab_dir: str, *blocks: pa.Table) -> tuple[UserMaps, dict, ItemMaps]:
    """The id maps from the reduced count blocks, the vocabulary written into `vocab_dir`; -> the user maps,
    the item side's sizes, the item maps (three returns: the driver fetches the first two only)."""
    blocks = tuple(t for t in blocks if t.num_rows)  # an empty block may carry no columns
    cols = [np.concatenate([t.column(c).to_numpy() for t in blocks]).astype(np.int64) if blocks
            else np.zeros(0, np.int64) for c in ("kind", "a", "b", "sum(n)")]
    users, items = maps_from_counts(*cols)
    write_vocabulary(Vocabulary(items.item_ids, items.cate_ids, items.item_cate), Path(vocab_dir))
    sizes = {"n_items": len(items.item_ids), "n_categories": len(items.cate_ids), "cate_conflicts": items.cate_conflicts}
    return users, sizes, items


def id_maps(events_ds, num_partitions: int, vocab_dir: str
            ) -> tuple[UserMaps, dict, ray.ObjectRef]:
    """Dense id maps of a Ray dataset of RAW_SCHEMA events: block partial counts summed per key by a
    distributed groupby, sorted into the maps by one task that also writes the vocabulary into `vocab_dir`.
    -> (UserMaps, the item side's sizes, an ObjectRef of the ItemMaps): the driver receives no item data."""
    import ray

    reduced = (events_ds.map_batches(_block_counts, batch_format="numpy", batch_size=None)
               .groupby(["kind", "a", "b"], num_partitions=num_partitions).sum("n"))
    users, sizes, items = ray.remote(num_returns=3)(_maps_task).remote(vocab_dir, *reduced.to_arrow_refs())
    return ray.get(users), ray.get(sizes), items


def user_ranges(user_counts: np.ndarray, n_ranges: int) -> np.ndarray:
    """[P + 1] dense-user boundaries of about `n_ranges` contiguous ranges with about equal events."""
    ends = np.cumsum(user_counts)
    n_parts = max(1, min(int(n_ranges), len(user_counts)))
    cuts = np.searchsorted(ends, np.arange(1, n_parts) * (ends[-1] / n_parts), side="left") + 1
    return np.unique(np.r_[0, cuts, len(user_counts)])


def range_count(n_events: int, partition_events: int, cpus: float) -> int:
    """User ranges: enough that none holds more than about `partition_events` events, and at least one per
    CPU of the cluster so every CPU has a range to work on."""
    return max(int(np.ceil(n_events / partition_events)), int(cpus), 1)


# --------------------------------------------------------------------------------------------- stage 3


def _dense(user_ids: np.ndarray, maps: ItemMaps, batch: dict[str, np.ndarray]) -> DenseEvents:
    """One user range's events in dataset order, with the global dense ids (prepare.densify's order:
    user, ts, original item id)."""
    user = np.searchsorted(user_ids, batch["user_id"])
    item = np.searchsorted(maps.item_ids, batch["item_id"]) + 1
    order = np.lexsort((batch["item_id"], batch["ts"], user))
    user, item, ts_ms = user[order], item[order], batch["ts"][order]
    lo = int(user[0])
    counts = np.bincount(user - lo)
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    pos = np.arange(len(user), dtype=np.int64) - offsets[user - lo]
    return DenseEvents(user, pos, item, maps.item_cate[item], np.floor_divide(ts_ms, 1000), offsets,
                       user_ids, maps.item_ids, maps.cate_ids, maps.item_cate, maps.cate_conflicts)


def _write_part(table: pa.Table, path: str) -> dict:
    """Write one part file; -> its manifest entry (`recsys.data.manifest`), its row groups' user bounds from
    the sorted user column in hand and the written footer (no re-read of the data)."""
    pq.write_table(table, path)
    md = pq.ParquetFile(path).metadata
    user = table.column("user").to_numpy()
    groups, at = [], 0
    for g in range(md.num_row_groups):
        n = md.row_group(g).num_rows
        groups.append({"rows": n, "min_user": int(user[at]) if n else None, "max_user": int(user[at + n - 1]) if n else None})
        at += n
    return {"rows": table.num_rows, "min_user": int(user[0]) if len(user) else None,
            "max_user": int(user[-1]) if len(user) else None, "row_groups": groups}


def _process_range(batch: dict[str, np.ndarray], user_ids: np.ndarray, maps: ItemMaps, bounds: np.ndarray,
                   cfg: SplitConfig, seed: int, out_dir: str) -> dict:
    """Everything per user for one range: writes its part of the events and of each split; returns (as JSON)
    the part files' manifest entries and its users' rows per split."""
    part = int(batch["part"][0])
    lo, hi = int(bounds[part]), int(bounds[part + 1])
    ev = _dense(user_ids, maps, batch)
    if int(ev.user[0]) != lo or int(ev.user[-1]) != hi - 1 or len(ev.offsets) - 1 != hi - lo:
        raise RuntimeError(f"user range {part} ({lo}..{hi - 1}) got users {int(ev.user[0])}..{int(ev.user[-1])}")
    name = part_name(part)
    entries = {f"events/{name}": _write_part(pa.Table.from_arrays([
        pa.array(ev.user.astype(np.int32)), pa.array(ev.pos.astype(np.int32)), pa.array(ev.item.astype(np.int32)),
        pa.array(ev.cate.astype(np.int32)), pa.array(ev.ts)], schema=DATASET_EVENTS_SCHEMA),
        os.path.join(out_dir, "events", name))}
    keys = user_item_keys(ev.user, ev.item, len(maps.item_ids))  # membership is per user: the range's pairs suffice
    which = split_of_events(ev.offsets, cfg)
    user_rows = {}
    for s, split in enumerate(SPLITS):
        t = split_rows(ev, which, s, keys, maps.popularity, cfg.negatives, seed)
        entries[f"{split}/{name}"] = _write_part(t, os.path.join(out_dir, split, name))
        user_rows[split] = np.bincount(t.column("user").to_numpy() - lo, minlength=hi - lo).tolist()
    return {"part": np.array([part]), "info": np.array([json.dumps({"entries": entries, "user_rows": user_rows})])}


def _range_fn(user_ids_ref, maps_ref, bounds_ref, cfg: SplitConfig, seed: int, out_dir: str):
    """The map_groups callable; the global maps travel once through the object store."""

    def process_range(batch: dict[str, np.ndarray]) -> dict:
        import ray

        return _process_range(batch, ray.get(user_ids_ref), ray.get(maps_ref), ray.get(bounds_ref), cfg, seed,
                              out_dir)

    return process_range


def _tag_fn(user_ids_ref, bounds_ref):
    def tag(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import ray

        dense_user = np.searchsorted(ray.get(user_ids_ref), batch["user_id"])
        batch["part"] = (np.searchsorted(ray.get(bounds_ref), dense_user, side="right") - 1).astype(np.int32)
        return batch

    return tag


# --------------------------------------------------------------------------------------------- stage 4


def _swap_in(tmp: Path, out: Path) -> None:
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def run_preprocess(
    inputs: list[str | Path] | str | Path,
    out_dir: str | Path,
    *,
    seed: int = 0,
    lenient: bool = False,
    split: SplitConfig | None = None,
    partition_events: int = TARGET_PARTITION_EVENTS,
    address: str | None = None,
    num_cpus: int | None = None,
    split_bytes: int = SPLIT_BYTES,
) -> dict:
    """Raw log files (MovieLens folder, Taobao CSV, our events Parquet; format from the path as in
    `recsys.data.raw.open_raw`) -> dataset folder `out_dir` (replaced) in the part-file layout. Returns the
    meta dict (the same keys as `recsys.data.prepare.prepare`'s, plus `ray`: partitions, read tasks and the
    rows of counts the driver received, one per user), whose `load_report` counts bad rows. `address`: an
    existing Ray cluster (else a local one); the input and output paths must be reachable from every node."""
    import ray

    from pipelines.runtime import ray_session

    paths = [str(p) for p in ([inputs] if isinstance(inputs, (str, Path)) else inputs)]
    if not paths:
        raise ValueError("run_preprocess: no input files")
    if split_bytes < 1 or partition_events < 1:
        raise ValueError(f"run_preprocess: split_bytes {split_bytes} and partition_events {partition_events} must be >= 1")
    cfg = split or SplitConfig()
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    raw_dir, final = work / "normalised", work / "dataset"
    for d in [raw_dir] + [final / name for name in DATA]:
        d.mkdir(parents=True)
    try:
        with ray_session(address=address, num_cpus=num_cpus) as res:
            report, read_tasks = read_inputs(paths, lenient, str(raw_dir), split_bytes)
            if report["rows_kept"] == 0:
                raise ValueError(f"{report['source']}: no events to prepare")
            events = ray.data.read_parquet(str(raw_dir), schema=RAW_SCHEMA)
            n_ranges = range_count(report["rows_kept"], partition_events, res.cpus)
            users, sizes, items_ref = id_maps(events, n_ranges, str(final))
            bounds = user_ranges(users.user_counts, n_ranges)
            n_parts = len(bounds) - 1
            bounds_ref, user_ids_ref = ray.put(bounds), ray.put(users.user_ids)
            fn = _range_fn(user_ids_ref, items_ref, bounds_ref, cfg, seed, str(final))
            done = (events.map_batches(_tag_fn(user_ids_ref, bounds_ref), batch_format="numpy")
                    .groupby("part", num_partitions=n_parts)
                    .map_groups(fn, batch_format="numpy")
                    .take_all())
        infos = {int(r["part"]): json.loads(str(r["info"])) for r in done}
        if sorted(infos) != list(range(n_parts)):
            raise RuntimeError(f"preprocessing: user ranges {sorted(set(range(n_parts)) - set(infos))} reported nothing")
        entries = {k: e for p in range(n_parts) for k, e in infos[p]["entries"].items()}
        user_rows = {"events": users.user_counts} | {
            s: np.concatenate([np.asarray(infos[p]["user_rows"][s], np.int64) for p in range(n_parts)]) for s in SPLITS}
        rows = {s: int(user_rows[s].sum()) for s in SPLITS}
        lengths = users.user_counts
        meta = {
            "format": FORMAT,
            "source": report["source"],
            "seed": seed,
            "split": cfg.model_dump(),
            "ts_unit": "s",
            "n_users": int(len(users.user_ids)),
            "n_items": int(sizes["n_items"]),
            "n_categories": int(sizes["n_categories"]),
            "n_events": int(lengths.sum()),
            "history_length": {"mean": float(lengths.mean()), "max": int(lengths.max())},
            "rows": rows,
            "item_category_conflicts": int(sizes["cate_conflicts"]),
            "load_report": report,
            "ray": {"partitions": n_parts, "read_tasks": read_tasks, "driver_rows": int(len(users.user_ids))},
        }
        (final / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        save_manifest(final, entries, user_rows)
        _swap_in(final, out)
        return meta
    finally:
        shutil.rmtree(work, ignore_errors=True)
