"""ServingModel without HTTP or Redis: empty histories, out-of-vocabulary ids, and that the served model's
zeroed OOV rows leave every in-vocabulary score as the unmodified model computes it."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from recsys.config.model import ModelConfig
from recsys.data.batch import HistoryBatch
from recsys.models import build_model
from service.model_state import OOV_ID, ServingModel
from service.state import SEQ_DTYPE

N_ITEMS, N_CATES, MAX_LEN = 300, 12, 40


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(3)
    m = build_model(ModelConfig(name=name, max_len=MAX_LEN, top_k=5, dim_rep=8, dim_att=4, mlp=[16], init_std=0.3),
                    N_ITEMS, N_CATES)
    with torch.no_grad():  # non-trivial BatchNorm statistics, as a trained model has
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm1d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 2.0)
    return m.eval()


def _serving(model: torch.nn.Module) -> ServingModel:
    return ServingModel(model=copy.deepcopy(model), version="v-test", n_items=N_ITEMS, n_cates=N_CATES,
                        max_len=MAX_LEN)


def _seq(items, cates) -> np.ndarray:
    rec = np.zeros(len(items), dtype=SEQ_DTYPE)
    rec["item"], rec["cate"], rec["ts"] = items, cates, np.arange(len(items))
    return rec


def _batch(hist_item: list[int], hist_cate: list[int], cand_item, cand_cate, width: int) -> HistoryBatch:
    """The batch layout: the history most recent first, padded with 0 to `width` columns."""
    C, n = len(cand_item), len(hist_item)
    item = torch.zeros(C, width, dtype=torch.int64)
    cate = torch.zeros(C, width, dtype=torch.int64)
    pos = torch.zeros(C, width, dtype=torch.int64)
    item[:, :n] = torch.tensor(hist_item[::-1])
    cate[:, :n] = torch.tensor(hist_cate[::-1])
    pos[:, :n] = torch.arange(1, n + 1)
    return HistoryBatch(user=torch.zeros(C, dtype=torch.int64), target_item=torch.tensor(cand_item),
                        target_cate=torch.tensor(cand_cate), hist_item=item, hist_cate=cate, hist_pos=pos,
                        hist_len=torch.full((C,), n), label=torch.zeros(C))


@pytest.mark.parametrize("name", ["dare", "twin", "din"])
def test_empty_history_scores_as_the_batch_forward_with_length_zero(name):
    """A cold user: no model's serving entry point is asked to handle L = 0; the batch forward is."""
    model = _model(name)
    serving = _serving(model)
    cand_item, cand_cate = [5, 17, 250], [1, 2, 11]
    probs, idx, _ = serving.score(_seq([], []), None, torch.tensor(cand_item), torch.tensor(cand_cate))
    with torch.no_grad():
        want = torch.sigmoid(serving.model(_batch([], [], cand_item, cand_cate, width=7)).logit)
    torch.testing.assert_close(probs, want, rtol=1e-6, atol=1e-7)
    assert probs.shape == (3,) and torch.isfinite(probs).all()
    if idx is not None:
        assert (idx == -1).all()  # nothing retrieved


@pytest.mark.parametrize("name", ["dare", "twin", "din"])
def test_oov_ids_share_one_zero_embedding_and_leave_known_scores_alone(name):
    model = _model(name)
    serving = _serving(model)
    items, n_oov = serving.map_ids(np.array([7, N_ITEMS, N_ITEMS + 10**9, 0, N_ITEMS - 1]), "item")
    assert items.tolist() == [7, OOV_ID, OOV_ID, OOV_ID, N_ITEMS - 1] and n_oov == 3  # 0 is no catalogue id either
    cates, _ = serving.map_ids(np.array([3, N_CATES, 3, 3, 3]), "cate")
    assert cates.tolist() == [3, OOV_ID, 3, 3, 3]

    hist_item, hist_cate = [9, 14, 200, 33, 9, 71], [1, 4, 4, 7, 1, 2]
    probs, _, _ = serving.score(_seq(hist_item, hist_cate), None, items, cates)
    # every OOV id reads the zero vector: unknown items (with known or unknown categories) are one value
    # per category, whatever their raw id
    assert probs[1] != probs[0] and probs[2] == probs[3]
    from recsys.embeddings import table_sets

    for tables in table_sets(serving.model).values():
        for tname, w in tables.weights().items():
            if tname.rsplit("_", 1)[-1] in ("item", "cate"):
                assert not w[OOV_ID].any(), tname

    # in-vocabulary candidates on a padded batch (padding = row 0): the unmodified model's scores
    known_item, known_cate = [7, 120, N_ITEMS - 1], [3, 5, 11]
    batch = _batch(hist_item, hist_cate, known_item, known_cate, width=MAX_LEN)
    with torch.no_grad():
        want = torch.sigmoid(model(batch).logit)
        got = torch.sigmoid(serving.model(batch).logit)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    served, _, _ = serving.score(_seq(hist_item, hist_cate), None, torch.tensor(known_item), torch.tensor(known_cate))
    torch.testing.assert_close(served, want, rtol=1e-5, atol=1e-6)


def test_a_result_carries_the_version_of_the_model_that_scored_it(tmp_path):
    """The score route labels a response with ScoreResult.version: the model the batch really ran, which a
    reload may have swapped after the request was queued (it used to read the label before queueing)."""
    from recsys.config.serve import StateStoreConfig
    from service.metrics import ServiceMetrics
    from service.redis_conn import start_embedded
    from service.scoring import Scorer, ScoreJob
    from service.state import StateStore

    a, b = _serving(_model("dare")), _serving(_model("twin"))
    b.version = "other-version"
    with start_embedded(tmp_path) as handle:
        scorer = Scorer(a, StateStore(handle.client, StateStoreConfig()), ServiceMetrics())
        job = ScoreJob(1, np.array([5, 6]), np.array([1, 2]), False)
        assert scorer.run([job])[0].version == a.version
        scorer.model = b  # a reload between queueing and scoring
        assert scorer.run([job])[0].version == "other-version"
