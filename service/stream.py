"""Event ingestion through Redis Streams: partitioned by user, consumed by a group, applied exactly once.

`EventStream.append` writes each event to the partition of its user (so one user's events keep their
order within one stream). A `StreamWorker` reads a batch with XREADGROUP (after its own pending entries
and entries reclaimed from consumers idle longer than `claim_idle_ms`), applies it through
`StateStore.apply` (one Lua script per user, idempotent), then, in one MULTI per partition, writes
rejected events to the partition's dead-letter stream, bumps its counters and XACKs. A crash anywhere
before that MULTI means redelivery, and redelivered events are duplicates in the store: no-ops.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import redis

from recsys.config.serve import ServeConfig
from service.keys import KeySpace, partition_of
from service.redis_conn import connect
from service.state import Event, StateStore, StateUpdater, stream_position

log = logging.getLogger("recsys.stream")

# One field per entry, values tab-separated in this order, event id last (it may contain tabs):
# a sixth of the RESP elements of one-field-per-value, which is most of the cost of XADD/XREADGROUP in
# redis-py (benchmarks/redis_state.py). Dead letters keep the original field.
FIELD = b"e"
ORDER = ("user_id", "item_id", "category_id", "action", "ts", "event_id")
Entry = tuple[int, str, dict[bytes, bytes]]  # (partition, stream id, fields)


class EventRejected(ValueError):
    """An entry cannot become an Event; `reason` is the counter name, e.g. 'user_id'."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def encode_event(e: Event) -> bytes:
    return f"{e.user_id}\t{e.item_id}\t{e.category_id}\t{e.action}\t{e.ts}\t{e.event_id}".encode()


def parse_entry(fields: Mapping[bytes, bytes], max_event_id_len: int = 128, stream_id: str = "") -> Event:
    """Stream entry fields (of entry `stream_id`) -> Event, or EventRejected naming the field."""
    raw = fields.get(FIELD)
    if raw is None:
        raise EventRejected("entry", f"entry: no field {FIELD.decode()!r}")
    try:
        parts = raw.decode().split("\t", len(ORDER) - 1)
    except UnicodeDecodeError:
        raise EventRejected("entry", "entry: not UTF-8") from None
    if len(parts) != len(ORDER):
        raise EventRejected("entry", f"entry: {len(parts)} tab-separated values, expected {len(ORDER)} ({', '.join(ORDER)})")
    values: dict[str, str | int] = {"event_id": parts[-1]}
    if len(parts[-1].encode()) > max_event_id_len:
        raise EventRejected("event_id", f"event_id: {len(parts[-1].encode())} bytes, more than {max_event_id_len}")
    for name, text in zip(ORDER[:-1], parts):
        try:
            values[name] = int(text)
        except ValueError:
            raise EventRejected(name, f"{name}: not an integer: {text[:40]!r}") from None
    try:
        return Event(**values, stream_id=stream_id)  # type: ignore[arg-type]
    except ValueError as e:
        raise EventRejected(str(e).split(":", 1)[0], str(e)) from None


class BacklogFull(RuntimeError):
    """The streams hold `entries` >= stream.max_backlog entries: the caller should retry later."""

    def __init__(self, entries: int, bound: int):
        super().__init__(f"stream backlog: {entries} entries not yet applied, bound {bound} (stream.max_backlog)")
        self.entries = entries
        self.bound = bound


