"""Reports on data: what a loader read, kept, skipped and filtered (nothing leaves a load without being
counted), and the statistics of a dataset folder."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq

from recsys.data.layout import data_files, has_data


class BadInputError(ValueError):
    """A raw input is malformed; the message names the file, the row (1-based line or row number) and the column."""

    def __init__(self, file: str, row: int | None, column: str | None, reason: str, value: str | None = None):
        self.file, self.row, self.column, self.reason, self.value = file, row, column, reason, value
        where = [file]
        if row is not None:
            where.append(f"row {row}")
        if column is not None:
            where.append(f"column {column!r}")
        shown = "" if value is None else f" (value {value[:60]!r})"
        super().__init__(f"{', '.join(where)}: {reason}{shown}")


@dataclass
class LoadReport:
    """Counts of one load. `skipped`: bad rows dropped under `lenient=True`, per reason;
    `filtered`: valid rows dropped by a documented rule (e.g. Taobao's time window), per rule.
    rows_read = rows_kept + sum(skipped) + sum(filtered)."""

    source: str = ""
    rows_read: int = 0
    rows_kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    filtered: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)  # the first few skipped rows, as error messages

    MAX_EXAMPLES = 10

    def skip(self, reason: str, n: int, example: BadInputError | None = None) -> None:
        if n:
            self.skipped[reason] += int(n)
            if example is not None and len(self.examples) < self.MAX_EXAMPLES:
                self.examples.append(str(example))

    def filter(self, rule: str, n: int) -> None:
        if n:
            self.filtered[rule] += int(n)

    def merge(self, other: "LoadReport") -> None:
        self.rows_read += other.rows_read
        self.rows_kept += other.rows_kept
        self.skipped.update(other.skipped)
        self.filtered.update(other.filtered)
        self.examples.extend(other.examples[: max(0, self.MAX_EXAMPLES - len(self.examples))])

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def n_filtered(self) -> int:
        return sum(self.filtered.values())

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "rows_read": self.rows_read,
            "rows_kept": self.rows_kept,
            "skipped": dict(sorted(self.skipped.items())),
            "filtered": dict(sorted(self.filtered.items())),
            "examples": list(self.examples),
        }

    def __str__(self) -> str:
        lines = [f"{self.source}: read {self.rows_read:,} rows, kept {self.rows_kept:,}, "
                 f"skipped {self.n_skipped:,}, filtered {self.n_filtered:,}"]
        lines += [f"  skipped ({n:,}): {r}" for r, n in sorted(self.skipped.items())]
        lines += [f"  filtered ({n:,}): {r}" for r, n in sorted(self.filtered.items())]
        lines += [f"  e.g. {e}" for e in self.examples]
        return "\n".join(lines)


def _grow(a: np.ndarray, n: int) -> np.ndarray:
    return a if len(a) >= n else np.concatenate([a, np.zeros(n - len(a), dtype=a.dtype)])


def describe(folder: str | Path, batch_rows: int = 1 << 20) -> dict:
    """Statistics of a dataset folder (benchmark format), read in blocks: users, items and categories that
    occur, events, per-user history length mean/max, and rows / positive rows per split."""
    folder = Path(folder)
    per_user = np.zeros(0, np.int64)
    seen_item = np.zeros(0, bool)
    seen_cate = np.zeros(0, bool)
    events = data_files(folder, "events")
    for b in (b for f in events for b in pq.ParquetFile(f).iter_batches(batch_size=batch_rows, columns=["user", "item", "cate"])):
        user, item, cate = (b.column(c).to_numpy() for c in ("user", "item", "cate"))
        if not len(user):
            continue
        c = np.bincount(user)
        per_user = _grow(per_user, len(c))
        per_user[: len(c)] += c
        seen_item = _grow(seen_item, int(item.max()) + 1)
        seen_item[item] = True
        seen_cate = _grow(seen_cate, int(cate.max()) + 1)
        seen_cate[cate] = True
    lengths = per_user[per_user > 0]
    out = {
        "folder": str(folder),
        "users": int(len(lengths)),
        "items": int(seen_item.sum()),
        "categories": int(seen_cate.sum()),
        "events": int(lengths.sum()),
        "history_length": {"mean": round(float(lengths.mean()), 2) if len(lengths) else 0.0,
                           "max": int(lengths.max(initial=0))},
        "rows": {},
        "positive_rows": {},
    }
    for name in ("train", "val", "test"):
        if has_data(folder, name):
            files = data_files(folder, name)
            out["rows"][name] = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
            out["positive_rows"][name] = sum(int(pa.compute.sum(pq.read_table(f, columns=["label"]).column("label")).as_py() or 0)
                                             for f in files)
    meta = folder / "meta.json"
    if meta.is_file():
        m = json.loads(meta.read_text())
        out["source"] = m.get("source")
        if "far_positive_share" in m:
            out["far_positive_share"] = round(m["far_positive_share"], 4)
    return out
