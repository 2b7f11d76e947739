"""Distributed preprocessing on Ray: raw logs -> a dataset folder identical to `recsys.data.prepare`'s.

Stages (nothing ever holds the whole log in Python objects; every array below is bounded by a block or a
user partition, except the id maps, which are O(users + items)):
1. read: one Ray task per input file runs the project's streaming raw loader (`recsys.data.raw.open_raw`,
   same validation, same per-line errors, same lenient counting) and writes the four columns
   preprocessing needs as Parquet parts; it returns its `LoadReport`, so bad rows are counted, merged
   and reported, never lost.
2. id maps (Ray Data): per-block partial counts of users and (item, category) pairs, merged on the driver
   into the dense id maps, each item's category (smallest seen) and item popularity.
3. per-user work (Ray Data): events are assigned to contiguous dense-user ranges balanced by event count,
   shuffled by range (`groupby().map_groups`), and each range is sorted, numbered, split and given its
   negatives with the pure functions of `recsys.data.prepare`. Negatives depend only on (seed, user, pos),
   so they equal the single-process draw whatever the partitioning.
4. commit: range outputs are concatenated in user order into the dataset files (one row group per range),
   with the manifest (`recsys.data.manifest`: rows and user bounds per file and row group, rows per user),
   inside a fresh temporary folder that then replaces `out_dir`: re-running overwrites, never appends.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recsys.config.data import SplitConfig
from recsys.data.manifest import write_manifest
from recsys.data.prepare import (
    FORMAT,
    DenseEvents,
    split_of_events,
    split_rows,
    user_item_keys,
    write_vocabulary,
)
from recsys.data.raw import open_raw
from recsys.data.report import BadInputError, LoadReport
from recsys.data.schemas import DATASET_EVENTS_SCHEMA, SPLIT_SCHEMA, SPLITS
from recsys.vocab import Vocabulary

RAW_COLUMNS = ("user_id", "item_id", "category_id", "ts")
RAW_SCHEMA = pa.schema([pa.field(c, pa.int64()) for c in RAW_COLUMNS])
TARGET_PARTITION_EVENTS = 2_000_000  # events per user range: a few hundred MB of numpy at most


@dataclass(frozen=True)
class IdMaps:
    """Global inputs of the per-user stage (the only global state of preprocessing)."""

    user_ids: np.ndarray    # [U] sorted original user ids; dense user = index
    user_counts: np.ndarray  # [U] events per user
    item_ids: np.ndarray    # [I] sorted original item ids; dense item = index + 1
    cate_ids: np.ndarray    # [C] sorted original category ids; dense category = index + 1
    item_cate: np.ndarray   # [I + 1] dense category of each dense item (smallest seen), 0 for padding
    popularity: np.ndarray  # [I + 1] events per dense item
    cate_conflicts: int


# --------------------------------------------------------------------------------------------- stage 1


def _read_file(path: str, lenient: bool, out_dir: str, index: int) -> dict:
    """-> the file's LoadReport as a dict, or {"error": BadInputError fields} (the exception itself does
    not survive Ray's pickling, and the driver re-raises it with its file/row/column intact)."""
    stream = open_raw(path, lenient=lenient)
    writer = None
    try:
        for batch in stream:
            table = pa.Table.from_batches([batch]).select(list(RAW_COLUMNS)).cast(RAW_SCHEMA)
            if writer is None:
                writer = pq.ParquetWriter(os.path.join(out_dir, f"part-{index:05d}.parquet"), RAW_SCHEMA)
            writer.write_table(table)
    except BadInputError as e:
        return {"error": [e.file, e.row, e.column, e.reason, e.value]}
    finally:
        if writer is not None:
            writer.close()
    return stream.report.to_dict()


def _merge_reports(reports: list[dict]) -> dict:
    total = LoadReport(source=", ".join(r["source"] for r in reports))
    for r in reports:
        part = LoadReport(r["source"], r["rows_read"], r["rows_kept"], examples=list(r["examples"]))
        part.skipped.update(r["skipped"])
        part.filtered.update(r["filtered"])
        total.merge(part)
    return total.to_dict()


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