class EventStream:
    """The partitioned event streams of one key space: append, group setup, counters."""

    def __init__(self, client: redis.Redis, cfg: ServeConfig):
        self.client = client
        self.cfg = cfg
        self.keys = KeySpace(cfg.state.key_prefix)
        self.partitions = [self.keys.partition(p) for p in range(cfg.stream.partitions)]

    def partition(self, user_id: int) -> int:
        return partition_of(user_id, self.cfg.stream.partitions)

    def length(self) -> int:
        """Entries in all partitions (one round trip). The workers trim what every consumer is done with
        about every second (`StreamWorker.trim`), so this is the backlog plus at most ~1 s of applied ones."""
        pipe = self.client.pipeline(transaction=False)
        for pk in self.partitions:
            pipe.xlen(pk.events)
        return sum(pipe.execute())

    def append(self, events: Sequence[Event], max_backlog: int = 0) -> list[str]:
        """XADD each event to its user's partition (one round trip); returns the stream ids. With
        `max_backlog`: BacklogFull, nothing written, while the streams hold that many entries or more (the
        streams are never trimmed by length, which would drop acknowledged events: the bound is kept by
        refusing new ones)."""
        if max_backlog:
            n = self.length()
            if n >= max_backlog:
                raise BacklogFull(n, max_backlog)
        pipe = self.client.pipeline(transaction=False)
        for e in events:
            pipe.xadd(self.partitions[self.partition(e.user_id)].events, {FIELD: encode_event(e)})
        return [i.decode() for i in pipe.execute()]

    def ensure_groups(self) -> None:
        for pk in self.partitions:
            try:
                self.client.xgroup_create(pk.events, self.cfg.stream.group, id="0", mkstream=True)
            except redis.ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise

    def counters(self) -> dict[str, int]:
        """Counters summed over partitions: applied, duplicates, outside_cap, rejected:<reason>, ..."""
        total: Counter[str] = Counter()
        pipe = self.client.pipeline(transaction=False)
        for pk in self.partitions:
            pipe.hgetall(pk.stats)
        for h in pipe.execute():
            total.update({k.decode(): int(v) for k, v in h.items()})
        return dict(total)

    def position(self, user_id: int) -> str:
        """The id of the newest entry ever added to the user's partition ("0-0": none): every event of the
        user accepted so far is at or before it."""
        try:
            info = self.client.xinfo_stream(self.partitions[self.partition(user_id)].events)
        except redis.ResponseError as e:
            if "no such key" in str(e).lower():
                return "0-0"
            raise
        last = info["last-generated-id"]
        return last.decode() if isinstance(last, bytes) else last

    def erase_dead_letters(self, user_id: int, page: int = 1000) -> int:
        """Delete the user's entries from its partition's dead-letter stream (they hold the events' fields).
        Reads the whole dead-letter stream of the partition, a page at a time. -> entries deleted."""
        key = self.partitions[self.partition(user_id)].dead
        prefix = f"{user_id}\t".encode()
        deleted, start = 0, "-"
        while True:
            got = self.client.xrange(key, min=start, max="+", count=page)
            mine = [i for i, f in got if (f.get(FIELD) or b"").startswith(prefix)]
            if mine:
                deleted += self.client.xdel(key, *mine)
            if len(got) < page:
                return deleted
            start = "(" + got[-1][0].decode()

    def dead_letters(self) -> list[dict[str, str]]:
        out = []
        for pk in self.partitions:
            for _, f in self.client.xrange(pk.dead):
                out.append({k.decode(): v.decode(errors="replace") for k, v in f.items()})
        return out

    def backlog(self) -> int:
        """Entries of the group not yet applied: pending (delivered, not acknowledged) plus not yet delivered,
        summed over partitions, in one round trip (cheap enough for every scrape and readiness probe). Exact
        where Redis reports the group's lag (7.0+) and wherever everything was delivered; otherwise (Redis
        6.2 with undelivered entries) the partition's length: an upper bound that also counts the entries
        applied since the last trim (about a second's worth, `StreamWorker.trim`)."""
        pipe = self.client.pipeline(transaction=False)
        for pk in self.partitions:
            pipe.xinfo_stream(pk.events)
            pipe.xinfo_groups(pk.events)
        replies = pipe.execute(raise_on_error=False)
        n = 0
        for info, groups in zip(replies[::2], replies[1::2]):
            for r in (info, groups):
                if isinstance(r, redis.ResponseError) and "no such key" in str(r).lower():
                    break  # nothing was ever appended to this partition (or Redis came back empty)
                if isinstance(r, Exception):
                    raise r
            else:
                g = next((g for g in groups if _text(g["name"]) == self.cfg.stream.group), None)
                if g is None:  # no consumer group yet: nothing was read
                    n += int(info["length"])
                elif g.get("lag") is not None:  # absent on 6.2; None when Redis 7 cannot tell
                    n += int(g["pending"]) + int(g["lag"])
                elif stream_position(_text(g["last-delivered-id"])) >= stream_position(_text(info["last-generated-id"])):
                    n += int(g["pending"])
                else:
                    n += int(info["length"])
        return n


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else v


