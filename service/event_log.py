"""The offline event log (Parquet files with the Event columns: event_id, user_id, item_id, category_id,
action, ts in ms) read as the state store's records, per user.

A memory state summarises every event a user ever had, while the Redis sequence keeps only the newest
`seq_cap`: rebuilding states for a new model version therefore reads the log (`StateStore.rebuild_from_log`)
and adds what the stream applied since the log was written. An event is the same event in both when its
event_id is the same (the tie-break key `tb` is a digest of the id), so overlap is never counted twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as pads

from recsys.config.serve import StateStoreConfig
from service.state import SEQ_DTYPE, Event, to_records

LOG_COLUMNS = ["event_id", "user_id", "item_id", "category_id", "action", "ts"]


def log_users(path: str | Path) -> np.ndarray:
    """Every user id in the log, sorted."""
    col = pads.dataset(str(path), format="parquet").to_table(columns=["user_id"]).column("user_id")
    return np.unique(col.to_numpy())


def read_log(path: str | Path, user_ids: Iterable[int]) -> dict[int, np.ndarray]:
    """-> {user: SEQ_DTYPE records, time-ordered} for the given users (a user absent from the log: none)."""
    users = sorted({int(u) for u in user_ids})
    ds = pads.dataset(str(path), format="parquet")
    missing = [c for c in LOG_COLUMNS if c not in ds.schema.names]
    if missing:
        raise ValueError(f"{path}: event log lacks column(s) {missing}; expected {LOG_COLUMNS}")
    t = ds.to_table(columns=LOG_COLUMNS, filter=pc.field("user_id").isin(users))
    cols = {c: t.column(c).to_pylist() for c in LOG_COLUMNS}
    by_user: dict[int, list[Event]] = {}
    for i in range(t.num_rows):
        try:
            e = Event(cols["event_id"][i], cols["user_id"][i], cols["item_id"][i], cols["category_id"][i],
                      cols["action"][i], cols["ts"][i])
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: event log row {i} (event_id {cols['event_id'][i]!r}): {err}") from None
        by_user.setdefault(e.user_id, []).append(e)
    return {u: to_records(evs)[0] for u, evs in by_user.items()}


def union(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Two time-ordered record arrays -> their union, time-ordered, each (ts, tb) event once."""
    both = np.concatenate([a, b]).astype(SEQ_DTYPE, copy=False)
    both = both[np.lexsort((both["tb"], both["ts"]))]
    if len(both) < 2:
        return both
    keep = np.r_[True, (both["ts"][1:] != both["ts"][:-1]) | (both["tb"][1:] != both["tb"][:-1])]
    return both[keep]


@dataclass(frozen=True)
class LogRebuild:
    """The `make_rebuilder` of pipelines.rebuild_state for lifelong states: picklable, so each Ray actor
    opens its own store connection and loads the bundle once, then rebuilds users from log + sequence."""

    state: StateStoreConfig
    bundle: str
    log: str | None = None  # None: from the stored sequences only (exact for users within the cap)

    def __call__(self):
        from service.model_state import ModelStateUpdater, ServingModel
        from service.redis_conn import connect
        from service.state import StateStore

        handle = connect(self.state)
        store = StateStore(handle.client, self.state)
        updater = ModelStateUpdater(ServingModel.from_bundle(self.bundle))

        def rebuild(users) -> int:
            if self.log is None:
                return store.rebuild(updater, users)
            return store.rebuild_from_log(updater, read_log(self.log, users), users)

        return rebuild
