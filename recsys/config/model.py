"""The `model` section of a config: which model, its dimensions and its switches."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from recsys.config.base import StrictModel


class ModelConfig(StrictModel):
    """`mlp` needs at least one hidden layer; every hidden size is >= 1."""

    name: Literal["dare", "twin", "din"] = Field(
        "dare", description="the model: DARE (separate attention and representation embeddings), TWIN (one shared "
        "embedding for search and representation) or DIN (target attention over the last max_len events)")
    dim_rep: int = Field(16, ge=1, description="d_r: representation dim per field (item, category, position)")
    dim_att: int = Field(16, ge=1, description="d_a: attention dim per field (DARE only; TWIN/DIN use dim_rep)")
    top_k: int = Field(20, ge=1, description="events kept by the search stage (DARE, TWIN)")
    max_len: int = Field(200, ge=1, description="history length L; the position table has max_len + 1 rows")
    # Lifelong histories: a row per exact recency up to 1M would be a 1M-row table per role, trained only where
    # the training histories reach; log-distance buckets keep it small and let far events share what they learn.
    pos_exact: int | None = Field(None, ge=1, description="DARE/TWIN: recencies 1..pos_exact get a position row "
                                  "each; a recency r beyond shares the row of its log-distance bucket, "
                                  "pos_exact + 1 + floor(pos_buckets_per_octave * log2(r / pos_exact)), up to max_len. "
                                  "None: one row per recency up to max_len")
    pos_buckets_per_octave: int = Field(4, ge=1, description="with pos_exact: buckets per doubling of the recency")
    aux_loss: bool = Field(True, description="auxiliary soft-attention head over the whole history (DARE, TWIN)")
    aux_weight: float = Field(1.0, ge=0.0, description="weight of the auxiliary head's BCE loss (with aux_loss)")
    mlp: list[int] = Field([200, 80], description="hidden sizes of the prediction MLP")
    din_attention_mlp: list[int] = Field([36], description="hidden sizes of DIN's activation unit")
    init_std: float = Field(0.01, gt=0.0, description="N(0, std) init of embeddings and Linear weights")
    embedding_backend: Literal["sparse", "dense", "fused"] = Field(
        "sparse", description="how the tables train: `sparse` row gradients + SparseAdam; `dense` gradients + Adam "
        "over every row (the original); `fused` torchrec/fbgemm sharded tables, optimiser inside backward. Bundles "
        "always serve plain tables (docs/models.md)")
    aaren: bool = Field(False, description="add the Aaren streaming-attention summary to the MLP input")
    titans: bool = Field(False, description="add the Titans neural-memory read to the MLP input")
    titans_chunk_size: int = Field(
        16, ge=1, description="Titans: events per memory update (every gradient of a chunk at its start weights); part "
        "of the function, serving applies the same chunks")
    titans_max_lr: float = Field(
        0.1, gt=0.0, description="Titans: bound of the inner step size, theta = titans_max_lr * sigmoid(.) (stability "
        "at any history length, docs/models.md)")
    titans_max_grad_norm: float = Field(
        1.0, gt=0.0, description="Titans: each event's inner gradient is clipped to this norm before the update")
    titans_backprop_clip: float = Field(
        1.0, gt=0.0, description="Titans, training: each user's gradient at a chunk boundary is clipped to this norm "
        "before it flows back through earlier chunks (unclipped it exploded over ~60 chunks; .inf: off)")
    group_rows: int = Field(
        128, ge=1,
        description="compute only: training/eval batches are sorted by history length and processed in groups of this "
        "many rows, each padded to its own longest history (same results, far less padding at long L)",
    )

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if not self.mlp or any(h < 1 for h in self.mlp):
            raise ValueError(f"mlp: at least one hidden layer, sizes >= 1 (got {self.mlp})")
        if any(h < 1 for h in self.din_attention_mlp):
            raise ValueError(f"din_attention_mlp: sizes must be >= 1 (got {self.din_attention_mlp})")
        return self
