"""One place that starts and stops Ray for every pipeline job.

Locally (`address=None`) Ray is started inside this process with bounded CPUs and object store, no
dashboard and quiet logs; `address="auto"` (or `ray://host:10001`, `host:6379`) joins a running cluster
whose resources are then the cluster's. If Ray is already initialised (a test fixture, a notebook), the
session reuses it and leaves it running: whoever started Ray stops it.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

MiB = 1024 * 1024


@dataclass(frozen=True)
class RayResources:
    """What the connected Ray cluster offers, for sizing jobs."""

    cpus: float
    gpus: float
    object_store_bytes: float
    nodes: int


def _quiet_env() -> None:
    # Set before ray starts so workers inherit them; setdefault keeps any value the user chose.
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION", "0")
    # Ray Data's progress bars interleave badly with ours; our jobs print their own progress.
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


def init_ray(
    address: str | None = None,
    num_cpus: int | None = None,
    object_store_mb: int | None = 512,
    log_to_driver: bool = True,
) -> bool:
    """Start (or join) Ray. Returns True when this call started it (so the caller owns shutdown)."""
    import ray

    if ray.is_initialized():
        return False
    _quiet_env()
    common = dict(
        include_dashboard=os.environ.get("RECSYS_RAY_DASHBOARD", "0") == "1",
        logging_level=logging.WARNING,
        log_to_driver=log_to_driver,
        ignore_reinit_error=False,
    )
    # Ray Data logs every dataset execution at INFO; our jobs report their own progress.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    if address is not None:
        # A cluster fixes its own CPUs and object store; passing them here is an error in Ray.
        ray.init(address=address, **common)
    else:
        ray.init(
            num_cpus=num_cpus if num_cpus is not None else os.cpu_count(),
            object_store_memory=object_store_mb * MiB if object_store_mb else None,
            **common,
        )
    return True


def resources() -> RayResources:
    import ray

    total = ray.cluster_resources()
    return RayResources(
        cpus=float(total.get("CPU", 0.0)),
        gpus=float(total.get("GPU", 0.0)),
        object_store_bytes=float(total.get("object_store_memory", 0.0)),
        nodes=len([n for n in ray.nodes() if n.get("Alive")]),
    )


@contextmanager
def ray_session(
    address: str | None = None,
    num_cpus: int | None = None,
    object_store_mb: int | None = 512,
    log_to_driver: bool = True,
) -> Iterator[RayResources]:
    """`with ray_session(...) as res:` runs a job on Ray and shuts a locally started Ray down afterwards,
    also when the job raises."""
    import ray

    started = init_ray(address, num_cpus, object_store_mb, log_to_driver)
    try:
        yield resources()
    finally:
        if started:
            ray.shutdown()
