"""Session fixtures: the real data (skipped with the command that fetches it when absent) and a Redis 7
server the session starts itself (no test touches a server it did not start)."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

from helpers import start_redis_server, stop
from recsys.paths import FETCH_HINT, DataNotFoundError, benchmark_dir, raw_dir

# Property tests draw the same examples on every run (a seed per test): a rare example found on one run must
# not turn CI red on the next by chance, and one that fails is reproduced by running the test again. Tests
# decorated with their own @settings inherit this (the profile is loaded before test modules are imported).
settings.register_profile("repeatable", derandomize=True)
settings.load_profile("repeatable")

# Set by .ci/run: CI has the shared data, so a skipped test there is a test that silently stopped running.
NO_SKIP_ENV = "RECSYS_TEST_NO_SKIP"


def pytest_configure(config):
    # `service.redis_conn.connect` lets REDIS_URL override the embedded server: a developer's own Redis
    # named there must never receive test data.
    os.environ.pop("REDIS_URL", None)


def _found(find, *args):
    try:
        return find(*args)
    except DataNotFoundError:
        pytest.skip(f"real data not found: run `{FETCH_HINT}` (or set RECSYS_SHARED to the shared folder)")


@pytest.fixture(scope="session")
def bench_dir():
    """The fixed ml-latest-small benchmark folder."""
    return _found(benchmark_dir)


@pytest.fixture(scope="session")
def bench_dataset(bench_dir):
    from recsys.data.sequences import load_dataset

    return load_dataset(bench_dir)


@pytest.fixture(scope="session")
def movielens_dir():
    """The raw MovieLens ml-latest-small files."""
    return _found(raw_dir, "movielens/ml-latest-small")


@pytest.fixture(scope="session")
def taobao_csv():
    """The Taobao UserBehavior sample: in the project's shared folder only (its source has no public URL)."""
    try:
        return raw_dir("taobao-sample/UserBehavior.csv")
    except DataNotFoundError:
        pytest.skip("the Taobao sample is in the project's shared folder only: set RECSYS_SHARED to it")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> str:
    """-> the URL of a Redis 7 this session started on a free loopback port (no persistence)."""
    proc, port = start_redis_server(tmp_path_factory.mktemp("redis7"))
    yield f"redis://127.0.0.1:{port}/0"
    stop(proc)


@pytest.fixture
def backend_url(request, backend: str) -> str | None:
    """For a test parametrised by `backend`: the session's Redis 7 URL for 'server', None (embedded) else."""
    return request.getfixturevalue("redis_server") if backend == "server" else None


def pytest_sessionfinish(session, exitstatus):
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter else 0
    if skipped and os.environ.get(NO_SKIP_ENV) and session.exitstatus == 0:
        reporter.write_line(f"{NO_SKIP_ENV} is set and {skipped} test(s) were skipped: failing the run", red=True)
        session.exitstatus = 1
