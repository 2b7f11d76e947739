"""Raw loaders on the real files, checked against independent pandas reads of the same files."""

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from recsys.data.raw import (TAOBAO_WINDOW_RULE, TAOBAO_WINDOW_S, open_raw, read_movielens, read_parquet_events,
                             read_taobao)
from recsys.data.schemas import EVENT_SCHEMA, TAOBAO_ACTIONS, Action


@pytest.fixture(scope="module")
def ml_dir(movielens_dir):
    return movielens_dir


def test_movielens_matches_a_pandas_read(ml_dir):
    stream = read_movielens(ml_dir)
    t = stream.read_all()
    assert t.schema == EVENT_SCHEMA
    r = pd.read_csv(ml_dir / "ratings.csv")
    m = pd.read_csv(ml_dir / "movies.csv")
    first = m.set_index("movieId").genres.str.split("|").str[0]
    names = sorted(first.unique())
    assert t.num_rows == len(r) == 100_836
    np.testing.assert_array_equal(t["user_id"].to_numpy(), r.userId.to_numpy())
    np.testing.assert_array_equal(t["item_id"].to_numpy(), r.movieId.to_numpy())
    np.testing.assert_array_equal(t["ts"].to_numpy(), r.timestamp.to_numpy() * 1000)
    expect_cate = np.array([names.index(g) + 1 for g in first.loc[r.movieId]])
    np.testing.assert_array_equal(t["category_id"].to_numpy(), expect_cate)
    assert (t["action"].to_numpy() == Action.RATE).all()
    assert len(set(t["event_id"].to_pylist())) == t.num_rows
    rep = stream.report
    assert (rep.rows_read, rep.rows_kept, rep.n_skipped, rep.n_filtered) == (100_836, 100_836, 0, 0)


def test_streaming_in_small_blocks_equals_one_block(ml_dir, taobao_csv):
    small = list(read_movielens(ml_dir, block_bytes=64 << 10))
    assert len(small) > 10
    assert pa_concat(small).equals(read_movielens(ml_dir).read_all())
    small = list(read_taobao(taobao_csv, block_bytes=16 << 10))
    assert len(small) > 5
    assert pa_concat(small).equals(read_taobao(taobao_csv).read_all())


def pa_concat(batches):
    import pyarrow as pa

    return pa.Table.from_batches(batches, schema=EVENT_SCHEMA)


def test_taobao_window_and_actions_match_pandas(taobao_csv):
    raw = pd.read_csv(taobao_csv, header=None, names=["u", "i", "c", "b", "ts"])
    lo, hi = TAOBAO_WINDOW_S
    inside = raw[(raw.ts >= lo) & (raw.ts < hi)]
    stream = read_taobao(taobao_csv)
    t = stream.read_all()
    assert t.num_rows == len(inside) and len(inside) < len(raw)
    np.testing.assert_array_equal(t["user_id"].to_numpy(), inside.u.to_numpy())
    np.testing.assert_array_equal(t["category_id"].to_numpy(), inside.c.to_numpy())
    np.testing.assert_array_equal(t["ts"].to_numpy(), inside.ts.to_numpy() * 1000)
    np.testing.assert_array_equal(t["action"].to_numpy(), inside.b.map(TAOBAO_ACTIONS).to_numpy())
    rep = stream.report
    assert rep.rows_read == len(raw) == 14_321
    assert rep.filtered == {TAOBAO_WINDOW_RULE: len(raw) - len(inside)}
    assert rep.rows_kept + rep.n_filtered + rep.n_skipped == rep.rows_read
    # The README's known out-of-window row (2017-09-11) is among the filtered ones.
    assert (raw.ts < lo).sum() >= 1
    assert "filtered" in str(rep) and TAOBAO_WINDOW_RULE in str(rep)


def test_parquet_events_round_trip_and_dispatch(ml_dir, taobao_csv, tmp_path):
    t = read_movielens(ml_dir).read_all()
    pq.write_table(t, tmp_path / "ev.parquet", row_group_size=30_000)
    back = read_parquet_events(tmp_path / "ev.parquet", batch_rows=25_000)
    batches = list(back)
    assert len(batches) > 1 and pa_concat(batches).equals(t)
    assert back.report.rows_kept == t.num_rows
    assert open_raw(tmp_path / "ev.parquet").read_all().equals(t)
    parts = tmp_path / "parts"
    parts.mkdir()
    pq.write_table(t.slice(0, 40_000), parts / "part-0.parquet")
    pq.write_table(t.slice(40_000), parts / "part-1.parquet")
    assert open_raw(parts).read_all().equals(t)
    assert open_raw(ml_dir).read_all().equals(t)
    assert open_raw(taobao_csv).read_all().equals(read_taobao(taobao_csv).read_all())


def _read_spans(path, split_bytes, lenient, reader):
    """Read `path` as distributed preprocessing does: byte ranges aligned and counted (`csv_span`), each read
    on its own with the absolute line number of its first line."""
    import pyarrow as pa

    from recsys.data.raw import Span, csv_span
    from recsys.data.report import LoadReport

    size, lines, tables, report = path.stat().st_size, 0, [], LoadReport()
    for a in range(0, size, split_bytes):
        start, end, newlines = csv_span(path, a, min(a + split_bytes, size))
        stream = reader(Span(start, end, lines + 1), lenient)
        tables.append(stream.read_all())
        report.merge(stream.report)
        lines += newlines
    return pa.concat_tables(tables), report


@pytest.mark.parametrize("split_bytes", [5, 37, 1000, 64 << 10])
def test_csv_byte_ranges_read_the_same_rows_and_name_the_same_lines(taobao_csv, ml_dir, tmp_path, split_bytes):
    """Line-aligned byte ranges (any split size, boundaries inside lines, ranges holding no line start) read
    every line exactly once, with the whole-file read's line numbers: same rows, event ids, report."""
    from recsys.data.report import BadInputError

    lines = taobao_csv.read_text().splitlines(keepends=True)[:300]
    bad = ["abc,1,2,pv,1511544070\n", "\n", "1,2,3,teleport,1511544070\n"]
    path = tmp_path / "UserBehavior.csv"
    path.write_text("".join(lines[:70] + bad[:1] + lines[70:150] + bad[1:] + lines[150:]).rstrip("\n"))  # no final newline
    whole = read_taobao(path, lenient=True)
    want = whole.read_all()
    got, report = _read_spans(path, split_bytes, True, lambda span, lenient: read_taobao(path, lenient=lenient, span=span))
    assert got.equals(want)
    assert report.to_dict() | {"source": ""} == whole.report.to_dict() | {"source": ""}
    assert report.examples[0].startswith(f"{path}, row 71") and report.n_skipped == 2
    with pytest.raises(BadInputError, match=r"UserBehavior.csv, row 71, column 'user_id'"):
        _read_spans(path, split_bytes, False, lambda span, lenient: read_taobao(path, lenient=lenient, span=span))
    if split_bytes >= 1000:  # MovieLens: the header sits in the first range only (small ranges: too many reads)
        got, _ = _read_spans(ml_dir / "ratings.csv", split_bytes * 64, False,
                             lambda span, lenient: read_movielens(ml_dir, lenient=lenient, span=span))
        assert got.equals(read_movielens(ml_dir).read_all())
