"""One place that starts and stops Ray for every pipeline job.

Locally (`address=None`) Ray is started inside this process with bounded CPUs and object store, no
dashboard and quiet logs, every Ray server listening on 127.0.0.1 only (`recsys.net.ray_loopback_only`); `address="auto"` (or `ray://host:10001`, `host:6379`) joins a running cluster
whose resources are then the cluster's. If Ray is already initialised (a test fixture, a notebook), the
session reuses it and leaves it running: whoever started Ray stops it.

Ray's own output (its driver logger, and every worker's and actor's stdout/stderr that Ray forwards to the
driver: Ray Train's controller, PlacementGroupCleaner warnings, TrainingReport dumps, checkpoint paths)
can be sent to a log file instead of the terminal: `with ray_log_file(path):` around any code that starts
Ray sessions. `on_worker_lines(fn)` lets a job read the forwarded lines (progress) either way.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from recsys.net import ray_loopback_only

MiB = 1024 * 1024


@dataclass(frozen=True)
class RayResources:
    """What the connected Ray cluster offers, for sizing jobs."""

    cpus: float
    gpus: float
    object_store_bytes: float
    nodes: int


# Set by ray_log_file(): where the sessions started inside it write Ray's output (None: the terminal).
_LOG_FILE: Path | None = None
# Name under which Ray registers (and at disconnect removes) its driver-side printer of worker output; ours
# takes the same name so that ray.shutdown() removes it as it would Ray's.
_RAY_PRINTER = "ray_print_logs"


# Loggers of libraries that warn about their internals when torchrec models run in the driver between Ray
# sessions (torch.fx's is_fx_tracing notice): chatter of the same kind as Ray's, so it goes to the same file.
# A filter on the emitting logger, because torch re-installs the handlers of its "torch" logger at will.
_LIBRARY_CHATTER = ("torch.fx._symbolic_trace",)


class _ToFile(logging.Filter):
    """A logger filter that writes each record to the log file and stops it there."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.handler = logging.FileHandler(path, encoding="utf-8")
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def filter(self, record: logging.LogRecord) -> bool:
        self.handler.handle(record)
        return False

    def close(self) -> None:
        self.handler.close()


@contextmanager
def ray_log_file(path: str | Path | None) -> Iterator[None]:
    """Ray sessions started in this block write Ray's driver log and the forwarded worker output to `path`
    (appended) instead of stdout/stderr. `path=None` changes nothing (the --verbose case)."""
    global _LOG_FILE
    previous, _LOG_FILE = _LOG_FILE, (Path(path) if path is not None else None)
    chatter = [logging.getLogger(n) for n in _LIBRARY_CHATTER]
    to_file = None
    if _LOG_FILE is not None:
        _LOG_FILE.parent.mkdir(parents=True, exist_ok=True)
        to_file = _ToFile(_LOG_FILE)
        for lg in chatter:
            lg.addFilter(to_file)
    try:
        yield
    finally:
        _LOG_FILE = previous
        if to_file is not None:
            for lg in chatter:
                lg.removeFilter(to_file)
            to_file.close()


def _format_batch(data: dict) -> list[str]:
    who = data.get("actor_name") or data.get("task_name")
    prefix = f"({who + ' ' if who else ''}pid={data.get('pid')}{', ' + data['ip'] if data.get('ip') else ''})"
    return [f"{prefix} {line}" for line in data.get("lines", [])]


class _FileSink:
    """Replaces Ray's worker-output printer and its driver logger's handlers with one log file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = open(path, "a", buffering=1, encoding="utf-8")
        self.file.write(f"==== ray session {time.strftime('%Y-%m-%d %H:%M:%S')} ====\n")
        self.handler = logging.StreamHandler(self.file)
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.logger = logging.getLogger("ray")
        self.saved = list(self.logger.handlers)
        # before ray.init: init itself logs (e.g. the token-authentication warning)
        for h in self.saved:
            self.logger.removeHandler(h)
        self.logger.addHandler(self.handler)

    def __call__(self, data: dict) -> None:
        lines = _format_batch(data)
        if lines:
            self.file.write("\n".join(lines) + "\n")

    def attach(self) -> None:
        """After ray.init: worker output to the file instead of the terminal. Ray's printer is private
        API of the pinned Ray (2.60); if it moves, the output stays on the terminal rather than failing."""
        try:
            import ray._private.worker as ray_worker
            from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
        except ImportError:
            return
        dispatcher.remove_handler(_RAY_PRINTER)
        dispatcher.add_handler(_RAY_PRINTER, self)
        # the raylet's error notices ("A worker died or was killed ...") bypass the dispatcher: the driver's
        # error listener calls this module function by name
        self.saved_print = getattr(ray_worker, "print_to_stdstream", None)
        if self.saved_print is not None:
            ray_worker.print_to_stdstream = lambda data, ignore_prefix=False: self(data)

    def close(self) -> None:
        if getattr(self, "saved_print", None) is not None:
            import ray._private.worker as ray_worker

            ray_worker.print_to_stdstream = self.saved_print
        self.logger.removeHandler(self.handler)
        for h in self.saved:
            self.logger.addHandler(h)
        self.file.close()


@contextmanager
def on_worker_lines(fn: Callable[[str], None]) -> Iterator[None]:
    """Within the block, `fn(line)` is called with every line of worker/actor output Ray forwards to this
    driver (on Ray's log thread; exceptions in `fn` are swallowed so they cannot stop Ray's logging)."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        yield
        return
    name = f"recsys_lines_{id(fn)}"

    def handle(data: dict) -> None:
        for line in data.get("lines", []):
            try:
                fn(line)
            except Exception:  # noqa: BLE001 - a progress display must never break the job
                pass

    dispatcher.add_handler(name, handle)
    try:
        yield
    finally:
        dispatcher.remove_handler(name)


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
    sink = _FileSink(_LOG_FILE) if _LOG_FILE is not None else None
    if sink is not None:
        log_to_driver = True  # forwarded to the driver, then written to the file by the sink
    common = dict(
        include_dashboard=os.environ.get("RECSYS_RAY_DASHBOARD", "0") == "1",
        logging_level=logging.WARNING,
        log_to_driver=log_to_driver,
        ignore_reinit_error=False,
    )
    # Ray Data logs every dataset execution at INFO; our jobs report their own progress.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        if address is not None:
            # A cluster fixes its own CPUs and object store; passing them here is an error in Ray.
            ray.init(address=address, **common)
        else:
            # address "local": a new instance; with None, Ray joins the last cluster started on this machine
            # (/tmp/ray/ray_current_cluster, e.g. a benchmark's multi-node cluster) and rejects num_cpus
            ray.init(
                address="local",
                num_cpus=num_cpus if num_cpus is not None else os.cpu_count(),
                object_store_memory=object_store_mb * MiB if object_store_mb else None,
                **common,
                **ray_loopback_only(),
            )
    except BaseException:
        if sink is not None:
            sink.close()
        raise
    if sink is not None:
        sink.attach()
        global _SINK
        _SINK = sink
    return True


_SINK: _FileSink | None = None  # the file sink of the Ray this process started, closed by shutdown_ray


def shutdown_ray() -> None:
    """ray.shutdown(), then the log file (if any) closed and Ray's driver logger restored."""
    import ray

    global _SINK
    try:
        ray.shutdown()
    finally:
        if _SINK is not None:
            _SINK.close()
            _SINK = None


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

    started = init_ray(address, num_cpus, object_store_mb, log_to_driver)
    try:
        yield resources()
    finally:
        if started:
            shutdown_ray()
