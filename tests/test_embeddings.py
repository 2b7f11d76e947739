"""Table sets: lookups equal plain indexing; each backend updates exactly what its optimizer says."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from recsys.checkpoint import read_weights, save_weights
from recsys.config.train import TrainConfig
from recsys.embeddings import TableSet, TableSpec
from recsys.models.output import bce_loss
from recsys.train.step import make_optimizers

SPECS = [TableSpec("item", 50, 4), TableSpec("pos", 7, 4)]


def _ids(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"item": torch.randint(0, 12, (5, 6), generator=g), "pos": torch.randint(0, 7, (9,), generator=g)}


@pytest.mark.parametrize("backend", ["sparse", "dense"])
def test_lookup_equals_indexing_any_shape_with_duplicates(backend):
    torch.manual_seed(0)
    t = TableSet(SPECS, backend)
    ids = _ids()
    out = t(ids)
    w = t.weights()
    assert out["item"].shape == (5, 6, 4) and out["pos"].shape == (9, 4)
    torch.testing.assert_close(out["item"], w["item"][ids["item"]])
    torch.testing.assert_close(out["pos"], w["pos"][ids["pos"]])


@pytest.mark.parametrize("backend", ["sparse", "dense"])
def test_lookup_of_parts_equals_the_concatenated_lookup_values_and_gradients(backend):
    """A tuple of id tensors (a batch's targets and history) looks up like their concatenation, and its
    table gradient is bitwise the concatenated form's, a part without gradient adding nothing (the table
    backward sums part after part in lookup order)."""
    torch.manual_seed(0)
    t = TableSet(SPECS, backend)
    g = torch.Generator().manual_seed(1)
    target, events = torch.randint(0, 12, (5,), generator=g), torch.randint(0, 12, (5, 6), generator=g)
    r_t, r_e = torch.randn(5, 4, generator=g), torch.randn(5, 6, 4, generator=g)
    w = t.weights()["item"]
    pos = torch.zeros(1, dtype=torch.long)   # the collection looks up every table it holds
    for use_target in (True, False):
        grads = []
        for form in ("parts", "concatenated"):
            if form == "parts":
                e_t, e_e = t({"item": (target, events), "pos": pos})["item"]
            else:
                e = t({"item": torch.cat([target, events.reshape(-1)]), "pos": pos})["item"]
                e_t, e_e = e[:5], e[5:].reshape(5, 6, 4)
            assert torch.equal(e_t, w[target]) and torch.equal(e_e, w[events])
            loss = (e_e * r_e).sum() + ((e_t * r_t).sum() if use_target else 0.0)
            (grad,) = torch.autograd.grad(loss, [t.dense_parameters()[0]])
            grads.append(grad.to_dense())
        assert torch.equal(*grads) and bool(grads[0][events.flatten()].any())


def test_unknown_table_and_bad_weights_are_named():
    t = TableSet(SPECS)
    with pytest.raises(KeyError, match="cate"):
        t({"cate": torch.zeros(2, dtype=torch.long)})
    with pytest.raises(ValueError, match="item"):
        t.load_weights({"item": torch.zeros(3, 4), "pos": torch.zeros(7, 4)})
    with pytest.raises(ValueError, match="backend"):
        TableSet(SPECS, "dens")


class _Toy(torch.nn.Module):
    """Minimal model around a table set so the real optimizers (train/step.py) drive it."""

    def __init__(self, backend: str) -> None:
        super().__init__()
        self.tables = TableSet(SPECS, backend)
        self.head = torch.nn.Linear(4, 1)

    def loss(self, ids):
        e = self.tables(ids)
        logit = self.head(e["item"]).sum(dim=(1, 2)) + e["pos"].sum() * 0.1
        from recsys.models.output import ModelOutput

        return bce_loss(ModelOutput(logit, None, None), torch.tensor([1.0, 0, 1, 0, 1]), 0.0)


def test_sparse_adam_rows_equal_dense_adam_on_first_step_and_untouched_rows_stay():
    """Step 1 of lazy (row-sparse) Adam equals dense Adam everywhere; after that, untouched rows never move."""
    models = {}
    for backend in ("sparse", "dense"):
        torch.manual_seed(0)
        m = _Toy(backend)
        opt = make_optimizers(m, TrainConfig(embedding_lr=0.05))
        for o in opt.all().values():
            o.zero_grad()
        m.loss(_ids()).backward()
        if backend == "sparse":
            assert m.tables.collection.ec.embeddings["item"].weight.grad.is_sparse
        for o in opt.all().values():
            o.step()
        models[backend] = m
    ws, wd = models["sparse"].tables.weights(), models["dense"].tables.weights()
    torch.testing.assert_close(ws["item"], wd["item"])
    torch.testing.assert_close(ws["pos"], wd["pos"])
    touched = torch.unique(_ids()["item"])
    untouched = torch.ones(50, dtype=torch.bool)
    untouched[touched] = False
    torch.manual_seed(0)
    fresh = _Toy("sparse").tables.weights()["item"]
    torch.testing.assert_close(ws["item"][untouched], fresh[untouched], rtol=0, atol=0)
    assert (ws["item"][touched] != fresh[touched]).any(dim=1).all()


@pytest.fixture
def one_process_group():
    assert not dist.is_initialized()
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_fused_backend_shards_over_gloo_and_applies_rowwise_adagrad(one_process_group, tmp_path):
    """DMP + fbgemm fused kernel on a 1-process gloo group: lookups equal the tables (read back from the
    set's checkpoint shards), and backward applies exact row-wise Adagrad (v += mean(g^2) per row;
    w -= lr g / (sqrt(v) + eps)) to touched rows."""
    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.tables = fused = TableSet(SPECS, "fused")
    assert {p.device.type for p in fused.parameters()} == {"meta"}  # nothing allocated before sharding
    with pytest.raises(ValueError, match="sharded"):
        fused.weights()
    fused.shard(lr=0.1, eps=1e-8)
    assert dist.is_initialized() and fused.sharded
    save_weights(holder, tmp_path / "w0")
    w0 = {k.split(".", 1)[1]: v for k, v in read_weights(tmp_path / "w0").items()}
    assert float(w0["item"].std()) == pytest.approx(0.01, rel=0.2)  # N(0, init_std)
    ids = _ids()
    out_f = fused(ids)
    assert torch.equal(out_f["item"], w0["item"][ids["item"]]) and torch.equal(out_f["pos"], w0["pos"][ids["pos"]])

    target = torch.randn(5, 6, 4, generator=torch.Generator().manual_seed(1))
    ((out_f["item"] - target) ** 2).sum().backward()
    # the same loss on plain tensors gives the row gradients the fused kernel must have applied
    w = w0["item"].clone().requires_grad_(True)
    ((w[ids["item"]] - target) ** 2).sum().backward()
    g = w.grad
    v = (g * g).mean(dim=1, keepdim=True)
    expected = w0["item"] - 0.1 * g / (v.sqrt() + 1e-8)
    save_weights(holder, tmp_path / "w1")
    torch.testing.assert_close(read_weights(tmp_path / "w1")["tables.item"], expected, rtol=1e-5, atol=1e-6)
    assert fused.dense_parameters() == []