def _reduce(keys: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum `counts` per unique row of `keys` ([R] or [R, 2]); keys come back sorted."""
    uniq, inv = np.unique(keys, axis=0, return_inverse=True)
    return uniq, np.bincount(inv.reshape(-1), weights=counts, minlength=len(uniq)).astype(np.int64)


def id_maps(events_ds) -> IdMaps:
    """Dense id maps of a Ray dataset of RAW_SCHEMA events, equal to `recsys.data.prepare.densify`'s."""
    users = [np.zeros(0, np.int64)] * 2
    pairs = [np.zeros((0, 2), np.int64), np.zeros(0, np.int64)]
    pending: list[dict] = []

    def fold() -> None:
        nonlocal users, pairs
        kind = np.concatenate([p["kind"] for p in pending])
        a = np.concatenate([p["a"] for p in pending])
        b = np.concatenate([p["b"] for p in pending])
        n = np.concatenate([p["n"] for p in pending])
        u, p = kind == 0, kind == 1
        users = list(_reduce(np.r_[users[0], a[u]], np.r_[users[1], n[u]]))
        pairs = list(_reduce(np.r_[pairs[0], np.stack([a[p], b[p]], axis=1)], np.r_[pairs[1], n[p]]))
        pending.clear()

    partial = events_ds.map_batches(_block_counts, batch_format="numpy", batch_size=None)
    for batch in partial.iter_batches(batch_format="numpy", batch_size=None):
        pending.append(batch)
        if sum(len(p["a"]) for p in pending) > 4_000_000:
            fold()
    if pending:
        fold()
    (pair_keys, pair_counts), (user_ids, user_counts) = pairs, users
    item_ids, first = np.unique(pair_keys[:, 0], return_index=True)  # pairs are sorted: first = smallest category
    cate_ids = np.unique(pair_keys[:, 1])
    item_cate = np.r_[0, np.searchsorted(cate_ids, pair_keys[first, 1]) + 1].astype(np.int64)
    popularity = np.r_[0, np.add.reduceat(pair_counts, first) if len(first) else []].astype(np.int64)
    return IdMaps(user_ids, user_counts, item_ids, cate_ids, item_cate, popularity, len(pair_keys) - len(item_ids))


def user_ranges(user_counts: np.ndarray, target_events: int) -> np.ndarray:
    """[P + 1] dense-user boundaries of contiguous ranges holding about `target_events` events each."""
    ends = np.cumsum(user_counts)
    n_parts = max(1, int(np.ceil(ends[-1] / target_events)))
    cuts = np.searchsorted(ends, np.arange(1, n_parts) * (ends[-1] / n_parts), side="left") + 1
    return np.unique(np.r_[0, cuts, len(user_counts)])


# --------------------------------------------------------------------------------------------- stage 3


def _dense(maps: IdMaps, batch: dict[str, np.ndarray]) -> DenseEvents:
    """One user range's events in dataset order, with the global dense ids (prepare.densify's order:
    user, ts, original item id)."""
    user = np.searchsorted(maps.user_ids, batch["user_id"])
    item = np.searchsorted(maps.item_ids, batch["item_id"]) + 1
    order = np.lexsort((batch["item_id"], batch["ts"], user))
    user, item, ts_ms = user[order], item[order], batch["ts"][order]
    lo = int(user[0])
    counts = np.bincount(user - lo)
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    pos = np.arange(len(user), dtype=np.int64) - offsets[user - lo]
    return DenseEvents(user, pos, item, maps.item_cate[item], np.floor_divide(ts_ms, 1000), offsets,
                       maps.user_ids, maps.item_ids, maps.cate_ids, maps.item_cate, maps.cate_conflicts)


def _process_range(batch: dict[str, np.ndarray], maps: IdMaps, cfg: SplitConfig, seed: int, parts_dir: str) -> dict:
    """Everything per user for one range: writes its events and split rows, returns its row counts."""
    part = int(batch["part"][0])
    ev = _dense(maps, batch)
    name = f"part-{part:05d}.parquet"
    pq.write_table(pa.Table.from_arrays([
        pa.array(ev.user.astype(np.int32)), pa.array(ev.pos.astype(np.int32)), pa.array(ev.item.astype(np.int32)),
        pa.array(ev.cate.astype(np.int32)), pa.array(ev.ts)], schema=DATASET_EVENTS_SCHEMA),
        os.path.join(parts_dir, "events", name))
    keys = user_item_keys(ev.user, ev.item, len(maps.item_ids))  # membership is per user: the range's pairs suffice
    which = split_of_events(ev.offsets, cfg)
    rows = {}
    for s, split in enumerate(SPLITS):
        t = split_rows(ev, which, s, keys, maps.popularity, cfg.negatives, seed)
        pq.write_table(t, os.path.join(parts_dir, split, name))
        rows[split] = np.array([t.num_rows], np.int64)
    return {"part": np.array([part]), **rows}


def _range_fn(maps_ref, cfg: SplitConfig, seed: int, parts_dir: str):
    """The map_groups callable; the global maps travel once through the object store."""

    def process_range(batch: dict[str, np.ndarray]) -> dict:
        import ray

        return _process_range(batch, ray.get(maps_ref), cfg, seed, parts_dir)

    return process_range


# --------------------------------------------------------------------------------------------- stage 4


def _concat_parts(folder: Path, schema: pa.Schema, n_parts: int, dest: Path) -> None:
    with pq.ParquetWriter(dest, schema) as writer:
        for p in range(n_parts):
            path = folder / f"part-{p:05d}.parquet"
            if path.is_file():  # a range can hold no events only if it does not exist; keep order regardless
                writer.write_table(pq.read_table(path, schema=schema))


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
) -> dict:
    """Raw log files (MovieLens folder, Taobao CSV, our events Parquet; format from the path as in
    `recsys.data.raw.open_raw`) -> dataset folder `out_dir` (replaced). Returns the meta dict (the same
    keys as `recsys.data.prepare.prepare`'s, plus `partitions`), whose `load_report` counts bad rows."""
    import ray

    from pipelines.runtime import ray_session

    paths = [str(p) for p in ([inputs] if isinstance(inputs, (str, Path)) else inputs)]
    if not paths:
        raise ValueError("run_preprocess: no input files")
    cfg = split or SplitConfig()
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    raw_dir, parts_dir = work / "normalised", work / "parts"
    for d in [raw_dir] + [parts_dir / s for s in ("events", *SPLITS)]:
        d.mkdir(parents=True)
    try:
        with ray_session(address=address, num_cpus=num_cpus):
            read = ray.remote(_read_file)
            reports = ray.get([read.remote(p, lenient, str(raw_dir), i) for i, p in enumerate(paths)])
            for r in reports:
                if "error" in r:
                    raise BadInputError(*r["error"])
            report = _merge_reports(reports)
            if report["rows_kept"] == 0:
                raise ValueError(f"{report['source']}: no events to prepare")
            events = ray.data.read_parquet(str(raw_dir), schema=RAW_SCHEMA)
            maps = id_maps(events)
            bounds = user_ranges(maps.user_counts, partition_events)

            user_ids = maps.user_ids

            def tag(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
                dense_user = np.searchsorted(user_ids, batch["user_id"])
                batch["part"] = (np.searchsorted(bounds, dense_user, side="right") - 1).astype(np.int32)
                return batch

            fn = _range_fn(ray.put(maps), cfg, seed, str(parts_dir))
            done = (events.map_batches(tag, batch_format="numpy")
                    .groupby("part", num_partitions=min(len(bounds) - 1, 64))
                    .map_groups(fn, batch_format="numpy")
                    .take_all())
        rows = {s: int(sum(int(r[s]) for r in done)) for s in SPLITS}
        n_parts = len(bounds) - 1
        final = work / "dataset"
        final.mkdir()
        _concat_parts(parts_dir / "events", DATASET_EVENTS_SCHEMA, n_parts, final / "events.parquet")
        for s in SPLITS:
            _concat_parts(parts_dir / s, SPLIT_SCHEMA, n_parts, final / f"{s}.parquet")
        lengths = maps.user_counts
        meta = {
            "format": FORMAT,
            "source": report["source"],
            "seed": seed,
            "split": cfg.model_dump(),
            "ts_unit": "s",
            "n_users": int(len(maps.user_ids)),
            "n_items": int(len(maps.item_ids)),
            "n_categories": int(len(maps.cate_ids)),
            "n_events": int(lengths.sum()),
            "history_length": {"mean": float(lengths.mean()), "max": int(lengths.max())},
            "rows": rows,
            "item_category_conflicts": int(maps.cate_conflicts),
            "load_report": report,
            "partitions": n_parts,
        }
        write_vocabulary(Vocabulary(maps.item_ids, maps.cate_ids, maps.item_cate), final)
        (final / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        write_manifest(final)
        _swap_in(final, out)
        return meta
    finally:
        shutil.rmtree(work, ignore_errors=True)