@dataclass
class WorkerStats:
    read: int = 0
    reclaimed: int = 0
    applied: int = 0
    duplicates: int = 0
    outside_cap: int = 0
    conflicts: int = 0
    groups_recreated: int = 0  # the consumer group was gone (Redis restarted empty, flushed, failed over)
    rejected: Counter = field(default_factory=Counter)  # reason -> count (dead-lettered)

    def add(self, other: "WorkerStats") -> None:
        for name in ("read", "reclaimed", "applied", "duplicates", "outside_cap", "conflicts", "groups_recreated"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.rejected.update(other.rejected)


class StreamWorker:
    """One consumer of the group. `run_once` handles one batch; `run` loops until stopped."""

    def __init__(
        self,
        cfg: ServeConfig,
        updater: StateUpdater,
        client: redis.Redis | None = None,
        consumer: str | None = None,
        partitions: Sequence[int] | None = None,
        on_batch: Callable[[WorkerStats], None] | None = None,
    ):
        self.cfg = cfg
        self.updater = updater
        self._handle = None
        if client is None:
            self._handle = connect(cfg.state)
            client = self._handle.client
        self.client = client
        self.store = StateStore(client, cfg.state)
        self.stream = EventStream(client, cfg)
        self.stream.ensure_groups()
        # A stable name lets a restarted worker take back its own pending entries at once.
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.partitions = list(range(cfg.stream.partitions)) if partitions is None else list(partitions)
        self.on_batch = on_batch
        self.totals = WorkerStats()
        self._own_pending_done = False
        self._claim_cursor = {p: "0-0" for p in self.partitions}
        self._last_claim = 0.0
        self._last_trim = 0.0

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def run(self, stop: threading.Event | None = None, until_idle: bool = False,
            max_batches: int | None = None) -> WorkerStats:
        """Consume until `stop` is set, a batch comes back empty (`until_idle`), or `max_batches`."""
        n = 0
        while not (stop is not None and stop.is_set()) and (max_batches is None or n < max_batches):
            try:
                s = self.run_once()
            except redis.ResponseError as e:
                if "NOGROUP" not in str(e):
                    raise
                # The streams and their group are gone while events keep arriving (XADD recreates a
                # stream, not its group): without this the worker would fail on every read, forever.
                log.warning("stream worker %s: consumer group missing (Redis restarted empty or flushed?); "
                            "recreating it", self.consumer)
                self.stream.ensure_groups()
                self._claim_cursor = {p: "0-0" for p in self.partitions}
                self.totals.groups_recreated += 1
                continue
            n += 1
            if until_idle and s.read == 0:
                break
        return self.totals

    def run_once(self) -> WorkerStats:
        """One batch: own pending after a restart, else entries reclaimed from dead consumers, topped up
        with new entries (up to batch_size per partition read)."""
        sc = self.cfg.stream
        stats = WorkerStats()
        redelivered = self._own_pending() if not self._own_pending_done else []
        if not redelivered:
            redelivered = self._reclaim(stats)
        fresh = []
        if len(redelivered) < sc.batch_size:
            fresh = self._read_new(sc.batch_size - len(redelivered), block=not redelivered)
        stats.read = len(redelivered) + len(fresh)
        # Entries delivered before may be what crashed the last attempt: past max_deliveries they are
        # dead-lettered; otherwise each is applied on its own, so one poison entry cannot take its
        # batch-mates down with it.
        times = self._deliveries(redelivered)
        poison = {sid for sid, t in times.items() if t > sc.max_deliveries}
        suspects = [e for e in redelivered if 1 < times[e[1]] <= sc.max_deliveries]
        batch = [e for e in redelivered if times[e[1]] <= 1 or e[1] in poison] + fresh
        if batch:
            self._process(batch, poison, stats)
        errors = []
        for entry in suspects:
            try:
                self._process([entry], set(), stats)
            except Exception as e:  # noqa: BLE001  (re-raised below, after the others are done)
                errors.append(e)
        self._maybe_trim()
        self.totals.add(stats)
        if self.on_batch is not None:
            self.on_batch(stats)
        if errors:
            raise errors[0]
        return stats

    # ---- reading ------------------------------------------------------------------------------

    def _xreadgroup(self, last_id: str, count: int, block_ms: int | None) -> list[Entry]:
        index = {self.stream.partitions[p].events: p for p in self.partitions}
        # A cluster cannot serve one XREADGROUP over partitions in different slots: one call each.
        calls = [{k: last_id} for k in index] if self.cfg.state.cluster else [{k: last_id for k in index}]
        out: list[Entry] = []
        for streams in calls:
            reply = self.client.xreadgroup(self.cfg.stream.group, self.consumer, streams, count=count,
                                           block=None if self.cfg.state.cluster else block_ms)
            for key, items in reply or []:
                p = index[key.decode()]
                # A pending entry trimmed from the stream comes back with no fields: nothing to apply.
                out += [(p, i.decode(), f) for i, f in items if f]
        if not out and block_ms and self.cfg.state.cluster:
            time.sleep(block_ms / 1000)
        return out

    def _own_pending(self) -> list[Entry]:
        """Entries delivered to this consumer name before a restart (id 0 = my pending list)."""
        got = self._xreadgroup("0", self.cfg.stream.batch_size, None)
        if not got:
            self._own_pending_done = True
        return got

    def _read_new(self, count: int, block: bool) -> list[Entry]:
        return self._xreadgroup(">", count, self.cfg.stream.block_ms if block else None)

    def _reclaim(self, stats: WorkerStats) -> list[Entry]:
        sc = self.cfg.stream
        now = time.monotonic()
        if now - self._last_claim < sc.claim_idle_ms / 2000:
            return []
        self._last_claim = now
        out: list[Entry] = []
        for p in self.partitions:
            key = self.stream.partitions[p].events
            reply = self.client.xautoclaim(key, sc.group, self.consumer, sc.claim_idle_ms,
                                           self._claim_cursor[p], count=sc.batch_size)
            cursor, items = reply[0], reply[1]  # Redis 7 adds a third element: deleted ids
            self._claim_cursor[p] = cursor.decode()
            out += [(p, i.decode(), f) for i, f in items if f]
        stats.reclaimed = len(out)
        return out

    # ---- applying and acknowledging -----------------------------------------------------------

    def _process(self, entries: list[Entry], poison: set[str], stats: WorkerStats) -> None:
        sc = self.cfg.stream
        dead: dict[int, list[tuple[str, dict, str, str]]] = defaultdict(list)  # sid, fields, reason, message
        valid: list[Event] = []
        origin: dict[int, tuple[int, str, dict]] = {}
        for p, sid, fields in entries:
            if sid in poison:
                dead[p].append((sid, fields, "max_deliveries", f"delivered more than {sc.max_deliveries} times"))
                continue
            try:
                ev = parse_entry(fields, sc.max_event_id_len, sid)
            except EventRejected as e:
                dead[p].append((sid, fields, e.reason, str(e)))
                continue
            origin[id(ev)] = (p, sid, fields)
            valid.append(ev)
        report = self.store.apply(self.updater, valid)
        for ev in report.late:
            p, sid, fields = origin[id(ev)]
            dead[p].append((sid, fields, "late", "ts older than the user's dedup floor: cannot prove it new"))
        # Counters go to the partition the user's entries came from, inside that partition's MULTI.
        user_p = {ev.user_id: origin[id(ev)][0] for ev in reversed(valid)}
        counts: dict[int, Counter] = defaultdict(Counter)
        for u, c in report.by_user.items():
            counts[user_p[u]].update(c)
        # Events of an erased user: counted, and not dead-lettered (a dead letter would keep their data).
        for ev in report.erased:
            counts[origin[id(ev)][0]]["rejected:erased"] += 1
        if report.erased:
            stats.rejected["erased"] += len(report.erased)
        for reasons in dead.values():
            stats.rejected.update(reason for _, _, reason, _ in reasons)
        stats.applied += report.applied
        stats.duplicates += report.duplicates
        stats.outside_cap += report.outside_cap
        stats.conflicts += report.conflicts
        self._ack(entries, dead, counts)

    def _deliveries(self, entries: list[Entry]) -> dict[str, int]:
        """Times each entry has been delivered (XPENDING per id: exact, and only after a redelivery)."""
        pipe = self.client.pipeline(transaction=False)
        for p, sid, _ in entries:
            pipe.xpending_range(self.stream.partitions[p].events, self.cfg.stream.group, min=sid, max=sid, count=1)
        out = {sid: 1 for _, sid, _ in entries}
        for reply in pipe.execute() if entries else []:
            for x in reply:
                out[x["message_id"].decode()] = int(x["times_delivered"])
        return out

    def _ack(self, entries: list[Entry], dead: dict[int, list[tuple[str, dict, str, str]]],
             counts: dict[int, Counter]) -> None:
        ids: dict[int, list[str]] = defaultdict(list)
        for p, sid, _ in entries:
            ids[p].append(sid)
        for p, sids in ids.items():
            pk = self.stream.partitions[p]
            # Dead letters, counters and the XACK commit together: a crash before EXEC redelivers the
            # entries (no-ops in the store), so no rejection is counted twice or lost.
            pipe = self.client.pipeline(transaction=True)
            for sid, fields, reason, message in dead.get(p, []):
                pipe.xadd(pk.dead, {**fields, b"reason": reason.encode(), b"error": message.encode(),
                                    b"source_id": sid.encode()})
                pipe.hincrby(pk.stats, f"rejected:{reason}", 1)
            for name, n in counts.get(p, Counter()).items():
                if n:
                    pipe.hincrby(pk.stats, name, n)
            pipe.xack(pk.events, self.cfg.stream.group, *sids)
            pipe.execute()

    def _maybe_trim(self) -> None:
        now = time.monotonic()
        if now - self._last_trim >= 1.0:
            self._last_trim = now
            self.trim()

    def trim(self) -> None:
        """Drop entries every consumer is done with: below both the oldest pending and the last delivered;
        and remove consumers long idle with nothing pending (their entries, if any, were reclaimed first)."""
        for p in self.partitions:
            key = self.stream.partitions[p].events
            for c in self.client.xinfo_consumers(key, self.cfg.stream.group):
                name = c["name"].decode() if isinstance(c["name"], bytes) else c["name"]
                if name != self.consumer and not c["pending"] and c["idle"] >= self.cfg.stream.dead_consumer_idle_ms:
                    self.client.xgroup_delconsumer(key, self.cfg.stream.group, name)
            groups = {g["name"].decode(): g for g in self.client.xinfo_groups(key)}
            g = groups.get(self.cfg.stream.group)
            if g is None or len(groups) > 1:
                continue  # another group may still need the entries
            last = g["last-delivered-id"].decode()
            minid = _next_id(last)
            summary = self.client.xpending(key, self.cfg.stream.group)
            if summary["pending"]:
                minid = min(minid, summary["min"].decode(), key=stream_position)
            self.client.xtrim(key, minid=minid, approximate=False)


def _next_id(s: str) -> str:
    ms, seq = stream_position(s)
    return f"{ms}-{seq + 1}"
