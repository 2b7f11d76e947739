"""Streaming raw loaders: MovieLens, Taobao UserBehavior and our own Parquet events, to EVENT_SCHEMA batches.

Each loader returns an `EventStream`: iterate it to get `pyarrow.RecordBatch`es of normalised events, one
input block at a time, so memory is bounded by the block size, never by the file. CSV files are read as
whole lines (a delimiter that never occurs, no quoting) and split with arrow kernels, so every physical
line is one row and errors can name its exact 1-based line number, including rows with too few or too many
fields. Bad rows raise `BadInputError` (file, row, column) unless `lenient=True`, in which case they are
skipped and counted per reason in `stream.report`; valid rows dropped by a rule (Taobao's time window) and
blank lines are counted as `filtered`. An empty file, a wrong header or a wrong Parquet schema is always an
error: there is no row to skip.

A loader can read one `Span` of its file (distributed preprocessing splits large inputs over tasks): a CSV
byte range aligned to line starts, or a range of Parquet row groups, with the absolute 1-based line (row)
number of its first line (row), counted beforehand (`csv_span`), so errors name the same file and row as a
whole-file read and event ids stay unique.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from recsys.data.report import BadInputError, LoadReport
from recsys.data.schemas import EVENT_SCHEMA, TAOBAO_ACTIONS, Action

BLOCK_BYTES = 8 << 20

# Taobao UserBehavior covers 2017-11-25 .. 2017-12-03 in China time (UTC+8): [2017-11-25 00:00 UTC+8,
# 2017-12-04 00:00 UTC+8) = [2017-11-24 16:00 UTC, 2017-12-03 16:00 UTC), in Unix seconds.
TAOBAO_WINDOW_S = (1_511_539_200, 1_512_316_800)
TAOBAO_WINDOW_RULE = "ts outside 2017-11-25..2017-12-03 (UTC+8)"

_INT64_MAX = "9223372036854775807"
_MAX_TS_DIGITS = 15  # seconds; x1000 must still fit int64


@dataclass(frozen=True)
class Span:
    """Part of one input file: CSV bytes start..end-1 (both at line starts), or Parquet row groups
    start..end-1; `first_row`: the absolute 1-based line (row) number of its first line (row)."""

    start: int
    end: int
    first_row: int


def _line_start(f, offset: int, size: int) -> int:
    """The first line start at or after byte `offset` (the line holding byte offset - 1 belongs to the span
    before: each line is read by the span its first byte falls in)."""
    if offset <= 0 or offset >= size:
        return min(max(offset, 0), size)
    f.seek(offset - 1)
    f.readline()
    return f.tell()


def csv_span(path: str | Path, start: int, end: int, chunk: int = 16 << 20) -> tuple[int, int, int]:
    """Byte range start..end of a CSV file aligned to line starts -> (start, end, newlines in it). The line
    number of a span's first line is 1 + the newlines of every span before it."""
    size = Path(path).stat().st_size
    with open(path, "rb") as f:
        a, b = _line_start(f, start, size), _line_start(f, end, size)
    newlines = 0
    if b > a:
        with pa.memory_map(str(path)) as mm:  # counted in place, in chunks: no copy of the span in memory
            for at in range(a, b, chunk):
                newlines += int(np.count_nonzero(np.frombuffer(mm.read_at(min(chunk, b - at), at), np.uint8) == 10))
    return a, b, newlines


class EventStream:
    """An iterable of EVENT_SCHEMA record batches; `report` is filled while it is consumed."""

    def __init__(self, source: str, produce: Callable[[LoadReport], Iterator[pa.RecordBatch]]):
        self.report = LoadReport(source=source)
        self._produce = produce

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        self.report = LoadReport(source=self.report.source)
        yield from self._produce(self.report)

    def read_all(self) -> pa.Table:
        return pa.Table.from_batches(list(self), schema=EVENT_SCHEMA)


