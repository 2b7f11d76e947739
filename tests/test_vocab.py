"""recsys.vocab's raw -> dense lookup equals a binary search on the sorted ids, on both of its layouts (a direct
table for small ids, a hash table for large ones), with unknown, negative and colliding ids."""

from __future__ import annotations

import numpy as np
import pytest

from recsys.vocab import OOV, RawIndex, Vocabulary


def _oracle(ids: np.ndarray, raw: np.ndarray) -> np.ndarray:
    at = np.minimum(np.searchsorted(ids, raw), len(ids) - 1)
    return np.where(ids[at] == raw, at + 1, OOV)


CASES = {
    "small ids (direct table)": lambda rng: np.sort(rng.choice(50_000, 5_000, replace=False)),
    "large ids (hash)": lambda rng: np.sort(rng.choice(2**53 - 1, 5_000, replace=False)),
    # ids that share their low bits and differ only high up: many land in few hash slots
    "colliding (hash)": lambda rng: np.sort((np.arange(1, 3_001, dtype=np.int64) << 40) + 7),
    "one id (hash)": lambda rng: np.array([2**50]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_raw_index_equals_binary_search(case):
    rng = np.random.default_rng(0)
    ids = CASES[case](rng).astype(np.int64)
    index = RawIndex(ids)
    assert (index.table is not None) == case.startswith("small")
    raw = np.concatenate([ids[rng.integers(0, len(ids), 20_000)],            # known, repeated, any order
                          rng.integers(0, 2**53 - 1, 3_000),                  # almost all unknown
                          ids[:50] + 1, ids[:50] - 1,                         # neighbours of known ids
                          np.array([-1, -2**40, 0, 2**53 - 1])])
    rng.shuffle(raw)
    assert np.array_equal(index.dense(raw), _oracle(ids, raw))


def test_vocabulary_counts_unknown_ids():
    ids = np.array([10, 2**45, 2**46], dtype=np.int64)
    v = Vocabulary(ids, np.array([5], dtype=np.int64), np.array([0, 1, 1, 0]))
    dense, n_oov = v.dense(np.array([2**46, 11, 10, -3, 2**45]), "item")
    assert dense.tolist() == [3, OOV, 1, OOV, 2] and n_oov == 2
