"""Single-process preprocessing: normalised raw events -> a dataset folder in the fixed-benchmark format.

Protocol (../shared/benchmarks/README.md): dense ids (users from 0 in original-id order, items and
categories from 1 in original-id order, 0 = padding); each user's events sorted by (ts, original item id)
and numbered `pos` from 0; per user, the last `test_frac` of events (rounded half-to-even, at least 1) are
test targets, the `val_frac` before them validation targets, the rest training targets, and positions below
`min_history` are never targets; each positive comes with `negatives` items drawn by popularity (event
count) among items the user never interacted with, distinct within the row.

Every step is a pure function over numpy arrays, and the only global inputs are the id maps and the item
popularity. Negatives come from a counter-based hash of (seed, user, pos, slot, attempt), not from a shared
random stream, so a per-user-partition implementation (the Ray pipeline) draws exactly the same rows.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recsys.config.data import SplitConfig
from recsys.data.layout import remove_parts
from recsys.data.manifest import FILE as MANIFEST
from recsys.data.manifest import write_manifest
from recsys.data.raw import EventStream
from recsys.data.schemas import DATASET_EVENTS_SCHEMA, SPLIT_SCHEMA, SPLITS
from recsys.vocab import FILE as VOCAB_FILE
from recsys.vocab import Vocabulary

FORMAT = "recsys-dataset/1"
MAX_REJECTION_ROUNDS = 64


# ------------------------------------------------------------------------------------------- pure steps


@dataclass
class DenseEvents:
    """Events in dataset order (user, then pos) with dense ids."""

    user: np.ndarray        # [N] int64, 0..U-1
    pos: np.ndarray         # [N] int64
    item: np.ndarray        # [N] int64, 1..I
    cate: np.ndarray        # [N] int64, 1..C
    ts: np.ndarray          # [N] int64 seconds
    offsets: np.ndarray     # [U + 1] int64: user u is offsets[u]:offsets[u+1]
    user_ids: np.ndarray    # [U] original user id of each dense user
    item_ids: np.ndarray    # [I] original item id of dense item i + 1
    cate_ids: np.ndarray    # [C] original category id of dense category c + 1
    item_cate: np.ndarray   # [I + 1] dense category of each dense item (0 for padding)
    cate_conflicts: int     # extra (item, category) pairs: items seen with several categories (smallest id wins)


def densify(user_id: np.ndarray, item_id: np.ndarray, category_id: np.ndarray, ts_ms: np.ndarray) -> DenseEvents:
    """Dense ids in original-id order, then sort by (user, ts, original item id)."""
    user_ids, user = np.unique(user_id, return_inverse=True)
    item_ids, item = np.unique(item_id, return_inverse=True)
    cate_ids, cate = np.unique(category_id, return_inverse=True)
    item, cate = item + 1, cate + 1
    # An item's category is a property of the item: the smallest category it was seen with.
    item_cate = np.full(len(item_ids) + 1, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(item_cate, item, cate)
    item_cate[0] = 0
    cate_conflicts = len(np.unique(item * (len(cate_ids) + 1) + cate)) - len(item_ids)
    order = np.lexsort((item_id, ts_ms, user))
    user, item = user[order], item[order]
    counts = np.bincount(user, minlength=len(user_ids))
    offsets = np.zeros(len(user_ids) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    pos = np.arange(len(user), dtype=np.int64) - offsets[user]
    return DenseEvents(user, pos, item, item_cate[item], np.floor_divide(ts_ms[order], 1000), offsets,
                       user_ids, item_ids, cate_ids, item_cate, cate_conflicts)


def split_of_events(offsets: np.ndarray, cfg: SplitConfig) -> np.ndarray:
    """[N] int8 per event in dataset order: 0 train / 1 val / 2 test target, -1 not a target."""
    n = np.diff(offsets)
    n_test = np.maximum(1, np.round(cfg.test_frac * n)).astype(np.int64)
    n_val = np.maximum(1, np.round(cfg.val_frac * n)).astype(np.int64) if cfg.val_frac > 0 else np.zeros_like(n)
    user = np.repeat(np.arange(len(n)), n)
    pos = np.arange(offsets[-1]) - offsets[user]
    from_end = n[user] - pos  # 1 = the user's last event
    split = np.where(from_end <= n_test[user], 2, np.where(from_end <= n_test[user] + n_val[user], 1, 0))
    split = split.astype(np.int8)
    split[pos < cfg.min_history] = -1
    return split


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a bijective hash of uint64 (wrapping arithmetic is intended)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def counter_uniform(seed: int, user: np.ndarray, pos: np.ndarray, stream: int) -> np.ndarray:
    """A uniform in [0, 1) per (seed, user, pos, stream), independent of how rows are partitioned."""
    with np.errstate(over="ignore"):
        h = _mix(np.full(len(user), seed, dtype=np.uint64) ^ _mix(user.astype(np.uint64)))
        h = _mix(h ^ pos.astype(np.uint64))
        h = _mix(h ^ np.uint64(stream))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def user_item_keys(user: np.ndarray, item: np.ndarray, n_items: int) -> np.ndarray:
    """Sorted unique (user, item) pairs as int64 keys, for membership tests."""
    return np.unique(user.astype(np.int64) * (n_items + 1) + item)


def _member(keys: np.ndarray, q: np.ndarray) -> np.ndarray:
    at = np.minimum(np.searchsorted(keys, q), len(keys) - 1)
    return keys[at] == q


def sample_negatives(user: np.ndarray, pos: np.ndarray, keys: np.ndarray, popularity: np.ndarray,
                     n_neg: int, seed: int) -> np.ndarray:
    """[R, n_neg] items drawn with probability proportional to `popularity` ([I + 1], index 0 unused) among
    items the user never interacted with (`keys` from user_item_keys), distinct within a row. Rejection
    sampling, vectorised over rows; the rare rows still open after MAX_REJECTION_ROUNDS draw exactly from
    the allowed items."""
    n_items = len(popularity) - 1
    cum = np.cumsum(popularity[1:].astype(np.float64))
    out = np.zeros((len(user), n_neg), dtype=np.int64)
    for slot in range(n_neg):
        open_ = np.arange(len(user))
        for attempt in range(MAX_REJECTION_ROUNDS):
            if not len(open_):
                break
            u = counter_uniform(seed, user[open_], pos[open_], slot * MAX_REJECTION_ROUNDS + attempt)
            cand = np.minimum(np.searchsorted(cum, u * cum[-1], side="right"), n_items - 1) + 1
            ok = ~_member(keys, user[open_] * (n_items + 1) + cand)
            ok &= (out[open_, :slot] != cand[:, None]).all(axis=1)
            out[open_[ok], slot] = cand[ok]
            open_ = open_[~ok]
        for r in open_:  # users who interacted with most of the popular mass: exact draw
            lo, hi = np.searchsorted(keys, [user[r] * (n_items + 1), (user[r] + 1) * (n_items + 1)])
            weight = popularity[1:].astype(np.float64).copy()
            weight[keys[lo:hi] - user[r] * (n_items + 1) - 1] = 0
            weight[out[r, :slot] - 1] = 0
            if weight.sum() <= 0:
                raise ValueError(f"user {user[r]}: fewer than {n_neg} items left to draw negatives from")
            u = counter_uniform(seed, user[r : r + 1], pos[r : r + 1], (slot + 1) * MAX_REJECTION_ROUNDS - 1)[0]
            c = np.cumsum(weight)
            out[r, slot] = min(int(np.searchsorted(c, u * c[-1], side="right")), n_items - 1) + 1
    return out


def split_rows(ev: DenseEvents, split: np.ndarray, which: int, keys: np.ndarray, popularity: np.ndarray,
               n_neg: int, seed: int) -> pa.Table:
    """One split's rows: per target, the positive then its negatives, in (user, pos) order."""
    idx = np.flatnonzero(split == which)
    user, pos = ev.user[idx], ev.pos[idx]
    items = np.concatenate([ev.item[idx, None], sample_negatives(user, pos, keys, popularity, n_neg, seed)], axis=1)
    labels = np.zeros_like(items, dtype=np.int8)
    labels[:, 0] = 1
    k = n_neg + 1
    items = items.ravel()
    return pa.Table.from_arrays([
        pa.array(np.repeat(user, k).astype(np.int32)), pa.array(np.repeat(pos, k).astype(np.int32)),
        pa.array(items.astype(np.int32)), pa.array(ev.item_cate[items].astype(np.int32)), pa.array(labels.ravel()),
    ], schema=SPLIT_SCHEMA)


