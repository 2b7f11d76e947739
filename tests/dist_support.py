"""For tests whose spawned processes form a gloo group."""

from __future__ import annotations

import torch.distributed as dist


def leave_group() -> None:
    """Every rank done before any tears its group down: rank 0 hosts the group's TCP store, and a rank still
    talking to it when rank 0's process exited died in a gloo thread ("terminate called without an active
    exception", SIGABRT; tests/test_sharded_tables.py, 2 of 4 runs on a Zen 4 VM). Only on a rank's normal
    end: after an error the other ranks may never reach the barrier."""
    dist.barrier()
    dist.destroy_process_group()
