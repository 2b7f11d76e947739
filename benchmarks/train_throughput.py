"""Training throughput of DARE (L = 200, batch 2048) against a plain-torch replica of the original step.

The replica does what the original thuml/DARE step does: dense nn.Embedding tables (attention and
representation sets), every history event embedded with gradient and concatenated into [B, L, D] blocks,
search, softmax over the kept k, auxiliary soft attention over the whole history, the same MLP towers,
and dense Adam over every parameter (every table row is updated each step). Ours: recsys DARE with the
`sparse` table backend. Both run in this process, steps interleaved (ours, replica, ours, ...), so that
load from other processes hits both alike; medians over the measured steps.

Tables: the benchmark's (ml-latest-small ids, real batches) and Taobao-sized (item_n = 4,068,791,
cate_n = 9,408) with synthetic uniform ids. Prints one JSON object.

    .venv/bin/python benchmarks/train_throughput.py [--steps 6] [--threads 2] [--backends sparse,fused]
        [--out results/train_throughput.json]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import add_out_arg, emit  # noqa: E402 - first: puts this checkout on sys.path
import retrieval  # noqa: E402
from recsys.config.model import ModelConfig  # noqa: E402
from recsys.config.train import TrainConfig  # noqa: E402
from recsys.data.batch import HistoryBatch  # noqa: E402
from recsys.data.sequences import assemble, load_dataset  # noqa: E402
from recsys.models import build_model  # noqa: E402
from recsys.embeddings import table_sets  # noqa: E402
from recsys.models.attention import masked_softmax  # noqa: E402
from recsys.models.layers import MLP, init_weights  # noqa: E402
from recsys.paths import benchmark_dir  # noqa: E402
from recsys.train.step import make_optimizers, train_step  # noqa: E402


TAOBAO = {"n_items": 4_068_791, "n_cates": 9_408}


class OriginalDARE(nn.Module):
    """The original step's computation in plain torch (dense tables, full-history embeddings with grad)."""

    def __init__(self, n_items: int, n_cates: int, L: int, d: int = 16, k: int = 20) -> None:
        super().__init__()
        self.k, self.d = k, d
        self.att = nn.ModuleList([nn.Embedding(n_items, d), nn.Embedding(n_cates, d), nn.Embedding(L + 1, d)])
        self.rep = nn.ModuleList([nn.Embedding(n_items, d), nn.Embedding(n_cates, d), nn.Embedding(L + 1, d)])
        self.mlp, self.aux_mlp = MLP(9 * d, [200, 80]), MLP(9 * d, [200, 80])
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.normal_(p, 0.0, 0.01)
        init_weights(self, 0.01)

    def forward(self, b: HistoryBatch) -> torch.Tensor:
        t_ids = (b.target_item, b.target_cate, torch.zeros_like(b.target_item))
        h_ids = (b.hist_item, b.hist_cate, b.hist_pos)
        q = torch.cat([e(i) for e, i in zip(self.att, t_ids)], -1)          # [B, 3d]
        K = torch.cat([e(i) for e, i in zip(self.att, h_ids)], -1)          # [B, L, 3d]
        v_t = torch.cat([e(i) for e, i in zip(self.rep, t_ids)], -1)        # [B, 3d]
        R = torch.cat([e(i) for e, i in zip(self.rep, h_ids)], -1)          # [B, L, 3d]
        seg = [2 * self.d, self.d]
        s = retrieval.scaled_scores(q.unsqueeze(1), K, seg).squeeze(1)     # [B, L]
        valid = b.hist_mask
        s_masked = s.masked_fill(~valid, float("-inf"))
        top, idx = torch.topk(s_masked.detach(), min(self.k, s.shape[1]), dim=-1)
        w = masked_softmax(torch.gather(s, 1, idx), torch.isfinite(top))
        h = torch.einsum("bk,bkd->bd", w, torch.gather(R, 1, idx.unsqueeze(-1).expand(-1, -1, R.shape[-1])))
        h_all = torch.einsum("bl,bld->bd", masked_softmax(s, valid), R)
        logit = self.mlp(torch.cat([v_t, h, v_t * h], -1)).squeeze(-1)
        aux = self.aux_mlp(torch.cat([v_t, h_all, v_t * h_all], -1)).squeeze(-1)
        return F.binary_cross_entropy_with_logits(logit, b.label) + F.binary_cross_entropy_with_logits(aux, b.label)


