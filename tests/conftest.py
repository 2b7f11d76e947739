import pytest

from recsys.paths import benchmark_dir, shared_dir


@pytest.fixture(scope="session")
def shared():
    path = shared_dir()
    assert path.is_dir(), f"shared data not found at {path} (set RECSYS_SHARED)"
    return path


@pytest.fixture(scope="session")
def bench_dataset(shared):
    from recsys.data.sequences import load_dataset

    return load_dataset(benchmark_dir())
