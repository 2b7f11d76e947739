"""The Ray state-rebuild job: every user's Aaren state, rebuilt by Ray actors from sequences stored in the
Redis server this session started, equals the state computed in this process from the same sequence; each user is
written exactly once per run, and a re-run rewrites every state once more."""

from __future__ import annotations

import sys
import uuid

import numpy as np
import pytest
import ray
import redis
import torch

from pipelines.rebuild_state import run_rebuild_state
from pipelines.runtime import init_ray
from recsys.modules.aaren import Aaren
from recsys.modules.state_codec import decode, encode, to_tensors

PREFIX, VERSION, D = "test_pipeline_rebuild:", "v-rebuild-test", 8
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
def store(bench_dataset, redis_server):
    r = redis.Redis.from_url(redis_server)
    for k in r.scan_iter(f"{PREFIX}*"):
        r.delete(k)
    s = bench_dataset.store
    users = np.arange(N_USERS)
    for u in users:
        r.set(f"{PREFIX}seq:{u}", s.user_events(int(u))[0][-300:].astype(np.int64).tobytes())
    yield r, users, redis_server
    for k in r.scan_iter(f"{PREFIX}*"):
        r.delete(k)


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    started = init_ray(num_cpus=2, object_store_mb=128)
    yield
    if started:
        ray.shutdown()


def test_rebuild_equals_in_process_states(store):
    r, users, url = store

    def make_rebuilder():
        conn = redis.Redis.from_url(url)

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


def test_rebuild_from_the_event_log_equals_the_streamed_lifelong_state(redis_server, tmp_path):
    """Users with more events than the sequence cap: the streamed state (folded forward, one event at a time)
    covers all of them. A new version's states rebuilt by the Ray job from the offline log (the first 70%
    of each user's events) plus the stored sequence equal it; rebuilt from the capped sequence alone they
    do not (the far past is missing), which is why the log is needed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from recsys.bundle import export_bundle
    from recsys.config.experiment import ExperimentConfig
    from recsys.config.model import ModelConfig
    from recsys.config.serve import StateStoreConfig
    from recsys.models import build_model
    from service.event_log import LogRebuild
    from service.model_state import ModelStateUpdater, ServingModel, decode_states
    from service.redis_conn import connect
    from service.state import Event, StateStore

    torch.manual_seed(0)
    cfg = ExperimentConfig(data="unused", model=ModelConfig(max_len=16, top_k=4, dim_rep=4, dim_att=4, mlp=[8],
                                                            init_std=0.3, aaren=True, titans=True, titans_chunk_size=4))
    bundle = str(export_bundle(build_model(cfg.model, 50, 6), cfg, tmp_path / "bundle", metrics={}))
    rng = np.random.default_rng(0)
    counts = {0: 25, 1: 90, 2: 120, 3: 61}
    events = {u: [Event(f"u{u}-{j}", u, int(rng.integers(1, 50)), int(rng.integers(1, 6)), 0, 1_000 * j + u)
                  for j in range(n)] for u, n in counts.items()}
    log_rows = [e for u in counts for e in events[u][: int(0.7 * counts[u])]]
    pq.write_table(pa.table({"event_id": [e.event_id for e in log_rows], "user_id": [e.user_id for e in log_rows],
                             "item_id": [e.item_id for e in log_rows], "category_id": [e.category_id for e in log_rows],
                             "action": pa.array([e.action for e in log_rows], pa.int8()),
                             "ts": [e.ts for e in log_rows]}), tmp_path / "log.parquet")
    state_cfg = StateStoreConfig(redis_url=redis_server, key_prefix=f"rebuild-log-{uuid.uuid4().hex[:8]}:", seq_cap=40,
                                 seq_slack=4)
    serving = ServingModel.from_bundle(bundle)
    with connect(state_cfg) as handle:
        store = StateStore(handle.client, state_cfg)
        streamed = ModelStateUpdater(serving)
        for j in range(0, 120, 7):  # in time order, a few events per user per batch: folded forward
            store.apply(streamed, [e for u in counts for e in events[u][j:j + 7]])
        want = dict(zip(counts, (v.state for v in store.read_users(list(counts), serving.version))))
        assert all(want.values())
        # a "new version": the same weights under another version string, so its states must equal these
        other = ServingModel(serving.model, "v-from-log", serving.n_items, serving.n_cates, serving.max_len)

        def compare(version_states, expect_equal: bool) -> None:
            for u in counts:
                a = decode_states(want[u], serving.version)
                b = decode_states(version_states[u], other.version)
                close = all(torch.allclose(x, y, rtol=1e-5, atol=1e-5)
                            for sa, sb in zip(a, b) for x, y in zip(to_tensors(sa).values(), to_tensors(sb).values()))
                assert close == (expect_equal or counts[u] <= 40), f"user {u}"

        capped = ModelStateUpdater(other)
        store.rebuild(capped, list(counts))
        compare(dict(zip(counts, (v.state for v in store.read_users(list(counts), other.version)))), False)

    job = LogRebuild(state_cfg, bundle, str(tmp_path / "log.parquet"))
    # the job loads the bundle, whose version differs from "v-from-log": rebuild under the bundle's own
    # version after moving the streamed states aside
    with connect(state_cfg) as handle:
        store = StateStore(handle.client, state_cfg)
        for u in counts:
            handle.client.delete(store.keys.user(u).state(serving.version))
    out = run_rebuild_state(list(counts), job, workers=2, chunk=2)
    assert out["rebuilt"] == len(counts)
    with connect(state_cfg) as handle:
        got = {u: v.state for u, v in zip(counts, StateStore(handle.client, state_cfg).read_users(list(counts), serving.version))}
    for u in counts:
        a, b = decode_states(want[u], serving.version), decode_states(got[u], serving.version)
        for sa, sb in zip(a, b):
            for k, x in to_tensors(sa).items():
                torch.testing.assert_close(to_tensors(sb)[k], x, rtol=1e-5, atol=1e-5, msg=f"user {u} {k}")
