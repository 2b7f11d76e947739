"""Bad input: by default an error naming file, row and column; with lenient=True the row is skipped and
counted per reason. Nothing disappears silently: read = kept + skipped + filtered."""

import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys.data.raw import TAOBAO_WINDOW_RULE, read_movielens, read_parquet_events, read_taobao
from recsys.data.report import BadInputError
from recsys.data.schemas import EVENT_SCHEMA

GOOD = "1,2268318,2520377,pv,1511544070"
T_IN = 1511544070


def taobao(tmp_path, *lines, name="UserBehavior.csv"):
    p = tmp_path / name
    p.write_text("".join(line + "\n" for line in lines))
    return p


def movielens(tmp_path, ratings, movies="movieId,title,genres\n1,Toy Story (1995),Adventure|Animation\n"
              "2,\"Heat, The (1995)\",Action|Crime\n"):
    d = tmp_path / "ml"
    d.mkdir(exist_ok=True)
    (d / "movies.csv").write_text(movies)
    (d / "ratings.csv").write_text(ratings)
    return d


def strict_error(stream) -> BadInputError:
    with pytest.raises(BadInputError) as e:
        stream.read_all()
    return e.value


def check_counted(stream, reason_part, skipped, kept):
    t = stream.read_all()
    rep = stream.report
    assert t.num_rows == kept == rep.rows_kept
    assert rep.n_skipped == skipped
    assert any(reason_part in r for r in rep.skipped), rep.skipped
    assert rep.rows_read == rep.rows_kept + rep.n_skipped + rep.n_filtered
    assert rep.examples and str(rep).count("skipped") >= 1
    return rep


@pytest.mark.parametrize("bad, column, reason", [
    ("x1,2,3,pv,1511544070", "user_id", "not an integer id"),
    ("1,2.5,3,pv,1511544070", "item_id", "not an integer id"),
    ("1,-2,3,pv,1511544070", "item_id", "negative id"),
    ("1,2,99999999999999999999,pv,1511544070", "category_id", "overflows int64"),
    ("9223372036854775808,2,3,pv,1511544070", "user_id", "overflows int64"),
    ("1,2,3,click,1511544070", "behavior_type", "unknown behaviour type"),
    ("1,2,3,pv,2017-11-25 10:00", "timestamp", "unparsable timestamp"),
    ("1,2,3,pv,", "timestamp", "empty value"),
    ("1,2,3,pv", None, "missing fields"),
    ("1,2,3,pv,1511544070,7", None, "extra fields"),
])
def test_taobao_bad_row(tmp_path, bad, column, reason):
    p = taobao(tmp_path, GOOD, GOOD, bad, GOOD)
    err = strict_error(read_taobao(p))
    assert err.file == str(p) and err.row == 3 and err.column == column
    assert reason in str(err) and str(p) in str(err) and "row 3" in str(err)
    check_counted(read_taobao(p, lenient=True), reason, skipped=1, kept=3)


def test_int64_max_is_still_a_valid_id(tmp_path):
    p = taobao(tmp_path, f"9223372036854775807,2,3,buy,{T_IN}")
    assert read_taobao(p).read_all()["user_id"].to_pylist() == [2**63 - 1]


def test_lenient_counts_each_reason_and_keeps_line_numbers(tmp_path):
    p = taobao(tmp_path, GOOD, "a,2,3,pv,1", "1,-5,3,pv,1511544070", GOOD, "1,-6,3,pv,1511544070",
               "1,2,3,pv,1", "", "1,2,3")
    s = read_taobao(p, lenient=True)
    t = s.read_all()
    rep = s.report
    assert t.num_rows == 2
    assert rep.skipped == {"user_id: not an integer id": 1, "item_id: negative id": 2,
                           "missing fields: expected 5 (user_id, item_id, category_id, behavior_type, timestamp)": 1}
    assert rep.filtered == {TAOBAO_WINDOW_RULE: 1, "blank line": 1}
    assert rep.rows_read == 8 == rep.rows_kept + rep.n_skipped + rep.n_filtered
    lines = sorted(int(m) for e in rep.examples for m in re.findall(r"row (\d+)", e))
    assert lines == [2, 3, 8]  # one example per reason (rows 3 and 5 share "negative id")
    assert t["event_id"].to_pylist() == ["UserBehavior.csv:1", "UserBehavior.csv:4"]


