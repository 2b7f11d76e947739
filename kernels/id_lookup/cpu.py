"""Raw id -> dense id in C (`cpu.c`) for recsys.vocab's tables: `lookup` (the hash table), `lookup_table` (the
direct table) and `lookup_range` (ids that are their own dense id) run it where it loaded, else the numpy form (`reference.py`). The same result either way (tests/test_id_lookup.py). RECSYS_ID_LOOKUP_KERNEL=0 in the
environment (read per call) keeps every call on the reference."""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np

from kernels import cbuild
from kernels.id_lookup import reference


SOURCE = Path(__file__).with_name("cpu.c")
SWITCH_ENV = "RECSYS_ID_LOOKUP_KERNEL"


@functools.cache
def load():
    """The built library, or None (logged once) when it cannot be built here."""
    lib = cbuild.open_library(SOURCE, "id_lookup", "the numpy path")
    if lib is None:
        return None
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.id_lookup.argtypes = [p, i64, i64, p, p, i32, i64, p]
    lib.id_lookup.restype = None
    lib.id_lookup_table.argtypes = [p, i64, i64, p, i64, i64, p]
    lib.id_lookup_table.restype = None
    lib.id_lookup_range.argtypes = [p, i64, i64, i64, i64, p]
    lib.id_lookup_range.restype = None
    return lib


def enabled() -> bool:
    return cbuild.switch_on(SWITCH_ENV)


def _ids(raw: np.ndarray) -> np.ndarray:
    raw = np.asarray(raw)
    return raw if raw.dtype == np.int64 and raw.ndim == 1 else np.asarray(raw, np.int64).reshape(-1)


def lookup_table(table: np.ndarray, raw: np.ndarray, missing: int = 0) -> np.ndarray:
    """`reference.lookup_table`'s contract. raw: any 1-D int64 array, strided views included."""
    raw = _ids(raw)
    lib = load() if enabled() else None
    if lib is None or table.dtype != np.int32 or not table.flags.c_contiguous:
        return reference.lookup_table(table, raw, missing)
    out = np.empty(len(raw), np.int64)
    if len(raw):
        lib.id_lookup_table(raw.ctypes.data, len(raw), raw.strides[0], table.ctypes.data, len(table) - 1, missing,
                            out.ctypes.data)
    return out


def lookup(keys: np.ndarray, vals: np.ndarray, bits: int, raw: np.ndarray, missing: int = 0) -> np.ndarray:
    """`reference.lookup`'s contract. raw: any 1-D int64 array, strided views included (a column of records)."""
    raw = _ids(raw)
    lib = load() if enabled() else None
    if (lib is None or not 1 <= bits <= 62 or keys.dtype != np.int64 or vals.dtype != np.int32
            or len(keys) != 1 << bits or len(vals) != len(keys) or not (keys.flags.c_contiguous and vals.flags.c_contiguous)):
        return reference.lookup(keys, vals, bits, raw, missing)
    out = np.empty(len(raw), np.int64)
    if len(raw):
        lib.id_lookup(raw.ctypes.data, len(raw), raw.strides[0], keys.ctypes.data, vals.ctypes.data, bits, missing,
                      out.ctypes.data)
    return out


def lookup_range(top: int, raw: np.ndarray, missing: int = 0) -> np.ndarray:
    """`reference.lookup_range`'s contract (a vocabulary of ids 1..top). raw: any 1-D int64 array, strided views
    included."""
    raw = _ids(raw)
    lib = load() if enabled() else None
    if lib is None:
        return reference.lookup_range(top, raw, missing)
    out = np.empty(len(raw), np.int64)
    if len(raw):
        lib.id_lookup_range(raw.ctypes.data, len(raw), raw.strides[0], top, missing, out.ctypes.data)
    return out