# -------------------------------------------------------------------------------------------- the job


def collect(batches: Iterable[pa.RecordBatch]) -> dict[str, np.ndarray]:
    """The four columns preprocessing needs (event ids and actions are not part of the benchmark format)."""
    cols = ("user_id", "item_id", "category_id", "ts")
    parts: dict[str, list[np.ndarray]] = {c: [] for c in cols}
    for b in batches:
        for c in cols:
            parts[c].append(b.column(c).to_numpy())
    return {c: np.concatenate(v) if v else np.zeros(0, np.int64) for c, v in parts.items()}


def write_table(table: pa.Table, path: Path) -> None:
    """Replace `path` atomically: a half-written file never sits under the final name."""
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def write_vocabulary(vocab: Vocabulary, out: Path) -> None:
    """The raw -> dense id maps beside the dense events (serving maps catalogue ids with them), atomically."""
    tmp = out / (VOCAB_FILE + ".tmp")
    vocab.save(tmp)
    os.replace(tmp, out / VOCAB_FILE)


def prepare(events: EventStream | Iterable[pa.RecordBatch], out_dir: str | Path, *, seed: int = 0,
            split: SplitConfig | None = None, source: str | None = None) -> dict:
    """Write events.parquet, train/val/test.parquet, vocab.safetensors, meta.json and the manifest
    (`recsys.data.manifest`) into `out_dir` (files replaced, never appended). Returns the meta dict."""
    cfg = split or SplitConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # files are replaced one by one: an old manifest must not outlive them
    remove_parts(out, ("events", *SPLITS))
    cols = collect(events)
    report = events.report if isinstance(events, EventStream) else None
    if not len(cols["user_id"]):
        raise ValueError(f"{source or report and report.source or 'events'}: no events to prepare")
    ev = densify(cols["user_id"], cols["item_id"], cols["category_id"], cols["ts"])
    del cols
    write_vocabulary(Vocabulary(ev.item_ids, ev.cate_ids, ev.item_cate), out)
    n_items = len(ev.item_ids)
    write_table(pa.Table.from_arrays([
        pa.array(ev.user.astype(np.int32)), pa.array(ev.pos.astype(np.int32)), pa.array(ev.item.astype(np.int32)),
        pa.array(ev.cate.astype(np.int32)), pa.array(ev.ts)], schema=DATASET_EVENTS_SCHEMA), out / "events.parquet")
    popularity = np.bincount(ev.item, minlength=n_items + 1)
    keys = user_item_keys(ev.user, ev.item, n_items)
    which = split_of_events(ev.offsets, cfg)
    rows = {}
    for s, name in enumerate(SPLITS):
        t = split_rows(ev, which, s, keys, popularity, cfg.negatives, seed)
        write_table(t, out / f"{name}.parquet")
        rows[name] = t.num_rows
    lengths = np.diff(ev.offsets)
    meta = {
        "format": FORMAT,
        "source": source or (report.source if report else "events"),
        "seed": seed,
        "split": cfg.model_dump(),
        "ts_unit": "s",
        "n_users": int(len(ev.user_ids)),
        "n_items": n_items,
        "n_categories": int(len(ev.cate_ids)),
        "n_events": int(len(ev.user)),
        "history_length": {"mean": float(lengths.mean()), "max": int(lengths.max())},
        "rows": rows,
        "item_category_conflicts": ev.cate_conflicts,
        "load_report": report.to_dict() if report else None,
    }
    tmp = out / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, out / "meta.json")
    write_manifest(out)
    return meta