def test_out_of_window_rows_are_counted_not_errors(tmp_path):
    p = taobao(tmp_path, GOOD, "1,2,3,pv,1505088000", "1,2,3,pv,1512316800", "1,2,3,pv,1511539200")
    s = read_taobao(p)
    assert s.read_all()["ts"].to_pylist() == [T_IN * 1000, 1511539200 * 1000]
    assert s.report.filtered == {TAOBAO_WINDOW_RULE: 2} and s.report.n_skipped == 0


def test_bad_rows_in_a_later_block_name_their_true_line(tmp_path):
    lines = [GOOD] * 5000 + ["1,2,3,pv,notatime"] + [GOOD] * 10
    p = taobao(tmp_path, *lines)
    err = strict_error(read_taobao(p, block_bytes=16 << 10))
    assert err.row == 5001 and err.column == "timestamp"


@pytest.mark.parametrize("content, reason", [("", "file is empty"), ("\n", "blank")])
def test_empty_taobao_file(tmp_path, content, reason):
    p = tmp_path / "UserBehavior.csv"
    p.write_text(content)
    if reason == "file is empty":
        err = strict_error(read_taobao(p, lenient=True))
        assert "file is empty" in str(err) and str(p) in str(err)
    else:  # a lone blank line: nothing to load, and it is counted, not hidden
        s = read_taobao(p, lenient=True)
        assert s.read_all().num_rows == 0 and s.report.filtered == {"blank line": 1}


def test_missing_file(tmp_path):
    err = strict_error(read_taobao(tmp_path / "nope.csv"))
    assert "file not found" in str(err)


@pytest.mark.parametrize("header, column, reason", [
    ("userId,movieId,timestamp", "rating", "missing column"),
    ("userId,movieId,rating,timestamp,tag", "tag", "unexpected column"),
    ("userId,movieId,timestamp,rating", None, "out of order"),
])
def test_movielens_header(tmp_path, header, column, reason):
    d = movielens(tmp_path, f"{header}\n1,1,4.0,964982703\n")
    err = strict_error(read_movielens(d, lenient=True))
    assert err.row == 1 and err.column == column and reason in str(err) and "ratings.csv" in str(err)


@pytest.mark.parametrize("bad, column, reason", [
    ("1,1,four,964982703", "rating", "not a number"),
    ("1,3,4.0,964982703", "movieId", "movie not in movies.csv"),
    ("-1,1,4.0,964982703", "userId", "negative id"),
    ("1,1,4.0,12:30", "timestamp", "unparsable timestamp"),
    ("1,1,4.0,-5", "timestamp", "negative timestamp"),
    ("1,1,4.0,99999999999999999", "timestamp", "timestamp out of range"),
])
def test_movielens_bad_rating_row(tmp_path, bad, column, reason):
    d = movielens(tmp_path, f"userId,movieId,rating,timestamp\n1,1,4.0,964982703\n{bad}\n2,2,3.5,964982800\n")
    err = strict_error(read_movielens(d))
    assert (err.row, err.column) == (3, column) and reason in str(err)
    check_counted(read_movielens(d, lenient=True), reason, skipped=1, kept=2)


def test_movielens_header_only_and_bad_movies(tmp_path):
    d = movielens(tmp_path, "userId,movieId,rating,timestamp\n")
    assert "no data rows" in str(strict_error(read_movielens(d)))
    d = movielens(tmp_path, "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n",
                  movies="movieId,title,genres\n1,Toy Story (1995),Comedy\nx,Heat (1995),Action\n")
    err = strict_error(read_movielens(d, lenient=True))
    assert err.file.endswith("movies.csv") and (err.row, err.column) == (3, "movieId")
    d = movielens(tmp_path, "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n",
                  movies="movieId,title,genres\n1,A,Comedy\n1,B,Action\n")
    assert "duplicate movie id" in str(strict_error(read_movielens(d)))


def parquet(tmp_path, cols: dict, name="events.parquet"):
    p = tmp_path / name
    pq.write_table(pa.table(cols), p)
    return p


