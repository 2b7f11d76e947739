"""Bundles: export then load scores identically; tampering and missing files are caught; no pickle."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recsys.bundle import FILES, BundleError, export_bundle, load_bundle
from recsys.config.experiment import load_experiment
from recsys.config.presets import preset_path
from recsys.train.step import make_optimizers, train_step
from recsys.train.trainer import predict, user_subset


@pytest.fixture(scope="module")
def data(bench_dataset):
    return user_subset(bench_dataset, 15)


@pytest.mark.parametrize("name", ["dare", "twin", "din"])
def test_export_then_load_gives_identical_scores(name, data, tmp_path):
    from recsys.data.sequences import iterate_batches
    from recsys.models import build_model

    cfg = load_experiment(preset_path("tiny"), {"model": {"name": name}})
    torch.manual_seed(0)
    model = build_model(cfg.model, data.n_items, data.n_cates)
    opt = make_optimizers(model, cfg.train)
    for i, b in enumerate(iterate_batches(data.store, data.splits["train"], 20, 256, shuffle=True, seed=0)):
        train_step(model, b, opt, 1.0)
        if i == 4:
            break
    model.eval()
    before = predict(model, data, "val", 20)
    d = export_bundle(model, cfg, tmp_path / "b", {"val": {"auc": 0.5}}, data)
    assert sorted(p.name for p in d.iterdir()) == sorted(FILES)
    b = load_bundle(d)
    assert not b.model.training and b.id_space["n_items"] == data.n_items and b.id_space["max_len"] == 20
    # the benchmark's dense ids are its catalogue ids: the identity vocabulary, with each item's category
    assert b.vocab.item_ids.tolist() == list(range(1, data.n_items))
    assert (b.vocab.item_cate[data.store.item] == data.store.cate).all()
    after = predict(b.model, data, "val", 20)
    np.testing.assert_array_equal(before.probs, after.probs)
    if before.indices is not None:
        np.testing.assert_array_equal(before.indices, after.indices)
    # the version is a content hash: the same weights and config give the same version
    again = export_bundle(b.model, b.config, tmp_path / "c", {}, data)
    assert (again / "VERSION").read_text() == (d / "VERSION").read_text()


def test_tampered_or_incomplete_bundles_are_rejected(data, tmp_path):
    from recsys.models import build_model

    cfg = load_experiment(preset_path("tiny"))
    torch.manual_seed(0)
    d = export_bundle(build_model(cfg.model, data.n_items, data.n_cates), cfg, tmp_path / "b", {}, data)
    ids = (d / "id_space.json").read_text()
    (d / "id_space.json").write_text(ids.replace('"n_items": ', '"n_items": 1'))  # more rows: OOV ids change
    with pytest.raises(BundleError, match="VERSION"):
        load_bundle(d)
    (d / "id_space.json").write_text(ids)
    load_bundle(d)
    # the vocabulary decides which catalogue id is which row: another one under the same VERSION is refused
    from recsys.vocab import Vocabulary

    v = load_bundle(d).vocab
    vocab = (d / "vocab.safetensors").read_bytes()
    Vocabulary(v.item_ids + 1, v.cate_ids, v.item_cate).save(d / "vocab.safetensors")
    with pytest.raises(BundleError, match="VERSION"):
        load_bundle(d)
    (d / "vocab.safetensors").write_bytes(vocab)
    load_bundle(d)
    (d / "config.yaml").write_text((d / "config.yaml").read_text().replace("top_k: 4", "top_k: 5"))
    with pytest.raises(BundleError, match="VERSION"):
        load_bundle(d)
    (d / "metrics.json").unlink()
    with pytest.raises(BundleError, match="metrics.json"):
        load_bundle(d)
