"""Rebuild every user's streaming state (Aaren / Titans) for a new model version, fanned out over Ray.

The job knows nothing of where sequences and states live (pipelines never import service): the caller
passes a picklable zero-argument `make_rebuilder` that each Ray actor calls once (open the state store,
load the bundle) and that returns `rebuild(user_ids) -> number of states written`. The service's
`StateStore.rebuild(ModelStateUpdater(model), users)` has exactly that shape: it reads the stored raw
(catalogue) ids and maps them with the new bundle's vocabulary, so states and block indexes of a retrained
bundle come from the same stored histories under its own dense ids. Users are split into
fixed chunks in id order; a failed actor is restarted and its chunk retried, which is safe because a
rebuild writes a pure function of the stored sequence and the model version (idempotent).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

Rebuilder = Callable[[Sequence[int]], int]


class _RebuildActor:
    def __init__(self, make_rebuilder: Callable[[], Rebuilder]):
        self.rebuild = make_rebuilder()

    def run(self, users: np.ndarray) -> int:
        return int(self.rebuild([int(u) for u in users]))


def run_rebuild_state(
    user_ids: Sequence[int] | np.ndarray,
    make_rebuilder: Callable[[], Rebuilder],
    *,
    workers: int = 2,
    chunk: int = 1024,
    address: str | None = None,
    max_retries: int = 2,
) -> dict:
    """Rebuild the states of `user_ids` on `workers` Ray actors. Returns {users, rebuilt, chunks,
    users_per_s, wall_s}; `rebuilt` is the sum the rebuild calls reported."""
    import ray

    from pipelines.runtime import ray_session

    users = np.unique(np.asarray(user_ids, dtype=np.int64))
    if len(users) != len(user_ids):
        raise ValueError(f"user_ids: {len(user_ids) - len(users)} duplicate ids")
    chunks = [users[a : a + chunk] for a in range(0, len(users), chunk)]
    t0 = time.perf_counter()
    with ray_session(address=address) as res:
        cpus = max(1.0, res.cpus // workers) if address is None else 1.0
        actor = ray.remote(num_cpus=cpus, max_restarts=max_retries, max_task_retries=max_retries)(_RebuildActor)
        pool = [actor.remote(make_rebuilder) for _ in range(min(workers, max(1, len(chunks))))]
        refs = [pool[i % len(pool)].run.remote(c) for i, c in enumerate(chunks)]
        rebuilt = int(sum(ray.get(refs)))
        for a in pool:
            ray.kill(a)
    wall = time.perf_counter() - t0
    return {"users": int(len(users)), "rebuilt": rebuilt, "chunks": len(chunks),
            "users_per_s": len(users) / wall if wall > 0 else float("nan"), "wall_s": wall}
