"""Catalogue (raw) ids through the service: events are stored with the ids the client sent, each bundle maps
them with its own vocabulary, so a retrain that renumbers the dense ids leaves stored histories correct.

The offline side builds each model's dense history with a plain dict from the catalogue definitions below,
not with recsys.vocab, and scores it with the model's batch forward."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from recsys.bundle import export_bundle, load_bundle
from recsys.config.experiment import ExperimentConfig
from recsys.config.model import ModelConfig
from recsys.data.sequences import Samples, SequenceStore, assemble
from recsys.models import build_model
from recsys.vocab import Vocabulary
from test_service_support import API_KEY, live, service_config, wait_applied

MAX_LEN = 16
# Raw ids past u32, as 64-bit catalogue ids are: items 0..29, categories 0..4, item k in category k % 5.
RAW_ITEMS = [10**10 + 1000 * k for k in range(30)]
RAW_CATES = [7 * 10**9 + c for c in range(5)]
ITEM_CATE = {RAW_ITEMS[k]: RAW_CATES[k % 5] for k in range(30)}
# Model A was trained before items 25..29 and category 4 existed. Model B's data also had three items and a
# category with smaller raw ids than every old one: each old item's dense id moves by 3, each category's by 1.
VOCABS = {
    "a": (RAW_ITEMS[:25], RAW_CATES[:4]),
    "b": ([3, 4, 5] + RAW_ITEMS, [9] + RAW_CATES),
}


def _dense_maps(name: str) -> tuple[dict[int, int], dict[int, int]]:
    items, cates = VOCABS[name]
    return {r: i + 1 for i, r in enumerate(items)}, {r: c + 1 for c, r in enumerate(cates)}


def _bundle(name: str, out, seed: int) -> str:
    items, cates = VOCABS[name]
    _, cmap = _dense_maps(name)
    item_cate = [0] + [cmap.get(ITEM_CATE.get(r, -1), 0) for r in items]
    torch.manual_seed(seed)
    cfg = ExperimentConfig(data="benchmarks/ml-latest-small", model=ModelConfig(
        max_len=MAX_LEN, top_k=4, dim_rep=8, dim_att=4, mlp=[16], init_std=0.3, aaren=True))
    model = build_model(cfg.model, len(items) + 1, len(cates) + 1).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, as a trained model has
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    vocab = Vocabulary(np.array(items), np.array(cates), np.array(item_cate))
    return str(export_bundle(model, cfg, out, metrics={}, vocab=vocab))


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    d = tmp_path_factory.mktemp("catalogue")
    return {"a": _bundle("a", d / "a", seed=11), "b": _bundle("b", d / "b", seed=12)}


def _offline(bundle: str, name: str, history: list[tuple[int, int]], cands: list[tuple[int, int | None]]) -> np.ndarray:
    """Model `name`'s batch forward on the raw history (oldest first) and candidates mapped with its own
    catalogue dicts (unknown -> 0, the zeroed out-of-vocabulary row; a missing category: the item's)."""
    from service.model_state import zero_oov_rows

    imap, cmap = _dense_maps(name)
    model = load_bundle(bundle).model
    zero_oov_rows(model)
    h_item = np.array([imap.get(i, 0) for i, _ in history], np.int64)
    h_cate = np.array([cmap.get(c, 0) for _, c in history], np.int64)
    c_item = np.array([imap.get(i, 0) for i, _ in cands], np.int64)
    c_cate = np.array([cmap.get(ITEM_CATE[i] if c is None and imap.get(i) else c, 0) for i, c in cands], np.int64)
    n = len(history)
    store = SequenceStore(np.array([0, n + 1]), np.r_[h_item, 0], np.r_[h_cate, 0], np.arange(n + 1))
    samples = Samples(user=np.zeros(len(cands), np.int64), pos=np.full(len(cands), n, np.int64), item=c_item,
                      cate=c_cate, label=np.zeros(len(cands), np.float32))
    with torch.no_grad():
        return torch.sigmoid(model(assemble(store, samples, np.arange(len(cands)), MAX_LEN, trim=False)).logit).numpy()


@pytest.mark.parametrize("index_block", [256, 0])
def test_raw_ids_round_trip_through_a_retrain_with_a_shifted_vocabulary(index_block, bundles, redis_server, tmp_path):
    """Events (raw ids past u32) are ingested once under model A; a reload to model B, whose vocabulary
    renumbers every old item and category, rebuilds the memory state (and block index) from the stored raw
    ids; each model's served scores equal its offline scores on the same raw history. Items A never saw score
    as out of vocabulary under A and as themselves under B; candidates may leave out their category."""
    rng = random.Random(5)
    histories = {1: [rng.randrange(30) for _ in range(40)], 2: [rng.randrange(25) for _ in range(23)]}
    events = [{"event_id": f"u{u}-{j}", "user_id": u, "item_id": RAW_ITEMS[k], "category_id": ITEM_CATE[RAW_ITEMS[k]],
               "action": 0, "ts": 1_700_000_000_000 + 1000 * j} for u, ks in histories.items() for j, k in enumerate(ks)]
    rng.shuffle(events)
    raw_history = {u: [(RAW_ITEMS[k], ITEM_CATE[RAW_ITEMS[k]]) for k in ks] for u, ks in histories.items()}
    cands = [(RAW_ITEMS[k], None) for k in (0, 7, 26, 29)] + [(RAW_ITEMS[k], ITEM_CATE[RAW_ITEMS[k]]) for k in (3, 27)]
    cands += [(RAW_ITEMS[12], RAW_CATES[4]), (123_456, None), (123_456, RAW_CATES[1])]  # unknown category, item
    body = {"candidates": [{"item_id": i} if c is None else {"item_id": i, "category_id": c} for i, c in cands],
            "explain": True}
    cfg = service_config(redis_server, tmp_path, bundle=bundles["a"])
    cfg = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={
        "state": cfg.serve.state.model_copy(update={"index_block": index_block})})})
    with live(cfg) as (_, client):
        r = client.post("/v1/events", json={"events": events}, headers={"X-API-Key": API_KEY})
        assert r.status_code == 202, r.text
        wait_applied(client, {u: len(ks) for u, ks in histories.items()})
        for name in ("a", "b"):
            if name == "b":
                r = client.post("/v1/admin/reload", json={"bundle": bundles["b"]}, headers={"X-API-Key": API_KEY})
                assert r.status_code == 200 and r.json()["rebuilt_users"] == 2, r.text
            for u in histories:
                r = client.post("/v1/score", json={"user_id": u, **body})
                assert r.status_code == 200, r.text
                got = r.json()
                assert got["model_version"] == load_bundle(bundles[name]).version and got["memory"] == "stored"
                want = _offline(bundles[name], name, raw_history[u], cands)
                np.testing.assert_allclose(got["scores"], want, rtol=1e-5, atol=1e-6)
                # explanations name the events as the client sent them
                for row in got["explanations"]:
                    for ev in row:
                        assert (ev["item_id"], ev["category_id"]) == raw_history[u][len(raw_history[u]) - ev["position"]]
        # unknown candidate items per request: under A 26, 27, 29 (newer than its data) and 123456 twice; under
        # B only 123456, twice; unknown given categories: category 4 (for item 12) under A only. A category
        # left out is the item's and not counted again.
        metrics = client.get("/metrics").text
        assert f'recsys_score_oov_ids_total{{field="item"}} {2 * (5 + 2):.1f}' in metrics
        assert f'recsys_score_oov_ids_total{{field="category"}} {2 * 1:.1f}' in metrics
