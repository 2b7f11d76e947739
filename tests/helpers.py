"""Helpers every test file may use (no tests here): servers the tests start themselves, and data-file edits
for the loaders' error tests."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pytest
import redis

from recsys.data.sequences import DatasetError
from recsys.net import free_port


def wait_for(cond: Callable[[], bool], what: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


def pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def start_redis_server(data_dir: Path, port: int | None = None, *extra: str) -> tuple[subprocess.Popen, int]:
    """A `redis-server` (the Redis 7 on PATH) of our own on a free loopback port, persisting nothing.
    -> (process, port) once it answers PING; the caller terminates it."""
    binary = shutil.which("redis-server")
    assert binary, "redis-server (Redis 7) must be on PATH (Debian: apt-get install redis-server)"
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(data_dir), "--protected-mode", "yes", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    try:
        wait_for(lambda: proc.poll() is None and pings(client), f"redis-server on port {port}")
    except BaseException:
        proc.kill()
        raise
    finally:
        client.close()
    return proc, port


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def set_rows(t: pa.Table, name: str, rows, value) -> pa.Table:
    """`t` with column `name` set to `value` at `rows` (its type kept)."""
    col = t.column(name).to_numpy().copy()
    col[list(rows)] = value
    return t.set_column(t.schema.get_field_index(name), name, pa.array(col, t.schema.field(name).type))


def dataset_error(fn) -> str:
    """The message of the DatasetError `fn()` raises."""
    with pytest.raises(DatasetError) as e:
        fn()
    return str(e.value)


def prefer_recent_positions(model, decay: float) -> None:
    """Set a DARE's attention position table so its position term falls by `decay` per doubling of recency
    (row 0, the targets', high), as a trained model's does where recent events matter: the block index prunes."""
    import torch

    (att, prefix), _ = model.role_tables()
    with torch.no_grad():
        pos = att.weights()[f"{prefix}_pos"]
        pos.zero_()
        pos[:, 0] = -decay * torch.log2(1 + torch.arange(pos.shape[0], dtype=torch.float64)).float()
        pos[0, 0] = 2.0
