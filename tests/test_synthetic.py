"""Synthetic generator: the hidden rule and the evidence are re-derived by a per-row reference from the
written events; determinism, chunking, long users, config validation, and describe()."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from recsys.config import ConfigError, load_yaml
from recsys.config.data import EventsPerUser, SyntheticConfig
from recsys.data.report import describe
from recsys.data.sequences import load_dataset
from recsys.data.synthetic import generate

SMALL = SyntheticConfig(n_users=60, events_per_user=EventsPerUser(mean=600, sigma=0.8, min=30, max=4000),
                        n_items=5000, n_cates=40, target_rate=0.05, chunk_events=8000, seed=3)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn")
    return out, generate(SMALL, out)


def reference_rows(ds, split, cfg):
    """Per row, from the events alone: the rule's label, the evidence, and whether it is far back."""
    s = ds.splits[split]
    for r in range(len(s)):
        hist = ds.store.user_events(int(s.user[r]))[0][: s.pos[r]]
        occ = np.flatnonzero((hist - 1) // cfg.family_size == (s.item[r] - 1) // cfg.family_size)
        far = len(occ) > 0 and occ[-1] < s.pos[r] - cfg.window
        yield r, len(occ) > 0, occ[-cfg.max_evidence:], far


def test_labels_and_evidence_follow_the_hidden_rule(small):
    out, meta = small
    ds = load_dataset(out)
    assert ds.store.n_users == SMALL.n_users and len(ds.store.item) == meta["n_events"]
    far, positives = 0, 0
    for split in ("train", "val", "test"):
        s = ds.splits[split]
        assert len(s) == meta["rows"][split] and len(s) % 3 == 0
        assert (s.label.reshape(-1, 3) == [1, 0, 0]).all()
        for r, label, evidence, is_far in reference_rows(ds, split, SMALL):
            assert bool(s.label[r]) == label, (split, r)
            np.testing.assert_array_equal(s.evidence[r], evidence)
            positives += label
            far += is_far
    assert positives == meta["positives"]
    assert far / positives == pytest.approx(meta["far_positive_share"])
    assert far / positives > 0.25  # a short window misses these; a lifelong search does not


def test_a_short_window_cannot_see_far_positives(small):
    """The rule restricted to the last `window` events (what a short-window model can know) mislabels
    every far positive; the full history labels every row."""
    out, meta = small
    ds = load_dataset(out)
    wrong_short, rows = 0, 0
    for r, label, _, is_far in reference_rows(ds, "test", SMALL):
        s = ds.splits["test"]
        h = ds.store.user_events(int(s.user[r]))[0][max(0, s.pos[r] - SMALL.window): s.pos[r]]
        short = ((h - 1) // SMALL.family_size == (s.item[r] - 1) // SMALL.family_size).any()
        wrong_short += short != label
        rows += 1
        assert short == label or is_far
    assert wrong_short / rows > 0.05


def test_events_are_in_the_benchmark_format(small):
    out, meta = small
    ev = pq.read_table(out / "events.parquet").to_pandas()
    assert ev.user.is_monotonic_increasing
    assert (ev.groupby("user").pos.apply(lambda p: (p.to_numpy() == np.arange(len(p))).all())).all()
    assert (ev.groupby("user").ts.apply(lambda t: t.is_monotonic_increasing)).all()
    assert ev.item.min() >= 1 and ev.item.max() <= SMALL.n_items and ev.cate.min() >= 1
    assert (ev.groupby("item").cate.nunique() == 1).all()
    # Zipf popularity: the top 1% of items carry a large share of events.
    counts = np.sort(ev.item.value_counts().to_numpy())[::-1]
    assert counts[: SMALL.n_items // 100].sum() / counts.sum() > 0.2
    # Long-lived interests: in long histories some category recurs in every tenth of the history.
    recur = []
    for _, g in ev.groupby("user"):
        if len(g) >= 1000:
            tenths = np.array_split(g.cate.to_numpy(), 10)
            recur.append(len(set.intersection(*(set(t.tolist()) for t in tenths))) > 0)
    assert len(recur) >= 5 and np.mean(recur) > 0.9
    d = describe(out)
    assert (d["users"], d["events"]) == (SMALL.n_users, meta["n_events"])
    assert d["history_length"]["max"] == meta["history_length"]["max"]
    assert d["rows"] == meta["rows"] and d["source"] == "synthetic"


def test_deterministic_and_seeded(small, tmp_path):
    out, meta = small
    generate(SMALL, tmp_path / "a")
    generate(SMALL.model_copy(update={"seed": 4}), tmp_path / "b")
    for name in ("events", "train", "test"):
        a = pq.read_table(tmp_path / "a" / f"{name}.parquet")
        assert a.equals(pq.read_table(out / f"{name}.parquet"))
        assert not a.equals(pq.read_table(tmp_path / "b" / f"{name}.parquet"))
    generate(SMALL, tmp_path / "a")  # overwrite in place: same content, nothing appended
    assert pq.read_table(tmp_path / "a" / "train.parquet").num_rows == meta["rows"]["train"]


def test_users_of_100k_events(tmp_path):
    cfg = SyntheticConfig(n_users=2, events_per_user=EventsPerUser(mean=100_000, sigma=0, min=100_000, max=100_000),
                          n_items=50_000, n_cates=50, target_rate=0.002, chunk_events=50_000, seed=1)
    meta = generate(cfg, tmp_path)
    ds = load_dataset(tmp_path)
    assert ds.store.lengths.tolist() == [100_000, 100_000] and meta["n_events"] == 200_000
    s = ds.splits["test"]
    for r in range(0, len(s), 97):  # spot-check the rule on the long histories
        hist = ds.store.user_events(int(s.user[r]))[0][: s.pos[r]]
        fam = (hist - 1) // cfg.family_size
        assert bool(s.label[r]) == ((s.item[r] - 1) // cfg.family_size in set(fam.tolist()))


def test_config_from_yaml_names_bad_keys(tmp_path):
    p = tmp_path / "data.yaml"
    p.write_text("n_users: 10\nevents_per_user: {mean: 50, min: 10, max: 100}\n")
    cfg = load_yaml(p, SyntheticConfig)
    assert cfg.n_users == 10 and cfg.events_per_user.max == 100
    p.write_text("n_users: 10\nevents_per_user: {mean: 50, maxx: 3}\n")
    with pytest.raises(ConfigError, match=r"data.yaml: events_per_user.maxx: unknown key"):
        load_yaml(p, SyntheticConfig)
    p.write_text("n_users: ten\n")
    with pytest.raises(ConfigError, match=r"data.yaml: n_users"):
        load_yaml(p, SyntheticConfig)
    with pytest.raises(ConfigError, match="p_interest"):
        load_yaml(p, SyntheticConfig, overrides={"n_users": 1, "p_interest": 0.8, "p_drift": 0.5})


NOISY = SMALL.model_copy(update={"label_noise": 0.2, "n_users": 30})


def test_bayes_ceiling_equals_brute_force(small, tmp_path):
    """p_label is P(label = 1 | full history, target): recomputed per row from the written events by brute
    force (scan the whole history for the target's family: 1 - noise if found, noise if not); the labels are
    the rule's flipped at the noise rate; noise changes labels only (events, items, evidence as without it);
    meta's ceiling AUC is the AUC of that brute-force score."""
    from recsys.metrics import auc

    meta = generate(NOISY, tmp_path / "noisy")
    clean = generate(NOISY.model_copy(update={"label_noise": 0.0}), tmp_path / "clean")
    ds, ds0 = load_dataset(tmp_path / "noisy"), load_dataset(tmp_path / "clean")
    eps, fires_all, flipped = NOISY.label_noise, [], []
    for split in ("train", "val", "test"):
        s, s0 = ds.splits[split], ds0.splits[split]
        np.testing.assert_array_equal(s.item, s0.item)
        brute = np.empty(len(s))
        for r in range(len(s)):
            hist = ds.store.user_events(int(s.user[r]))[0][: s.pos[r]]
            seen = any((h - 1) // NOISY.family_size == (s.item[r] - 1) // NOISY.family_size for h in hist.tolist())
            brute[r] = 1 - eps if seen else eps
            fires_all.append(seen)
            flipped.append(bool(s.label[r]) != seen)
            np.testing.assert_array_equal(s.evidence[r], s0.evidence[r])
        np.testing.assert_allclose(s.p_label, brute, rtol=0, atol=1e-6)
        assert meta["ceiling_auc"][split] == pytest.approx(auc(s.label, brute))
        assert s0.p_label.tolist() == [float(f) for f in s0.label]  # no noise: deterministic, ceiling 1
        assert clean["ceiling_auc"][split] == 1.0
    flipped = np.array(flipped)
    assert abs(flipped.mean() - eps) < 4 * np.sqrt(eps * (1 - eps) / len(flipped))
    assert 0.75 < meta["ceiling_auc"]["test"] < 0.95
