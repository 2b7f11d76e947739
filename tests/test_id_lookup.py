"""kernels.id_lookup: the C probe of recsys.vocab's hash table, its direct table and its range (an identity vocabulary)
equal their numpy forms and a
binary search on the sorted ids, for known, unknown, negative and colliding ids, contiguous or read in place from a column of the
stored records; it really runs (the numpy form is made to fail); the switch keeps calls on the numpy form."""

from __future__ import annotations

import numpy as np
import pytest

from kernels.id_lookup import cpu, reference
from recsys.vocab import OOV, RawIndex
from service.state import SEQ_DTYPE


def _oracle(ids: np.ndarray, raw: np.ndarray) -> np.ndarray:
    at = np.minimum(np.searchsorted(ids, raw), len(ids) - 1)
    return np.where(ids[at] == raw, at + 1, OOV)


CASES = {
    "random large ids": lambda rng: np.sort(rng.choice(2**53 - 1, 20_000, replace=False)),
    # the same low bits, apart only high up: long probe chains that wrap around the table's end
    "colliding": lambda rng: np.sort((np.arange(1, 3_001, dtype=np.int64) << 40) + 7),
    "one id": lambda rng: np.array([2**50]),
    "two ids": lambda rng: np.array([2**40, 2**50 + 3]),
}


def _queries(ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    raw = np.concatenate([ids[rng.integers(0, len(ids), 30_000)], rng.integers(0, 2**53 - 1, 3_000),
                          ids[:50] + 1, ids[:50] - 1, np.array([-1, -2**40, 0, 2**53 - 1, -2**63])])
    rng.shuffle(raw)
    return raw


@pytest.fixture
def kernel_only(monkeypatch):
    """The numpy form fails, so a result means the C kernel computed it."""
    assert cpu.load() is not None, "the id lookup kernel did not build"

    def fail(*a, **k):
        raise AssertionError("the numpy form ran")

    monkeypatch.setattr(reference, "lookup", fail)
    monkeypatch.setattr(reference, "lookup_table", fail)
    monkeypatch.setattr(reference, "lookup_range", fail)


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_kernel_equals_the_numpy_form_and_a_binary_search(case, kernel_only):
    rng = np.random.default_rng(len(case))
    ids = CASES[case](rng).astype(np.int64)
    index = RawIndex(ids)
    assert index.table is None   # the hash layout
    raw = _queries(ids, rng)
    got = index.dense(raw)
    assert got.dtype == np.int64 and np.array_equal(got, _oracle(ids, raw))
    assert np.array_equal(cpu.lookup(index.keys, index.vals, index.bits, raw, missing=-5),
                          np.where(got == OOV, -5, got))   # `missing` is what an unknown id gets


def test_the_numpy_form_equals_a_binary_search():
    rng = np.random.default_rng(1)
    ids = CASES["colliding"](rng).astype(np.int64)
    index = RawIndex(ids)
    raw = _queries(ids, rng)
    assert np.array_equal(reference.lookup(index.keys, index.vals, index.bits, raw), _oracle(ids, raw))


def test_a_column_of_records_is_read_in_place(kernel_only):
    rng = np.random.default_rng(2)
    ids = CASES["random large ids"](rng).astype(np.int64)
    index = RawIndex(ids)
    seq = np.zeros(5_000, SEQ_DTYPE)
    seq["item"] = _queries(ids, rng)[:5_000]
    column = seq[::-1]["item"]                       # 29-byte records, newest first: a strided, unaligned view
    assert column.strides[0] == -SEQ_DTYPE.itemsize
    assert np.array_equal(index.dense(column), _oracle(ids, np.ascontiguousarray(column)))
    assert len(index.dense(column[:0])) == 0


def test_the_switch_keeps_calls_on_the_numpy_form(monkeypatch):
    rng = np.random.default_rng(3)
    ids = CASES["random large ids"](rng).astype(np.int64)
    index = RawIndex(ids)
    raw = _queries(ids, rng)
    ran = []
    real = reference.lookup
    monkeypatch.setattr(reference, "lookup", lambda *a, **k: ran.append(1) or real(*a, **k))
    monkeypatch.setenv(cpu.SWITCH_ENV, "0")
    assert np.array_equal(index.dense(raw), _oracle(ids, raw)) and ran == [1]


@pytest.mark.parametrize("ids", [np.sort(np.random.default_rng(4).choice(50_000, 5_000, replace=False)),
                                 np.arange(1, 101), np.array([0]), np.array([], dtype=np.int64)])
def test_the_direct_table_in_c_equals_the_numpy_form_and_a_binary_search(ids, kernel_only):
    rng = np.random.default_rng(5)
    ids = ids.astype(np.int64)
    index = RawIndex(ids)
    assert index.table is not None
    raw = np.concatenate([ids[rng.integers(0, len(ids), 3_000)] if len(ids) else np.zeros(0, np.int64),
                          rng.integers(-5, 60_000, 3_000), np.array([-1, -2**63, 2**62, len(index.table),
                                                                      len(index.table) - 1])])
    seq = np.zeros(len(raw), SEQ_DTYPE)
    seq["item"] = raw
    want = _oracle(ids, raw) if len(ids) else np.zeros(len(raw), np.int64)
    assert np.array_equal(index.dense(raw), want)
    assert np.array_equal(index.dense(seq["item"]), want)                  # in place from the records
    outside = (raw < 0) | (raw >= len(index.table))   # `missing` is for these; an absent id inside reads the table's 0
    assert np.array_equal(cpu.lookup_table(index.table, raw, missing=-5), np.where(outside, -5, want))


def test_the_numpy_direct_table_equals_a_binary_search():
    rng = np.random.default_rng(6)
    ids = np.sort(rng.choice(50_000, 5_000, replace=False)).astype(np.int64)
    index = RawIndex(ids)
    raw = np.concatenate([ids[rng.integers(0, len(ids), 3_000)], rng.integers(-5, 60_000, 3_000)])
    assert np.array_equal(reference.lookup_table(index.table, raw), _oracle(ids, raw))
    assert np.array_equal(reference.lookup_table(np.zeros(0, np.int32), raw), np.zeros(len(raw), np.int64))


@pytest.mark.parametrize("top", [0, 1, 100_000])
def test_the_range_in_c_equals_the_numpy_form_and_the_vocabulary_meaning(top, kernel_only):
    """Ids 1..top are their own dense id (an identity vocabulary), every other id `missing`; in place from the records."""
    rng = np.random.default_rng(7)
    raw = np.concatenate([rng.integers(-3, top + 4, 5_000), np.array([-2**63, -1, 0, 1, top, top + 1, 2**62])])
    seq = np.zeros(len(raw), SEQ_DTYPE)
    seq["item"] = raw
    want = np.where((raw >= 1) & (raw <= top), raw, -5)
    assert np.array_equal(cpu.lookup_range(top, raw, missing=-5), want)
    assert np.array_equal(cpu.lookup_range(top, seq[::-1]["item"], missing=-5), want[::-1])
    assert len(cpu.lookup_range(top, raw[:0])) == 0


def test_the_numpy_range_equals_a_binary_search():
    rng = np.random.default_rng(8)
    ids = np.arange(1, 1_001, dtype=np.int64)
    raw = rng.integers(-5, 1_100, 3_000)
    assert np.array_equal(reference.lookup_range(len(ids), raw), _oracle(ids, raw))
