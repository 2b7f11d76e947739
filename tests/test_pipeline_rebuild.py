"""The Ray state-rebuild job: every user's Aaren state, rebuilt by Ray actors from sequences stored in the
real Redis server, equals the state computed in this process from the same sequence; each user is
written exactly once per run, and a re-run rewrites every state once more."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import ray
import redis
import torch

from pipelines.rebuild_state import run_rebuild_state
from pipelines.runtime import init_ray
from recsys.modules.aaren import Aaren
from recsys.modules.state_codec import decode, encode, to_tensors

DB, PREFIX, VERSION, D = 11, "test_pipeline_rebuild:", "v-rebuild-test", 8
N_USERS = 50

# Ray workers cannot import this test module: ship its functions to them by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def aaren_state(items: np.ndarray) -> bytes:
    """The 'model': a seeded item table and Aaren module; the state after the user's whole sequence."""
    g = torch.Generator().manual_seed(0)
    table = torch.randn(10_000, D, generator=g)
    torch.manual_seed(0)
    model = Aaren(d_in=D).eval()
    x = table[torch.from_numpy(items % 10_000)][None]                # [1, L, D] oldest first
    with torch.no_grad():
        return encode(model.forward_state(x, torch.tensor([len(items)])), VERSION)


@pytest.fixture(scope="module")
def store(bench_dataset):
    r = redis.Redis(db=DB)
    for k in r.scan_iter(f"{PREFIX}*"):
        r.delete(k)
    s = bench_dataset.store
    users = np.arange(N_USERS)
    for u in users:
        r.set(f"{PREFIX}seq:{u}", s.user_events(int(u))[0][-300:].astype(np.int64).tobytes())
    yield r, users
    for k in r.scan_iter(f"{PREFIX}*"):
        r.delete(k)


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    started = init_ray(num_cpus=2, object_store_mb=128)
    yield
    if started:
        ray.shutdown()


def test_rebuild_equals_in_process_states(store):
    r, users = store

    def make_rebuilder():
        conn = redis.Redis(db=DB)

        def rebuild(batch):
            for u in batch:
                items = np.frombuffer(conn.get(f"{PREFIX}seq:{u}"), dtype=np.int64)
                conn.set(f"{PREFIX}state:{u}", aaren_state(items))
                conn.incr(f"{PREFIX}writes:{u}")
            return len(batch)

        return rebuild

    out = run_rebuild_state(users, make_rebuilder, workers=2, chunk=8)
    assert out["users"] == out["rebuilt"] == N_USERS and out["chunks"] == 7
    for u in users:
        items = np.frombuffer(r.get(f"{PREFIX}seq:{u}"), dtype=np.int64)
        got = to_tensors(decode(r.get(f"{PREFIX}state:{u}"), VERSION, "aaren"))  # loadable for this version
        want = to_tensors(decode(aaren_state(items), VERSION, "aaren"))
        assert got.keys() == want.keys()
        for k in want:  # actors run 1 torch thread, this process more: equal up to float reassociation
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=f"user {u} {k}")
        assert int(r.get(f"{PREFIX}writes:{u}")) == 1
    again = run_rebuild_state(users, make_rebuilder, workers=2, chunk=16)
    assert again["rebuilt"] == N_USERS
    assert all(int(r.get(f"{PREFIX}writes:{u}")) == 2 for u in users)


def test_duplicate_users_are_an_error():
    with pytest.raises(ValueError, match="duplicate"):
        run_rebuild_state([1, 2, 2], lambda: (lambda b: len(b)))