def good_cols(n=3):
    return {"event_id": [f"e{i}" for i in range(n)], "user_id": np.arange(n, dtype=np.int64),
            "item_id": np.arange(1, n + 1, dtype=np.int64), "category_id": np.ones(n, np.int64),
            "action": np.zeros(n, np.int8), "ts": np.full(n, 1_600_000_000_000, np.int64)}


@pytest.mark.parametrize("change, column, reason", [
    (lambda c: c.pop("ts"), "ts", "missing column"),
    (lambda c: c.update(extra=[1, 2, 3]), "extra", "unexpected column"),
    (lambda c: c.update(user_id=["a", "b", "c"]), "user_id", "wrong type"),
    (lambda c: c.update(ts=[1.5, 2.5, 3.5]), "ts", "wrong type"),
])
def test_parquet_schema_errors(tmp_path, change, column, reason):
    cols = good_cols()
    change(cols)
    p = parquet(tmp_path, cols)
    err = strict_error(read_parquet_events(p, lenient=True))
    assert err.column == column and reason in str(err) and str(p) in str(err)


@pytest.mark.parametrize("column, values, reason", [
    ("item_id", np.array([1, -7, 3], np.int64), "negative id"),
    ("user_id", pa.array([1, None, 3], pa.int64()), "missing value"),
    ("user_id", np.array([1, 2**64 - 1, 3], np.uint64), "overflows int64"),
    ("action", np.array([0, 9, 1], np.int8), "unknown action"),
    ("ts", np.array([1, -1, 3], np.int64), "negative timestamp"),
])
def test_parquet_bad_values(tmp_path, column, values, reason):
    cols = good_cols()
    cols[column] = values
    p = parquet(tmp_path, cols)
    err = strict_error(read_parquet_events(p))
    assert (err.row, err.column) == (2, column) and reason in str(err)
    rep = check_counted(read_parquet_events(p, lenient=True), reason, skipped=1, kept=2)
    assert rep.rows_read == 3


def test_parquet_empty_and_narrow_ints(tmp_path):
    p = tmp_path / "empty.parquet"
    pq.write_table(EVENT_SCHEMA.empty_table(), p)
    assert "no data rows" in str(strict_error(read_parquet_events(p)))
    (tmp_path / "zero.parquet").write_bytes(b"")
    assert "file is empty" in str(strict_error(read_parquet_events(tmp_path / "zero.parquet")))
    cols = good_cols()
    cols["user_id"] = np.arange(3, dtype=np.int32)  # narrower ints are fine
    t = read_parquet_events(parquet(tmp_path, cols, "n.parquet")).read_all()
    assert t.schema == EVENT_SCHEMA and t["user_id"].to_pylist() == [0, 1, 2]


def test_crlf_line_endings_are_not_bad_rows(tmp_path):
    d = movielens(tmp_path, "userId,movieId,rating,timestamp\r\n1,1,4.0,964982703\r\n2,2,3.5,964982800\r\n")
    t = read_movielens(d).read_all()
    assert t["ts"].to_pylist() == [964982703000, 964982800000]


def test_prepare_records_the_lenient_report(tmp_path):
    from recsys.data.prepare import prepare

    rows = [f"{u},{10 * u + i % 4},{i % 3},pv,{T_IN + i}" for u in (1, 2) for i in range(12)]
    p = taobao(tmp_path, *rows[:5], "1,2,3,pv,soon", "bad", *rows[5:], "1,2,3,pv,1505088000")
    meta = prepare(read_taobao(p, lenient=True), tmp_path / "out", seed=0)
    rep = meta["load_report"]
    assert meta["n_events"] == 24 and rep["rows_read"] == 27
    assert rep["skipped"] == {"timestamp: unparsable timestamp (expected integer Unix seconds)": 1,
                              "missing fields: expected 5 (user_id, item_id, category_id, behavior_type, timestamp)": 1}
    assert rep["filtered"] == {TAOBAO_WINDOW_RULE: 1}
    with pytest.raises(BadInputError, match=r"row 6, column 'timestamp'"):
        prepare(read_taobao(p), tmp_path / "strict", seed=0)
