"""Data configs: the benchmark split protocol and the synthetic lifelong generator."""

from __future__ import annotations

from pydantic import Field, model_validator

from recsys.config.base import StrictModel


class SplitConfig(StrictModel):
    """Per-user split by position (../shared/benchmarks/README.md): each user's last events are test targets,
    the ones before them validation targets, the rest training targets."""

    test_frac: float = Field(0.1, gt=0, lt=1, description="share of each user's events, counted from the end, "
                             "whose positions are test targets (at least 1 per user)")
    val_frac: float = Field(0.1, ge=0, lt=1, description="share of each user's events just before the test ones "
                            "whose positions are validation targets (at least 1 per user if > 0; 0: no validation split)")
    min_history: int = Field(5, ge=0, description="positions below this index are never targets (a target needs "
                             "this much history)")
    negatives: int = Field(2, ge=0, description="negative rows per positive target, distinct (prepared data: items "
                           "the user never interacted with, by popularity; synthetic: items of families unseen before "
                           "the target, same category first)")


class EventsPerUser(StrictModel):
    """Log-normal sequence lengths with the given mean, clipped to [min, max] (min <= max)."""

    mean: float = Field(1000.0, gt=0, description="mean events per user before clipping")
    sigma: float = Field(1.0, ge=0, description="log-space standard deviation (0: every user has `mean` events)")
    min: int = Field(20, ge=1, description="fewest events a user has")
    max: int = Field(100_000, ge=1, description="most events a user has")

    @model_validator(mode="after")
    def _order(self) -> "EventsPerUser":
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) > max ({self.max})")
        return self


class SyntheticConfig(StrictModel):
    """Seeded synthetic lifelong dataset (recsys.data.synthetic; `recsys generate --config`, whose `--users`,
    `--events-mean` and `--seed` flags override the file).

    Items come in families of `family_size` (same category); the hidden rule fires for a target iff an item of
    its family occurs in the user's history before the target; the label is the rule's, flipped with
    probability `label_noise`. For a `far_fraction` of positives the family's most
    recent occurrence lies more than `window` events back, so only a lifelong search finds it.
    Also checked: p_interest + p_drift <= 1 and n_items >= family_size * n_cates."""

    n_users: int = Field(200, ge=1, description="number of users")
    events_per_user: EventsPerUser = Field(EventsPerUser(), description="distribution of history lengths")
    n_items: int = Field(20_000, ge=2, description="number of items (ids 1..n_items)")
    n_cates: int = Field(100, ge=1, description="number of categories (ids 1..n_cates); each has at least one family")
    family_size: int = Field(4, ge=1, description="consecutive item ids per family; a family has one category")
    zipf_a: float = Field(1.1, gt=0, description="item popularity ~ rank^-a")
    n_interests: int = Field(4, ge=1, description="long-lived interest categories per user, recurring over the whole history")
    p_interest: float = Field(0.3, ge=0, le=1, description="share of events drawn from the long-lived interests")
    p_drift: float = Field(0.5, ge=0, le=1, description="share of events drawn from the current (drifting) interest; "
                           "the rest is popularity noise")
    drift_every: float = Field(300.0, gt=0, description="mean events between changes of the drifting interest")
    target_rate: float = Field(0.1, gt=0, le=1, description="share of eligible positions used as targets "
                               "(at least 1 per user and split)")
    far_fraction: float = Field(0.5, ge=0, le=1, description="share of positives whose evidence lies only more "
                                "than `window` events back")
    window: int = Field(200, ge=1, description="the 'recent history' horizon that far positives escape")
    max_evidence: int = Field(32, ge=1, description="most recent evidence positions kept per row (the `evidence` column)")
    label_noise: float = Field(0.0, ge=0, lt=0.5, description="each row's label is the hidden rule's, flipped with "
                               "this probability; the Bayes-optimal score (the `p_label` column) is then 1 - noise where "
                               "the rule fires and noise where it does not, so the ceiling AUC is below 1 (0: "
                               "deterministic labels, ceiling 1)")
    split: SplitConfig = Field(SplitConfig(), description="per-user split (`split.negatives`: negatives per positive)")
    # Chunks draw from their own seeded streams, so the data depends on it as on the seed.
    chunk_events: int = Field(1_000_000, ge=1000, description="events generated and written per chunk (bounds "
                              "memory); part of the data's identity, like the seed")
    seed: int = Field(0, description="seed of everything random; same config and seed, same files")

    @model_validator(mode="after")
    def _shares(self) -> "SyntheticConfig":
        if self.p_interest + self.p_drift > 1:
            raise ValueError(f"p_interest + p_drift = {self.p_interest + self.p_drift} > 1")
        if self.n_items < self.family_size * self.n_cates:
            raise ValueError(f"n_items ({self.n_items}) < family_size * n_cates ({self.family_size * self.n_cates})")
        return self
