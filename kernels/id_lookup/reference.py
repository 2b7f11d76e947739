"""The numpy forms of `cpu.lookup` and `cpu.lookup_table`: their oracles and the path without a C compiler."""

from __future__ import annotations

import numpy as np

MULT = np.uint64(0x9E3779B97F4A7C15)   # Fibonacci hashing: the multiplier's high bits spread consecutive ids


def slot_of(x: np.ndarray, bits: int) -> np.ndarray:
    """The home slot of each id (>= 0) in a table of 2^bits slots: the top `bits` bits of x * MULT mod 2^64."""
    return ((x.astype(np.uint64) * MULT) >> np.uint64(64 - bits)).astype(np.int64)


def lookup(keys: np.ndarray, vals: np.ndarray, bits: int, raw: np.ndarray, missing: int = 0) -> np.ndarray:
    """Open addressing with linear probing, for all ids at once: keys [2^bits] int64 (-1: empty), vals [2^bits]
    int32; raw [N] int64 -> [N] int64, the value of the slot holding each id, `missing` for an id absent or
    negative. An empty slot ends a probe (the table is never full)."""
    raw = np.asarray(raw, np.int64)
    out = np.full(len(raw), missing, np.int64)
    todo = np.flatnonzero(raw >= 0)
    slot = slot_of(raw[todo], bits)
    mask = len(keys) - 1
    while len(todo):
        k = keys[slot]
        hit = k == raw[todo]
        out[todo[hit]] = vals[slot[hit]]
        more = ~hit & (k != -1)
        todo, slot = todo[more], (slot[more] + 1) & mask
    return out


def lookup_table(table: np.ndarray, raw: np.ndarray, missing: int = 0) -> np.ndarray:
    """A direct table: table [top + 1] int32 (0 where no id); raw [N] int64 -> [N] int64, table[id] for
    0 <= id <= top, else `missing`."""
    raw = np.asarray(raw, np.int64)
    inside = (raw >= 0) & (raw < len(table))
    if not len(table):
        return np.full(len(raw), missing, np.int64)
    return np.where(inside, table[np.where(inside, raw, 0)], missing).astype(np.int64)


def lookup_range(top: int, raw: np.ndarray, missing: int = 0) -> np.ndarray:
    """Ids that are their own dense id: raw [N] int64 -> [N] int64, the id for 1 <= id <= top, else `missing`."""
    raw = np.asarray(raw, np.int64)
    return np.where((raw >= 1) & (raw <= top), raw, missing).astype(np.int64)
