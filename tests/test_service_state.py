"""The model-state bridge: the memory branches' states (Aaren and Titans of a real DARE) streamed through
the real stream worker (in batches, out of order, with replays) equal the states computed in one parallel
pass over the same stored history, and their reads equal the offline timeline reads."""

from __future__ import annotations

import random
import uuid

import numpy as np
import pytest
import redis
import torch

from recsys.config.model import ModelConfig
from recsys.config.serve import ServeConfig, StateStoreConfig, StreamConfig
from recsys.data.sequences import load_store
from recsys.models import build_model
from service.model_state import ModelStateUpdater, ServingModel, decode_states
from service.redis_conn import connect
from service.state import Event, StateStore
from service.stream import EventStream, StreamWorker
from test_service_support import cleanup_server_keys


def serving_with_branches(n_items: int, n_cates: int) -> ServingModel:
    torch.manual_seed(0)
    cfg = ModelConfig(max_len=32, top_k=4, dim_rep=8, dim_att=4, mlp=[8], init_std=0.3, aaren=True, titans=True,
                      titans_chunk_size=4)
    return ServingModel(build_model(cfg, n_items, n_cates), "branches-v1", n_items, n_cates, 32)


@pytest.mark.parametrize("backend", ["embedded", "server"])
def test_streamed_state_equals_batch_state(backend, backend_url, bench_dir, tmp_path):
    store_data = load_store(bench_dir / "events.parquet")
    serving = serving_with_branches(int(store_data.item.max()) + 1, int(store_data.cate.max()) + 1)
    updater = ModelStateUpdater(serving)
    prefix = f"t{uuid.uuid4().hex[:10]}:"
    state_cfg = StateStoreConfig(data_dir=str(tmp_path / "redis"), key_prefix=prefix, seq_cap=1_000,
                                 redis_url=backend_url)
    cfg = ServeConfig(state=state_cfg, stream=StreamConfig(partitions=2, batch_size=40, block_ms=10))
    users = [1, 4, 9]
    events = []
    for u in users:
        item, cate, ts = store_data.user_events(u)
        events += [Event(f"u{u}-{j}", u, int(item[j]), int(cate[j]), 0, int(ts[j]) * 1000 + j)
                   for j in range(min(len(item), 70))]
    rng = random.Random(1)
    in_order = sorted(events, key=lambda e: e.ts)
    # first half in time order (the fold-forward path), then the rest shuffled (out of order: rebuilds),
    # then a replay of 30 events (no-ops)
    half = len(in_order) // 2
    rest = in_order[half:]
    rng.shuffle(rest)
    handle = connect(state_cfg)
    try:
        stream = EventStream(handle.client, cfg)
        worker = StreamWorker(cfg, updater, client=handle.client, consumer="w1")
        for chunk in (in_order[:half], rest, in_order[:30]):
            stream.append(chunk)
            worker.run(until_idle=True)
        assert worker.totals.applied == len(events) and worker.totals.duplicates == 30

        store = StateStore(handle.client, state_cfg)
        views = store.read_users(users, serving.version)
        br = updater.branches
        for u, view in zip(users, views):
            assert view.state is not None, f"user {u}: no current state"
            got_a, got_t = decode_states(view.state, serving.version)
            # batch: the same stored history in one parallel pass
            with torch.inference_mode():
                x, lengths = updater._features([view.sequence])
                want_a = br.aaren.forward_state(x, lengths)
                want_t = br.titans.forward_state(x, lengths)
                for name in ("m", "u", "w", "x_last", "n"):
                    torch.testing.assert_close(getattr(got_a, name), getattr(want_a, name), rtol=1e-5, atol=1e-5)
                for a, b in zip(got_t.weights + got_t.momentum, want_t.weights + want_t.momentum):
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(got_t.buffer, want_t.buffer)
                assert int(got_t.count) == int(want_t.count) and int(got_t.n) == len(view.sequence)
                # and the reads agree with the offline forward over the history
                q = torch.randn(1, 24)
                torch.testing.assert_close(br.aaren.read(got_a), br.aaren.forward(x, lengths), rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(br.titans.read(got_t, q), br.titans.forward(x, lengths, q),
                                           rtol=1e-5, atol=1e-5)
            # the stored sequence is the user's events in time order
            mine = sorted((e for e in events if e.user_id == u), key=lambda e: e.ts)
            assert view.sequence["item"].tolist() == [e.item_id for e in mine]
    finally:
        handle.close()
        if backend_url is not None:
            cleanup_server_keys(backend_url, prefix)


def test_state_bytes_refuse_another_version():
    serving = serving_with_branches(50, 5)
    updater = ModelStateUpdater(serving)
    rec = np.zeros(3, dtype=__import__("service.state", fromlist=["SEQ_DTYPE"]).SEQ_DTYPE)
    rec["item"], rec["cate"], rec["ts"] = [1, 2, 3], [1, 1, 2], [1, 2, 3]
    (blob,) = updater.rebuild([rec])
    a, t = decode_states(blob, serving.version)
    assert int(a.n) == 3 and int(t.n) == 3
    with pytest.raises(ValueError, match="model_version"):
        decode_states(blob, "other-version")
    with pytest.raises(ValueError, match="header|magic"):
        decode_states(blob[:-5], serving.version)
    assert redis  # the module is imported for the server backend's cleanup helper
