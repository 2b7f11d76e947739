"""Data configs: the benchmark split protocol and the synthetic lifelong generator."""

from __future__ import annotations

from pydantic import Field, model_validator

from recsys.config.base import StrictModel


class SplitConfig(StrictModel):
    """Per-user split by position (../shared/benchmarks/README.md)."""

    test_frac: float = Field(0.1, gt=0, lt=1)   # last share of a user's events: test targets (at least 1)
    val_frac: float = Field(0.1, ge=0, lt=1)    # the share before them: validation targets (at least 1 if > 0)
    min_history: int = Field(5, ge=0)           # positions below this are never targets
    negatives: int = Field(2, ge=0)             # negatives per positive, distinct, never seen by the user


class EventsPerUser(StrictModel):
    """Log-normal sequence lengths with the given mean, clipped to [min, max]."""

    mean: float = Field(1000.0, gt=0)
    sigma: float = Field(1.0, ge=0)
    min: int = Field(20, ge=1)
    max: int = Field(100_000, ge=1)

    @model_validator(mode="after")
    def _order(self) -> "EventsPerUser":
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) > max ({self.max})")
        return self


class SyntheticConfig(StrictModel):
    """Seeded synthetic lifelong dataset (recsys.data.synthetic).

    Items come in families of `family_size` (same category); a target is positive iff an item of its family
    occurs in the user's history before the target. For a `far_fraction` of positives the family's most
    recent occurrence lies more than `window` events back, so only a lifelong search finds it."""

    n_users: int = Field(200, ge=1)
    events_per_user: EventsPerUser = EventsPerUser()
    n_items: int = Field(20_000, ge=2)
    n_cates: int = Field(100, ge=1)
    family_size: int = Field(4, ge=1)
    zipf_a: float = Field(1.1, gt=0)            # item popularity ~ rank^-a
    n_interests: int = Field(4, ge=1)           # long-lived interest categories per user
    p_interest: float = Field(0.3, ge=0, le=1)  # share of events from the long-lived interests
    p_drift: float = Field(0.5, ge=0, le=1)     # share from the current (drifting) interest
    drift_every: float = Field(300.0, gt=0)     # mean events between changes of the drifting interest
    target_rate: float = Field(0.1, gt=0, le=1) # share of eligible positions used as targets (at least 1 per split)
    far_fraction: float = Field(0.5, ge=0, le=1)
    window: int = Field(200, ge=1)
    max_evidence: int = Field(32, ge=1)         # most recent evidence positions kept per row
    split: SplitConfig = SplitConfig()
    # Events generated and written per chunk (bounds memory). Chunks draw from their own seeded streams, so
    # the data depends on it as on the seed.
    chunk_events: int = Field(1_000_000, ge=1000)
    seed: int = 0

    @model_validator(mode="after")
    def _shares(self) -> "SyntheticConfig":
        if self.p_interest + self.p_drift > 1:
            raise ValueError(f"p_interest + p_drift = {self.p_interest + self.p_drift} > 1")
        if self.n_items < self.family_size * self.n_cates:
            raise ValueError(f"n_items ({self.n_items}) < family_size * n_cates ({self.family_size * self.n_cates})")
        return self