class _Rows:
    """Validation of one block: the first failed check of a row decides its reason. Strict mode raises,
    once all checks ran (`raise_first`), the error of the earliest bad row."""

    def __init__(self, file: str, first_row: int, n: int, lenient: bool, report: LoadReport):
        self.file, self.first_row, self.lenient, self.report = file, first_row, lenient, report
        self.bad = np.zeros(n, dtype=bool)
        self.first_error: BadInputError | None = None

    def flag(self, mask: np.ndarray, column: str | None, reason: str, values: pa.Array | None = None) -> None:
        new = mask & ~self.bad
        if not new.any():
            return
        i = int(np.argmax(new))
        value = None if values is None else str(values[i].as_py())
        err = BadInputError(self.file, self.first_row + i, column, reason, value)
        self.bad |= new
        if not self.lenient:
            if self.first_error is None or err.row < self.first_error.row:
                self.first_error = err
            return
        self.report.skip(f"{column}: {reason}" if column else reason, int(new.sum()), err)

    def raise_first(self) -> None:
        if self.first_error is not None:
            raise self.first_error


def _np(a: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return np.asarray(a.to_numpy(zero_copy_only=False))


def _int_column(rows: _Rows, name: str, s: pa.Array, what: str = "id", max_digits: int = 19) -> np.ndarray:
    """Parse decimal strings to int64, flagging non-integers, negatives and overflow."""
    digits = _np(pc.match_substring_regex(s, r"^[0-9]+$"))
    negative = _np(pc.match_substring_regex(s, r"^-[0-9]+$"))
    length = _np(pc.utf8_length(s))
    too_big = digits & ((length > max_digits) | ((length == 19) & _np(pc.greater(s, _INT64_MAX))))
    rows.flag(~digits & ~negative, name, f"not an integer {what}", s)
    rows.flag(negative, name, f"negative {what}", s)
    rows.flag(too_big, name, f"{what} overflows" + (" int64" if max_digits == 19 else ""), s)
    ok = pa.array(~rows.bad)
    return _np(pc.cast(pc.if_else(ok, s, "0"), pa.int64()))


def _ts_column(rows: _Rows, name: str, s: pa.Array) -> np.ndarray:
    """Unix seconds (integer) to milliseconds."""
    digits = _np(pc.match_substring_regex(s, r"^-?[0-9]+$"))
    rows.flag(~digits, name, "unparsable timestamp (expected integer Unix seconds)", s)
    negative = _np(pc.starts_with(s, "-"))
    rows.flag(negative, name, "negative timestamp", s)
    rows.flag(_np(pc.utf8_length(s)) > _MAX_TS_DIGITS, name, "timestamp out of range", s)
    return _np(pc.cast(pc.if_else(pa.array(~rows.bad), s, "0"), pa.int64())) * 1000


def _check_nonempty(path: Path) -> None:
    if not path.is_file():
        raise BadInputError(str(path), None, None, "file not found")
    if path.stat().st_size == 0:
        raise BadInputError(str(path), None, None, "file is empty")


def _check_header(path: Path, expected: list[str]) -> None:
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        got = next(csv.reader([f.readline()]), [])
    got = [c.strip() for c in got]
    for c in expected:
        if c not in got:
            raise BadInputError(str(path), 1, c, f"missing column (header has {got}, expected {expected})")
    for c in got:
        if c not in expected:
            raise BadInputError(str(path), 1, c, f"unexpected column (expected {expected})")
    if got != expected:
        raise BadInputError(str(path), 1, None, f"columns out of order: {got}, expected {expected}")


def _csv_blocks(path: Path, columns: list[str], header: bool, lenient: bool, report: LoadReport,
                block_bytes: int, span: Span | None = None) -> Iterator[tuple[_Rows, dict[str, pa.Array]]]:
    """Yield (row checker, column -> string field) per block; rows with a wrong field count are flagged,
    blank lines counted as filtered. `span`: only those lines (the header is skipped where the span starts
    at byte 0); a span may hold no rows (the caller checks the file as a whole)."""
    _check_nonempty(path)
    if header:
        _check_header(path, columns)
    source = path
    skip = 1 if header else 0
    line = 2 if header else 1
    if span is not None:
        if span.end <= span.start:
            return
        source = pa.BufferReader(pa.memory_map(str(path)).read_at(span.end - span.start, span.start))
        skip = skip if span.start == 0 else 0
        line = span.first_row + skip
    first_line = line
    reader = pacsv.open_csv(
        source,
        read_options=pacsv.ReadOptions(column_names=["line"], skip_rows=skip, block_size=block_bytes),
        parse_options=pacsv.ParseOptions(delimiter="\x01", quote_char=False, escape_char=False,
                                         ignore_empty_lines=False),
        convert_options=pacsv.ConvertOptions(column_types={"line": pa.string()}, strings_can_be_null=False),
    )
    for batch in reader:
        n = batch.num_rows
        lines = pc.utf8_rtrim(batch.column(0), characters="\r")
        rows = _Rows(str(path), line, n, lenient, report)
        line += n
        report.rows_read += n
        blank = _np(pc.equal(pc.utf8_length(lines), 0))
        report.filter("blank line", int(blank.sum()))
        rows.bad |= blank
        parts = pc.split_pattern(lines, ",")
        nfields = _np(pc.list_value_length(parts))
        expected = f"expected {len(columns)} ({', '.join(columns)})"
        rows.flag(nfields < len(columns), None, f"missing fields: {expected}", lines)
        rows.flag(nfields > len(columns), None, f"extra fields: {expected}", lines)
        # Rows with a wrong field count are already flagged; pad them so field extraction stays in bounds.
        parts = pc.if_else(pa.array(nfields == len(columns)), parts, pa.scalar([""] * len(columns), parts.type))
        fields = {c: pc.utf8_trim_whitespace(pc.list_element(parts, i)) for i, c in enumerate(columns)}
        for c, s in fields.items():
            rows.flag(_np(pc.equal(pc.utf8_length(s), 0)) & ~blank, c, "empty value", s)
        yield rows, fields
    if line == first_line and span is None:
        raise BadInputError(str(path), None, None, "file has no data rows")


def _event_ids(prefix: str, rows: _Rows, n: int) -> pa.Array:
    """`<file name>:<line>`: unique per source line, and says where the event came from."""
    lines = pa.array(np.arange(rows.first_row, rows.first_row + n, dtype=np.int64)).cast(pa.string())
    return pc.binary_join_element_wise(prefix, lines, ":")


def _emit(report: LoadReport, rows: _Rows, keep: np.ndarray, cols: dict[str, pa.Array | np.ndarray]
          ) -> pa.RecordBatch | None:
    rows.raise_first()
    report.rows_kept += int(keep.sum())
    if not keep.any():
        return None
    mask = pa.array(keep)
    arrays = [pc.filter(pa.array(cols[f.name]).cast(f.type), mask) for f in EVENT_SCHEMA]
    return pa.RecordBatch.from_arrays(arrays, schema=EVENT_SCHEMA)


# ---------------------------------------------------------------------------------------------- MovieLens

MOVIES_COLUMNS = ["movieId", "title", "genres"]
RATINGS_COLUMNS = ["userId", "movieId", "rating", "timestamp"]


def read_movie_genres(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """movies.csv -> (sorted movie ids, their category ids, category names). A movie's category is its first
    genre; category ids are 1-based indices into the sorted genre names. It is a dimension table (one row per
    movie), read whole with the csv module for exact line numbers of quoted titles. Always strict: a bad
    movie row would silently change the category of every rating of that movie."""
    _check_nonempty(path)
    _check_header(path, MOVIES_COLUMNS)
    ids, firsts = [], []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        next(reader)
        for row in reader:
            line = reader.line_num
            if len(row) != 3:
                raise BadInputError(str(path), line, None, f"expected 3 fields {MOVIES_COLUMNS}, got {len(row)}")
            mid, genres = row[0].strip(), row[2].strip()
            if not mid.isdigit() or len(mid) > 18:
                raise BadInputError(str(path), line, "movieId", "not a non-negative integer id", mid)
            if not genres:
                raise BadInputError(str(path), line, "genres", "empty value")
            ids.append(int(mid))
            firsts.append(genres.split("|")[0])
    if not ids:
        raise BadInputError(str(path), None, None, "file has no data rows")
    ids_np = np.asarray(ids, dtype=np.int64)
    order = np.argsort(ids_np, kind="stable")
    dup = np.flatnonzero(np.diff(ids_np[order]) == 0)
    if len(dup):
        second = int(order[dup[0] + 1])  # 0-based data row of the repeat; line = row + 2 (header first)
        raise BadInputError(str(path), second + 2, "movieId", "duplicate movie id", str(ids_np[second]))
    names = sorted(set(firsts))
    cate = np.searchsorted(np.asarray(names), np.asarray(firsts)) + 1
    return ids_np[order], cate[order].astype(np.int64), names


def read_movielens(folder: str | Path, *, lenient: bool = False, block_bytes: int = BLOCK_BYTES,
                   span: Span | None = None) -> EventStream:
    """MovieLens `ratings.csv` + `movies.csv`: one RATE event per rating; category = the movie's first genre.
    `span`: a part of ratings.csv only (movies.csv is read whole)."""
    folder = Path(folder)
    ratings = folder / "ratings.csv"

    def produce(report: LoadReport) -> Iterator[pa.RecordBatch]:
        movie_ids, movie_cate, _ = read_movie_genres(folder / "movies.csv")
        for rows, f in _csv_blocks(ratings, RATINGS_COLUMNS, True, lenient, report, block_bytes, span):
            n = len(rows.bad)
            user = _int_column(rows, "userId", f["userId"])
            item = _int_column(rows, "movieId", f["movieId"])
            number = _np(pc.match_substring_regex(f["rating"], r"^[0-9]+(\.[0-9]+)?$"))
            rows.flag(~number, "rating", "not a number", f["rating"])
            ts = _ts_column(rows, "timestamp", f["timestamp"])
            at = np.minimum(np.searchsorted(movie_ids, item), len(movie_ids) - 1)
            rows.flag(movie_ids[at] != item, "movieId", "movie not in movies.csv", f["movieId"])
            batch = _emit(report, rows, ~rows.bad, {
                "event_id": _event_ids("ratings.csv", rows, n), "user_id": user, "item_id": item,
                "category_id": movie_cate[at], "action": np.full(n, Action.RATE, np.int8), "ts": ts})
            if batch is not None:
                yield batch

    return EventStream(str(ratings), produce)


# ------------------------------------------------------------------------------------------------- Taobao

TAOBAO_COLUMNS = ["user_id", "item_id", "category_id", "behavior_type", "timestamp"]


def read_taobao(path: str | Path, *, lenient: bool = False, block_bytes: int = BLOCK_BYTES,
                span: Span | None = None) -> EventStream:
    """Taobao `UserBehavior.csv` (no header). Rows outside TAOBAO_WINDOW_S are dropped and counted as filtered;
    sorting each user by time is the preprocessing's job (recsys.data.prepare)."""
    path = Path(path)
    names = pa.array(sorted(TAOBAO_ACTIONS))
    codes = np.asarray([TAOBAO_ACTIONS[k] for k in names.to_pylist()], dtype=np.int8)

    def produce(report: LoadReport) -> Iterator[pa.RecordBatch]:
        for rows, f in _csv_blocks(path, TAOBAO_COLUMNS, False, lenient, report, block_bytes, span):
            n = len(rows.bad)
            user = _int_column(rows, "user_id", f["user_id"])
            item = _int_column(rows, "item_id", f["item_id"])
            cate = _int_column(rows, "category_id", f["category_id"])
            kind = pc.index_in(f["behavior_type"], value_set=names)
            rows.flag(_np(kind.is_null()), "behavior_type", f"unknown behaviour type (expected one of {names})",
                      f["behavior_type"])
            at = _np(pc.fill_null(kind, 0))
            ts = _ts_column(rows, "timestamp", f["timestamp"])
            lo, hi = TAOBAO_WINDOW_S
            outside = ~rows.bad & ((ts < lo * 1000) | (ts >= hi * 1000))
            report.filter(TAOBAO_WINDOW_RULE, int(outside.sum()))
            batch = _emit(report, rows, ~rows.bad & ~outside, {
                "event_id": _event_ids(path.name, rows, n), "user_id": user, "item_id": item,
                "category_id": cate, "action": codes[at], "ts": ts})
            if batch is not None:
                yield batch

    return EventStream(str(path), produce)


# ------------------------------------------------------------------------------------------ our own Parquet


def _check_parquet_schema(path: Path, schema: pa.Schema) -> None:
    names = schema.names
    for f in EVENT_SCHEMA:
        if f.name not in names:
            raise BadInputError(str(path), None, f.name, f"missing column (file has {names})")
    for name in names:
        if name not in EVENT_SCHEMA.names:
            raise BadInputError(str(path), None, name, f"unexpected column (expected {EVENT_SCHEMA.names})")
    for f in EVENT_SCHEMA:
        got = schema.field(f.name).type
        if f.name == "event_id":
            ok = pa.types.is_string(got) or pa.types.is_large_string(got)
        else:
            ok = pa.types.is_integer(got)
        if not ok:
            raise BadInputError(str(path), None, f.name, f"wrong type: expected {f.type}, got {got}")


def parquet_files(path: str | Path) -> list[Path]:
    """The Parquet files of an events input: the file, or a folder's files in name order."""
    path = Path(path)
    if not path.is_dir():
        return [path]
    files = sorted(path.glob("*.parquet"))
    if not files:
        raise BadInputError(str(path), None, None, "folder has no .parquet files")
    return files


def read_parquet_events(path: str | Path, *, lenient: bool = False, batch_rows: int = 1 << 20,
                        span: Span | None = None) -> EventStream:
    """Our own events in EVENT_SCHEMA (any integer width accepted, checked on cast): one Parquet file, or a
    folder of them (read in name order, e.g. a pipeline's part files). Rows are 1-based row numbers within
    each file. `span`: row groups of one file only."""
    path = Path(path)

    def produce(report: LoadReport) -> Iterator[pa.RecordBatch]:
        for file in parquet_files(path):
            yield from _parquet_file(file, lenient, batch_rows, report, span)

    return EventStream(str(path), produce)


def open_parquet(path: Path) -> pq.ParquetFile:
    """A checked events Parquet file (not empty, readable, EVENT_SCHEMA's columns)."""
    _check_nonempty(path)
    try:
        pf = pq.ParquetFile(path)
    except pa.ArrowException as e:
        raise BadInputError(str(path), None, None, f"not a readable Parquet file: {e}") from None
    _check_parquet_schema(path, pf.schema_arrow)
    return pf


def _parquet_file(path: Path, lenient: bool, batch_rows: int, report: LoadReport, span: Span | None = None
                  ) -> Iterator[pa.RecordBatch]:
    pf = open_parquet(path)
    row, groups = 1, None
    if span is not None:
        row, groups = span.first_row, list(range(span.start, span.end))
    elif pf.metadata.num_rows == 0:
        raise BadInputError(str(path), None, None, "file has no data rows")
    for batch in pf.iter_batches(batch_size=batch_rows, row_groups=groups, columns=EVENT_SCHEMA.names):
        n = batch.num_rows
        rows = _Rows(str(path), row, n, lenient, report)
        row += n
        report.rows_read += n
        cols = {}
        for f in EVENT_SCHEMA:
            a = batch.column(f.name)
            rows.flag(_np(a.is_null()), f.name, "missing value")
            if f.name == "event_id":
                cols[f.name] = a.cast(pa.string())
                continue
            if pa.types.is_unsigned_integer(a.type) and a.type.bit_width == 64:
                too_big = pc.greater(a, pa.scalar(2**63 - 1, a.type))
                rows.flag(_np(pc.fill_null(too_big, False)), f.name, "overflows int64", a)
                a = pc.if_else(pa.array(~rows.bad), a, pa.scalar(0, a.type))
            v = _np(pc.fill_null(a.cast(pa.int64()), 0))
            if f.name == "action":
                known = [int(x) for x in Action]
                rows.flag(~np.isin(v, known), f.name, f"unknown action (expected {known})", a)
            else:
                rows.flag(v < 0, f.name, "negative timestamp" if f.name == "ts" else "negative id", a)
            cols[f.name] = v
        out = _emit(report, rows, ~rows.bad, cols)
        if out is not None:
            yield out


def raw_format(path: str | Path) -> str:
    """The loader a path takes: "movielens" (a folder with ratings.csv), "parquet" (a .parquet file or a folder
    of them: our events), "taobao" (any other file: UserBehavior.csv)."""
    path = Path(path)
    if path.is_dir():
        if (path / "ratings.csv").is_file():
            return "movielens"
        if any(path.glob("*.parquet")):
            return "parquet"
        raise BadInputError(str(path), None, None, "folder has neither ratings.csv (MovieLens) nor .parquet files")
    return "parquet" if path.suffix == ".parquet" else "taobao"


def open_raw(path: str | Path, *, lenient: bool = False, span: Span | None = None) -> EventStream:
    """Pick the loader from the path (`raw_format`). `span`: a part of the file (of ratings.csv for MovieLens,
    of one Parquet file, not a folder)."""
    loader = {"movielens": read_movielens, "parquet": read_parquet_events, "taobao": read_taobao}[raw_format(path)]
    return loader(path, lenient=lenient, span=span)