def original_optimizer(m: OriginalDARE) -> torch.optim.Optimizer:
    emb = [p for e in list(m.att) + list(m.rep) for p in e.parameters()]
    ids = {id(p) for p in emb}
    dense = [p for p in m.parameters() if id(p) not in ids]
    return torch.optim.Adam([{"params": emb, "weight_decay": 0.0}, {"params": dense, "weight_decay": 1e-6}], lr=0.01)


def synthetic_batches(n: int, B: int, L: int, n_items: int, n_cates: int, seed: int) -> list[HistoryBatch]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lens = torch.full((B,), L, dtype=torch.int64)
        out.append(HistoryBatch(
            user=torch.arange(B), target_item=torch.randint(1, n_items, (B,), generator=g),
            target_cate=torch.randint(1, n_cates, (B,), generator=g),
            hist_item=torch.randint(1, n_items, (B, L), generator=g), hist_cate=torch.randint(1, n_cates, (B, L), generator=g),
            hist_pos=torch.arange(1, L + 1).expand(B, L).contiguous(), hist_len=lens,
            label=(torch.rand(B, generator=g) < 0.33).float()))
    return out


def measure(batches: list[HistoryBatch], n_items: int, n_cates: int, L: int, steps: int, backends: list[str]) -> dict:
    torch.manual_seed(0)
    orig = OriginalDARE(n_items, n_cates, L)
    orig_opt = original_optimizer(orig)

    def orig_step(b):
        orig_opt.zero_grad(set_to_none=True)
        orig(b).backward()
        orig_opt.step()

    runners = {"original_replica": orig_step}
    for be in backends:
        torch.manual_seed(0)
        m = build_model(ModelConfig(name="dare", max_len=L, embedding_backend=be), n_items, n_cates)
        if be == "fused":
            for t in table_sets(m).values():
                t.shard(lr=0.01)
        opt = make_optimizers(m, TrainConfig())
        runners[f"ours_{be}"] = lambda b, m=m, opt=opt: train_step(m, b, opt, 1.0)

    times: dict[str, list[float]] = {k: [] for k in runners}
    for i in range(steps + 2):  # 2 warm-up steps each
        for name, run in runners.items():
            b = batches[i % len(batches)]
            t0 = time.perf_counter()
            run(b)
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    B = batches[0].batch_size
    sps = {k: B / statistics.median(v) for k, v in times.items()}
    return {
        "samples_per_s": sps,
        "median_step_s": {k: statistics.median(v) for k, v in times.items()},
        "ratio_vs_original_replica": {k: v / sps["original_replica"] for k, v in sps.items() if k != "original_replica"},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--max-len", type=int, default=200)
    p.add_argument("--backends", default="sparse", help="ours: comma list of sparse, dense, fused")
    add_out_arg(p, "train_throughput")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    backends = a.backends.split(",")
    t0 = time.time()

    ds = load_dataset(benchmark_dir(), splits=("train",))
    s = ds.splits["train"]
    rng = np.random.default_rng(0)
    bench_batches = [assemble(ds.store, s, rng.choice(len(s), a.batch, replace=False), a.max_len, trim=False) for _ in range(4)]
    bench = measure(bench_batches, ds.n_items, ds.n_cates, a.max_len, a.steps, backends)
    taobao = measure(synthetic_batches(4, a.batch, a.max_len, TAOBAO["n_items"], TAOBAO["n_cates"], 0),
                     TAOBAO["n_items"], TAOBAO["n_cates"], a.max_len, a.steps, backends)
    emit({
        "benchmark": "train_throughput",
        "inputs": {"model": "dare", "batch": a.batch, "max_len": a.max_len, "top_k": 20, "dims_per_field": 16, "steps": a.steps,
                   "threads": a.threads, "backends": backends, "benchmark_tables": {"n_items": ds.n_items, "n_cates": ds.n_cates},
                   "taobao_tables": TAOBAO},
        "benchmark_tables": bench,
        "taobao_tables": taobao,
        "original_code_listed_samples_per_s": {"dare_benchmark_tables": 3330, "dare_taobao_tables": round(2048 / 1.9)},
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "wall_s": time.time() - t0,
    }, a.out)


if __name__ == "__main__":
    main()
