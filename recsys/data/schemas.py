"""Arrow schemas of the data layer (DESIGN.md section 2 and ../shared/benchmarks/README.md).

Two levels:
- EVENT_SCHEMA: a normalised raw event, as the raw loaders yield it (original ids, ts in milliseconds).
- Dataset folder (the fixed-benchmark format): `events.parquet` (DATASET_EVENTS_SCHEMA) and
  `train/val/test.parquet` (SPLIT_SCHEMA; synthetic data adds `evidence`), each one file or part files in
  user order (`recsys.data.layout`). Ids are dense: users from 0,
  items and categories from 1 (0 = padding). `ts` in a dataset folder is in SECONDS, as in the fixed
  benchmark folders, so every folder uses one unit.
"""

from __future__ import annotations

from enum import IntEnum

import pyarrow as pa


class Action(IntEnum):
    """Event type. Taobao's behaviour types map 1:1; a MovieLens rating is its own type."""

    CLICK = 0  # Taobao "pv" (page view / click)
    CART = 1   # Taobao "cart"
    FAV = 2    # Taobao "fav"
    BUY = 3    # Taobao "buy"
    RATE = 4   # MovieLens rating


TAOBAO_ACTIONS = {"pv": Action.CLICK, "cart": Action.CART, "fav": Action.FAV, "buy": Action.BUY}

EVENT_SCHEMA = pa.schema([
    pa.field("event_id", pa.string()),
    pa.field("user_id", pa.int64()),
    pa.field("item_id", pa.int64()),
    pa.field("category_id", pa.int64()),
    pa.field("action", pa.int8()),
    pa.field("ts", pa.int64()),  # milliseconds since the Unix epoch (UTC)
])

DATASET_EVENTS_SCHEMA = pa.schema([
    pa.field("user", pa.int32()),
    pa.field("pos", pa.int32()),   # index in the user's time-sorted sequence, 0 = oldest
    pa.field("item", pa.int32()),
    pa.field("cate", pa.int32()),
    pa.field("ts", pa.int64()),    # seconds
])

SPLIT_SCHEMA = pa.schema([
    pa.field("user", pa.int32()),
    pa.field("pos", pa.int32()),   # the target's position; history = the user's events before it
    pa.field("item", pa.int32()),
    pa.field("cate", pa.int32()),
    pa.field("label", pa.int8()),
])

# Synthetic data only: positions (ascending) of the history events that make the hidden rule fire, and
# p_label, the probability of label 1 given the user's full history before pos and the target (the Bayes-
# optimal score: no model can rank the rows better, so its AUC is the ceiling every model sits under).
SYNTHETIC_SPLIT_SCHEMA = SPLIT_SCHEMA.append(pa.field("evidence", pa.list_(pa.int32()))).append(
    pa.field("p_label", pa.float32()))

SPLITS = ("train", "val", "test")
