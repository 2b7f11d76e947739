"""The trainer on a real subset: deterministic, resumable to the same result, logged, evaluable."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from recsys.config.experiment import load_experiment
from recsys.config.presets import preset_path
from recsys.train import evaluate, score, train
from recsys.train.trainer import user_subset

TINY = preset_path("tiny")


@pytest.fixture(scope="module")
def data(bench_dataset):
    return user_subset(bench_dataset, 12)


def _cfg(data, epochs):
    spe = math.ceil(len(data.splits["train"]) / 512)
    return load_experiment(TINY, {"train": {"batch_size": 512, "epochs": epochs, "eval_every": 3}}), spe


def test_resume_gives_the_same_result_as_an_uninterrupted_run(data, tmp_path):
    cfg, spe = _cfg(data, 2.0)
    full = train(cfg, tmp_path / "full", dataset=data, evaluate_test=False)
    assert full.steps == 2 * spe

    # interrupted inside epoch 2, at a validation step (checkpoints are written at validations)
    stop = 3 * ((spe + 2) // 3 + 1)
    assert spe < stop < 2 * spe
    part_cfg = load_experiment(cfg, {"train": {"epochs": (stop - 0.5) / spe}})
    part = train(part_cfg, tmp_path / "resumed", dataset=data, evaluate_test=False)
    assert part.steps == stop
    resumed = train(cfg, tmp_path / "resumed", dataset=data, resume=True, evaluate_test=False)
    assert resumed.steps == full.steps and resumed.best_step == full.best_step
    assert resumed.best_val == full.best_val

    a = load_file(tmp_path / "full" / "checkpoint" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "checkpoint" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log_a = [json.loads(x) for x in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    log_b = [json.loads(x) for x in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert log_a == log_b and [r["step"] for r in log_a] == list(range(3, 2 * spe + 1, 3)) + ([2 * spe] if (2 * spe) % 3 else [])


def test_config_path_evaluate_and_score_agree(data, tmp_path):
    cfg, _ = _cfg(data, 0.5)
    r = train(cfg, tmp_path / "run", dataset=data)
    assert r.best_val["auc"] > 0.5 and r.test is not None and r.peak_rss_mb > 0
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["best_step"] == r.best_step
    from recsys.bundle import load_bundle

    b = load_bundle(r.bundle_dir)
    from recsys.metrics import auc

    p = score(b.model, data, "test")
    assert len(p) == len(data.splits["test"])
    assert auc(data.splits["test"].label, p) == pytest.approx(r.test["auc"], abs=1e-12)
    # evaluate() reads the bundle's own dataset (the full benchmark): every test row scored
    assert evaluate(r.bundle_dir, "test")["rows"] == 30_279


def test_yaml_path_is_accepted_and_bad_keys_are_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: x\nmodel:\n  nmae: dare\n")
    from recsys.config import ConfigError

    with pytest.raises(ConfigError, match="model.nmae"):
        train(bad, tmp_path / "out")


def test_validation_on_a_user_share_scores_exactly_those_users(data, tmp_path):
    """`val_users`: every validation scores the val rows of a fixed share of the users, and its metrics are
    the best weights' metrics on exactly those rows; the share depends on the user id alone (so N ranks
    holding user ranges pick the rows one process picks)."""
    import dataclasses

    import numpy as np

    from recsys.bundle import load_bundle
    from recsys.data.sequences import user_share
    from recsys.train.evaluation import split_metrics

    val = data.splits["val"]
    mask = user_share(val.user, 0.5)
    assert 0 < mask.sum() < len(val)
    # a function of the id alone: any subset or order of the users picks the same ones
    order = np.random.default_rng(0).permutation(len(val))
    assert np.array_equal(user_share(val.user[order], 0.5), mask[order])
    assert not user_share(np.arange(1 << 16), 0.25)[::2].all() and 0.2 < user_share(np.arange(1 << 16), 0.25).mean() < 0.3

    cfg, _ = _cfg(data, 0.5)
    cfg = load_experiment(cfg, {"train": {"val_users": 0.5}})
    r = train(cfg, tmp_path / "run", dataset=data, evaluate_test=False)
    sampled = dataclasses.replace(data, splits={**data.splits, "val": val.take(mask)})
    want = split_metrics(load_bundle(r.bundle_dir).model, sampled, "val", cfg.model.max_len)
    assert r.best_val["rows"] == int(mask.sum())
    for k in ("auc", "gauc", "cate_auc", "logloss"):
        assert r.best_val[k] == want[k], k
