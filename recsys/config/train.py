"""The `train` section: optimisation, validation cadence, model selection."""

from __future__ import annotations

from pydantic import Field

from recsys.config.base import StrictModel


class TrainConfig(StrictModel):
    """The best checkpoint by validation AUC is the one exported."""

    seed: int = Field(1, description="seed of the initial weights and the batch order")
    batch_size: int = Field(2048, ge=1, description="training rows per step (split across Ray Train workers)")
    eval_batch_size: int = Field(4096, ge=1, description="rows per forward when validating and evaluating")
    epochs: float = Field(2.0, gt=0.0, description="passes over the training rows (fractions allowed)")
    lr: float = Field(0.01, gt=0.0, description="Adam learning rate of the dense weights")
    embedding_lr: float = Field(0.01, gt=0.0, description="learning rate of the embedding tables")
    l2: float = Field(1e-6, ge=0.0, description="L2 on non-embedding weights (Adam weight_decay)")
    eval_every: int = Field(19, ge=1, description="validate every N steps (and at the end)")
    patience: int | None = Field(None, ge=1, description="stop after this many validations without a better val AUC")
    val_users: float | None = Field(None, gt=0.0, le=1.0, description=(
        "validate on this share of the users (a fixed hash of the user id: the same users on every rank count "
        "and in one process); None: every validation row. For splits too large to score at every validation"))
    threads: int | None = Field(None, ge=1, description="torch intra-op threads; None keeps torch's default")
    progress: bool = Field(True, description="show a progress bar while training")
