"""The Redis user-state store: capped lifelong sequences, per-version model state, exactly-once apply.

A batch of events is applied per user by one Lua script (service/lua/apply.lua) under optimistic
concurrency: the store reads a snapshot of each user (rev, high-water mark, dedup hits, state), drops
duplicates and late events, computes the new state with a `StateUpdater`, and the script writes sequence,
state, high-water mark and dedup window only if the user's `rev` is still the one read. A replay after a
crash therefore finds its events in the dedup window and changes nothing.

State rule (so that any arrival order gives the state of one clean time-ordered pass): when every new
event is at or after the user's newest applied event and the stored state is current, the state is folded
forward (`updater.apply`); otherwise (an out-of-order event, or no current state for this model version)
it is recomputed from the merged, capped sequence (`updater.rebuild`). Time order is (ts, tb), tb a
32-bit digest of the event id, so ties in ts are broken the same way whatever the arrival order.

Erasure (`erase`, DELETE /v1/users/<id>): one script deletes every key of the user and leaves a tombstone
holding the stream position of the erase; the planner drops the user's events accepted up to that position
(counted, never applied), and the apply script treats a tombstone written after planning as a conflict, so
no event from before the erase brings the user back. Inactive users expire with `user_ttl_s`.
"""

from __future__ import annotations

import hashlib
import struct
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Iterable, Iterator, Protocol, Sequence

import numpy as np
import redis

from recsys.config.serve import StateStoreConfig
from service.keys import KeySpace, check_version

if TYPE_CHECKING:
    from service.block_index import BlockIndexer, IndexUpdate

# One stored event, 29 bytes packed (no padding: nothing to copy or compare but the fields). Lua reads
# the time key (ts, tb) from its first 12 bytes. ts stays below 2^53 so that Lua's doubles hold it
# exactly. Item and category ids are raw catalogue ids (any id the API accepts, up to 2^53 - 1): the
# served bundle's vocabulary maps them to table rows when they are read (service.model_state), so a
# retrain that renumbers its dense ids leaves stored histories valid.
SEQ_DTYPE = np.dtype([("ts", "<i8"), ("tb", "<u4"), ("item", "<i8"), ("cate", "<i8"), ("action", "i1")])
RECORD_BYTES = SEQ_DTYPE.itemsize
MAX_EXACT = 2**53 - 1  # Lua numbers are doubles


class StateStoreError(RuntimeError):
    """The store could not apply a batch (e.g. contention beyond the retry budget)."""


@dataclass(frozen=True, slots=True)
class Event:
    event_id: str
    user_id: int
    item_id: int
    category_id: int
    action: int
    ts: int  # ms
    # the stream entry it came from ("<ms>-<seq>"; "" when applied directly): an erase drops the user's
    # events up to its stream position
    stream_id: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.event_id:
            raise ValueError("event_id: must be a non-empty string")
        for name, lo in (("user_id", 0), ("item_id", 1), ("category_id", 1), ("ts", 0)):
            v = getattr(self, name)
            if not lo <= v <= MAX_EXACT:
                raise ValueError(f"{name}: {v} out of range [{lo}, 2^53 - 1]")
        if not -128 <= self.action <= 127:
            raise ValueError(f"action: {self.action} out of int8 range")


def stream_position(stream_id: str | bytes) -> tuple[int, int]:
    """A stream entry id "<ms>-<seq>" as a comparable pair."""
    text = stream_id.decode() if isinstance(stream_id, bytes) else stream_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def tiebreak(event_id: str) -> int:
    """Second sort key after ts: arrival-independent, so equal-ts events order the same in every pass."""
    return int.from_bytes(hashlib.blake2b(event_id.encode(), digest_size=4).digest(), "little")


def to_records(events: Sequence[Event]) -> tuple[np.ndarray, list[str]]:
    """Events -> (SEQ_DTYPE records sorted by (ts, tb), ties kept in arrival order; their event ids)."""
    rec = np.zeros(len(events), dtype=SEQ_DTYPE)
    rec["ts"] = [e.ts for e in events]
    rec["item"] = [e.item_id for e in events]
    rec["cate"] = [e.category_id for e in events]
    rec["tb"] = [tiebreak(e.event_id) for e in events]
    rec["action"] = [e.action for e in events]
    order = np.lexsort((rec["tb"], rec["ts"]))
    return rec[order], [events[j].event_id for j in order]


def decode_sequence(buf: bytes) -> np.ndarray:
    if len(buf) % RECORD_BYTES:
        raise StateStoreError(f"sequence string of {len(buf)} bytes is not a whole number of records")
    return np.frombuffer(buf, dtype=SEQ_DTYPE)


class StateUpdater(Protocol):
    """Per-user model state as opaque bytes; batched over users (one call per store batch).

    `apply` folds time-ordered new events into current states (None = a user with no state yet);
    `rebuild` computes states from whole time-ordered sequences (the newest `seq_cap` events).
    Sequences and events are SEQ_DTYPE arrays, oldest first. Both must be deterministic, and
    `rebuild(a ++ b)` must equal `apply([rebuild(a)], [b])`, which is what makes the two paths agree.
    """

    version: str

    def apply(self, states: list[bytes | None], events: list[np.ndarray]) -> list[bytes]: ...

    def rebuild(self, sequences: list[np.ndarray]) -> list[bytes]: ...


@dataclass
class ApplyReport:
    applied: int = 0       # events placed into sequences (and folded into state)
    duplicates: int = 0    # already applied, or repeated inside the batch: no-ops
    outside_cap: int = 0   # older than the oldest kept event of a full sequence: remembered, not kept
    rebuilt_users: int = 0
    conflicts: int = 0     # CAS retries (another writer touched the user in between)
    late: list[Event] = field(default_factory=list)  # older than the dedup floor: rejected, not applied
    erased: list[Event] = field(default_factory=list)  # accepted before their user was erased: not applied
    by_user: dict[int, Counter] = field(default_factory=dict)  # applied / duplicates / outside_cap


@dataclass
class UserSummary:
    user_id: int
    history_len: int
    events_applied: int
    last_event_ts: int | None
    last_event_id: str | None
    rev: int
    state_versions: list[str]  # model versions whose stored state is current


@dataclass
class UserView:
    """What scoring needs for one user, read in one round trip."""

    sequence: np.ndarray   # SEQ_DTYPE, oldest first, at most seq_cap
    state: bytes | None    # None when absent or not current for the version asked
    rev: int
    n: int = 0             # records ever placed: the abs index one past the newest (service.block_index)


@dataclass
class IndexHead:
    """What a request reads first on the indexed path (`StateStore.read_index_heads`): enough to bound every
    block's scores, plus the newest records (the seed whose exact scores start the thresholds)."""

    rev: int
    n: int                 # abs index one past the newest record
    stored: int            # records in seq ++ seqt (the oldest may be past the cap)
    seq_records: int       # of which in seq
    visible: int           # min(stored, seq_cap)
    state: bytes | None    # current state of the version (None: absent, stale, or not asked for)
    ix0: int | None        # first block of the index; None when the index is not current (or absent)
    newest: np.ndarray     # the newest min(seed, visible) records, oldest first
    bytes_read: int = 0
    view: UserView | None = None  # read with `whole`: the user's whole sequence and state, as read_users


@dataclass
class _Plan:
    user_id: int
    rev: int
    records: np.ndarray     # new events to send, sorted
    eids: list[str]         # aligned with records
    state: bytes = b""
    outside: int = 0
    duplicates: int = 0
    late: list[Event] = field(default_factory=list)
    erased: list[Event] = field(default_factory=list)
    tombstone: str = "-"                       # the erase tombstone planned with ("-": none)
    rebuilt: bool = False
    n: int = 0                                 # records ever placed, at `rev`
    index: "IndexUpdate | None" = None         # block index update written with the batch


@dataclass(frozen=True, eq=False)
class LuaScript:
    text: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.text.encode()).hexdigest())


def _pack_ids(ids: list[str]) -> tuple[bytes, bytes]:
    """Event ids as two script arguments: their byte lengths (<u4 each) and their concatenation."""
    raw = [i.encode() for i in ids]
    return struct.pack(f"<{len(raw)}I", *map(len, raw)), b"".join(raw)


def _not_before(records: np.ndarray, hwm: tuple[int, int] | None) -> bool:
    """The sorted records all come at or after the high-water mark (equal keys go after, as in Lua)."""
    return hwm is None or not len(records) or (int(records["ts"][0]), int(records["tb"][0])) >= hwm


class StateStore:
    def __init__(self, client: redis.Redis, cfg: StateStoreConfig):
        self.client = client
        self.cfg = cfg
        self.keys = KeySpace(cfg.key_prefix)
        lua = resources.files("service") / "lua"
        self._apply_script = LuaScript((lua / "apply.lua").read_text())
        self._snapshot_script = LuaScript((lua / "snapshot.lua").read_text())
        self._set_state_script = LuaScript((lua / "set_state.lua").read_text())
        self._erase_script = LuaScript((lua / "erase.lua").read_text())

    # ---- writes -------------------------------------------------------------------------------

    def apply(self, updater: StateUpdater, events: Sequence[Event]) -> ApplyReport:
        """Apply a batch exactly once per event id; safe to call again with any of the same events."""
        version = check_version(updater.version)
        by_user: dict[int, list[Event]] = defaultdict(list)
        for e in events:
            by_user[e.user_id].append(e)
        report = ApplyReport()
        pending = dict(by_user)
        for _ in range(self.cfg.cas_retries):
            plans = self._plan(updater, version, pending)
            retry = self._commit(version, plans, report)
            report.conflicts += len(retry)
            pending = {u: by_user[u] for u in retry}
            if not pending:
                return report
        raise StateStoreError(
            f"users {sorted(pending)[:10]} still conflicting after {self.cfg.cas_retries} attempts")

    def rebuild(self, updater: StateUpdater, user_ids: Iterable[int], chunk: int = 256) -> int:
        """Recompute states of `updater.version` from the stored sequences (e.g. a new model version).

        Returns the number of users written; a user whose events moved on meanwhile is retried. Users go
        `chunk` at a time, so memory holds at most `chunk` sequences (290 KB each at the default cap).
        """
        check_version(updater.version)
        ids = list(user_ids)
        return sum(self._rebuild_chunk(updater, ids[i:i + chunk]) for i in range(0, len(ids), chunk))

    def rebuild_from_log(self, updater: StateUpdater, log: dict[int, np.ndarray], user_ids: Iterable[int],
                         chunk: int = 256) -> int:
        """Lifelong states of `updater.version`: each user's state over the union of its events in the offline
        log (`log`, from service.event_log.read_log) and its stored sequence (what the stream applied since,
        as far as the cap keeps it). The sequence itself is left as it is. -> users written."""
        check_version(updater.version)
        from service.event_log import union

        ids = list(user_ids)
        empty = np.zeros(0, SEQ_DTYPE)
        merge = lambda u, seq: union(log.get(u, empty), seq)  # noqa: E731
        return sum(self._rebuild_chunk(updater, ids[i:i + chunk], merge) for i in range(0, len(ids), chunk))

    def _rebuild_chunk(self, updater: StateUpdater, user_ids: Sequence[int], merge=None) -> int:
        version = updater.version
        pending = list(user_ids)
        written = 0
        for _ in range(self.cfg.cas_retries):
            if not pending:
                return written
            views = self._read(pending, version=None)
            seqs = [v.sequence if merge is None else merge(u, v.sequence) for u, v in zip(pending, views)]
            states = updater.rebuild(seqs)
            indexer = self._indexer(updater)
            # from the stored sequences only: the search reads nothing else
            ixs = (indexer.full_many([v.sequence for v in views], [v.n - len(v.sequence) for v in views])
                   if indexer is not None else [None] * len(views))
            calls = []
            for u, v, s, ix in zip(pending, views, states, ixs, strict=True):
                k = self.keys.user(u)
                args = [v.rev, version, s]
                if ix is not None:
                    args += [ix.b0, ix.entries, ix.fmt]
                calls.append((self._set_state_script, [k.meta, k.state(version), k.index(version), k.erased], args))
            replies = self._eval_many(calls)
            written += sum(r[0] == b"ok" for r in replies)
            pending = [u for u, r in zip(pending, replies) if r[0] == b"conflict"]  # erased users: nothing to write
        if pending:
            raise StateStoreError(f"users {pending[:10]} still conflicting after {self.cfg.cas_retries} attempts")
        return written

    def _indexer(self, updater) -> "BlockIndexer | None":
        """The block index the store keeps for this updater's version (None: off, or not a DARE-like model)."""
        make = getattr(updater, "block_indexer", None)
        return make(self.cfg.index_block) if make is not None and self.cfg.index_block > 0 else None

    def _plan(self, updater: StateUpdater, version: str, by_user: dict[int, list[Event]]) -> list[_Plan]:
        users = list(by_user)
        indexer = self._indexer(updater)
        entry = str(indexer.entry_bytes) if indexer is not None else "0"
        calls = []
        uniq: dict[int, list[Event]] = {}
        for u in users:
            k = self.keys.user(u)
            first: dict[str, Event] = {}
            for e in by_user[u]:
                first.setdefault(e.event_id, e)
            uniq[u] = list(first.values())
            calls.append((self._snapshot_script, [k.meta, k.state(version), k.dedup, k.index(version), k.erased],
                          [version, *_pack_ids([e.event_id for e in uniq[u]]), entry]))
        replies = self._eval_many(calls)

        plans, fast, slow = [], [], []
        ix_last: dict[int, bytes | None] = {}
        for u, (rev, hwm_ts, hwm_tb, floor, srev, state, seen, n, ixrev, _ix0, ixfmt, last, tomb) in zip(users, replies):
            rev = int(rev or 0)
            floor = None if floor is None else int(floor)
            cut = None if tomb is None else stream_position(tomb)
            fresh, late, erased = [], [], []
            for e, s in zip(uniq[u], seen or b""):
                if s == 49:  # b"1": in the dedup window
                    continue
                if cut is not None and e.stream_id and stream_position(e.stream_id) <= cut:
                    erased.append(e)
                    continue
                (late if floor is not None and e.ts < floor else fresh).append(e)
            rec, eids = to_records(fresh)
            plan = _Plan(u, rev, rec, eids, duplicates=len(by_user[u]) - len(fresh) - len(late) - len(erased),
                         late=late, erased=erased, tombstone="-" if tomb is None else tomb.decode(), n=int(n or 0))
            plans.append(plan)
            if indexer is not None and (rev == 0 or (ixrev is not None and int(ixrev) == rev
                                                     and ixfmt is not None and ixfmt.decode() == indexer.fmt)):
                ix_last[u] = last or None
            if not fresh:
                continue
            current = (srev is not None and int(srev) == rev and state is not None) or rev == 0
            hwm = None if hwm_ts is None else (int(hwm_ts), int(hwm_tb))
            (fast if current and _not_before(rec, hwm) else slow).append((plan, state if rev else None, current, hwm))

        fold = [(p, s, p.records) for p, s, _, _ in fast]
        rebuild = []
        # The block index: an in-order batch on a current index widens the open block and adds new ones;
        # anything else (a merge, a stale index) rebuilds it from the sequence the script will leave.
        stale_ix = []
        if indexer is not None:
            inc = [p for p, _, _, _ in fast if p.user_id in ix_last]
            stale_ix = [p for p, _, _, _ in fast if p.user_id not in ix_last]
            for p, up in zip(inc, indexer.append_many([ix_last[p.user_id] for p in inc], [p.n for p in inc],
                                                      [p.records for p in inc])):
                p.index = up
        rebuild_ix: list[tuple[_Plan, np.ndarray, int]] = []
        if stale_ix:
            for p, tail in zip(stale_ix, self._read_tails([p.user_id for p in stale_ix])):
                placed, merged = self._place(p, tail)
                rebuild_ix.append((p, merged, p.n + len(placed) - len(merged)))
        if slow:
            # Only now is it known which events fall outside the cap: those are neither placed nor
            # folded, and if the rest is in order the state can still be folded forward.
            tails = self._read_tails([p.user_id for p, _, _, _ in slow])
            for (p, s, current, hwm), tail in zip(slow, tails):
                placed, merged = self._place(p, tail)
                if indexer is not None:
                    rebuild_ix.append((p, merged, p.n + len(placed) - len(merged)))
                if current and not len(placed):
                    p.state = s
                elif current and _not_before(placed, hwm):
                    fold.append((p, s, placed))
                else:
                    rebuild.append((p, merged))
        if rebuild_ix:
            ups = indexer.full_many([m for _, m, _ in rebuild_ix], [f for _, _, f in rebuild_ix])
            for (p, _, _), up in zip(rebuild_ix, ups):
                p.index = up
        if fold:
            new = updater.apply([s for _, s, _ in fold], [e for _, _, e in fold])
            self._check_states(new, len(fold))
            for (p, _, _), s in zip(fold, new):
                p.state = s
        if rebuild:
            new = updater.rebuild([m for _, m in rebuild])
            self._check_states(new, len(rebuild))
            for (p, _), s in zip(rebuild, new):
                p.state, p.rebuilt = s, True
        return plans

    def _place(self, plan: _Plan, tail: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(events placed, the sequence left visible), computed the way the Lua script places events."""
        new = plan.records
        if len(tail) >= self.cfg.seq_cap:
            first = (int(tail["ts"][0]), int(tail["tb"][0]))
            keep = np.array([(int(t), int(b)) >= first for t, b in zip(new["ts"], new["tb"])], dtype=bool)
            plan.outside = int((~keep).sum())
            new = new[keep]
        both = np.concatenate([tail, new])
        return new, both[np.lexsort((both["tb"], both["ts"]))][-self.cfg.seq_cap:]

    def _commit(self, version: str, plans: list[_Plan], report: ApplyReport) -> list[int]:
        todo = [p for p in plans if len(p.records)]
        calls = []
        cfg = self.cfg
        for p in todo:
            k = self.keys.user(p.user_id)
            nums = (f"{p.rev} {cfg.seq_cap} {cfg.seq_slack} {cfg.dedup_window_ms} {cfg.dedup_max_ids} {len(p.records)} "
                    f"{cfg.user_ttl_s * 1000} {p.tombstone}")
            args = [nums, version, p.state, p.records.tobytes(), *_pack_ids(p.eids)]
            if p.index is not None:
                ix = p.index
                args += [f"{ix.mode} {cfg.index_block} {ix.entry_bytes} {ix.b0}",
                         ix.entries, ix.fmt]
            calls.append((self._apply_script, [k.meta, k.seq, k.tail, k.dedup, k.state(version), k.index(version),
                                               k.erased], args))
        replies = self._eval_many(calls)
        retry = []
        done = {p.user_id for p in plans} - {p.user_id for p in todo}
        for p, r in zip(todo, replies):
            if r[0] != b"ok":
                retry.append(p.user_id)
                continue
            placed, outside = int(r[2]), int(r[3])
            if outside != p.outside or placed != len(p.records) - p.outside:
                raise StateStoreError(
                    f"user {p.user_id}: script placed {placed} / outside {outside}, plan said "
                    f"{len(p.records) - p.outside} / {p.outside}: state would not match the sequence")
            done.add(p.user_id)
        for p in plans:
            if p.user_id in done:
                report.applied += len(p.records) - p.outside
                report.outside_cap += p.outside
                report.duplicates += p.duplicates
                report.rebuilt_users += p.rebuilt
                report.late += p.late
                report.erased += p.erased
                report.by_user[p.user_id] = Counter(applied=len(p.records) - p.outside, duplicates=p.duplicates,
                                                    outside_cap=p.outside)
        return retry

    def erase(self, user_id: int, position: str) -> int:
        """Delete every key holding the user's data (sequence, meta, dedup window, every version's state and
        block index) and leave the tombstone: the user's events accepted up to stream `position` (the
        partition's last entry id when the erase was asked for) are dropped when a worker reaches them, for
        `erase_tombstone_s`. Idempotent; -> keys deleted."""
        k = self.keys.user(user_id)
        for _ in range(self.cfg.cas_retries):
            versions = sorted({f.split(":", 1)[1] for f in (b.decode() for b in self.client.hkeys(k.meta))
                               if f.split(":", 1)[0] in ("srev", "ixrev", "ix0", "ixfmt")})
            data = k.data(versions)
            r = self._eval_many([(self._erase_script, data[:4] + [k.erased] + data[4:],
                                  [" ".join(versions), position, self.cfg.erase_tombstone_s * 1000])])[0]
            if r[0] == b"ok":
                return int(r[1])
        raise StateStoreError(f"user {user_id}: its model versions kept changing during {self.cfg.cas_retries} "
                              "erase attempts")

    def _eval_many(self, calls: list[tuple["LuaScript", list[str], list]]) -> list:
        """EVALSHA each (script, keys, args) in one pipelined round trip; replies in order.

        Plain EVALSHA commands rather than redis-py's Script objects: those cannot be pipelined on a
        cluster, and in a pipeline they cost a SCRIPT EXISTS round trip per execute. A script the server
        does not know (restarted, flushed, failed over) is loaded on every primary and only the calls
        that got NOSCRIPT run again: the others did run, and a script must not run twice.
        """
        if not calls:
            return []
        replies: list = [None] * len(calls)
        todo = list(range(len(calls)))
        for attempt in range(2):
            pipe = self.client.pipeline(transaction=False)
            for i in todo:
                script, keys, args = calls[i]
                pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
            got = pipe.execute(raise_on_error=False)
            missing = []
            for i, r in zip(todo, got):
                if isinstance(r, redis.exceptions.NoScriptError) and not attempt:
                    missing.append(i)
                elif isinstance(r, Exception):
                    raise r
                else:
                    replies[i] = r
            if not missing:
                return replies
            for script in {calls[i][0] for i in missing}:
                self.client.script_load(script.text)
            todo = missing
        raise AssertionError("unreachable")

    @staticmethod
    def _check_states(states: list, n: int) -> None:
        if len(states) != n or not all(isinstance(s, bytes) for s in states):
            raise StateStoreError(f"StateUpdater returned {len(states)} states for {n} users, or non-bytes states")

    # ---- reads --------------------------------------------------------------------------------

    def _read_tails(self, user_ids: Sequence[int]) -> list[np.ndarray]:
        pipe = self.client.pipeline(transaction=False)
        for u in user_ids:
            k = self.keys.user(u)
            pipe.get(k.seq)
            pipe.get(k.tail)
        r = pipe.execute()
        return [self._visible(r[2 * i], r[2 * i + 1]) for i in range(len(user_ids))]

    def _visible(self, seq: bytes | None, tail: bytes | None) -> np.ndarray:
        """The newest `seq_cap` records of seq ++ tail (the script keeps seq at most `seq_cap` long)."""
        both = decode_sequence((seq or b"") + tail) if tail else decode_sequence(seq or b"")
        return both[-self.cfg.seq_cap:]

    def _read(self, user_ids: Sequence[int], version: str | None) -> list[UserView]:
        # MULTI gives a consistent snapshot on a single server; a cluster cannot span slots in one.
        pipe = self.client.pipeline(transaction=not self.cfg.cluster)
        for u in user_ids:
            k = self.keys.user(u)
            # rev first, as in _plan: a sequence newer than the rev read makes a later CAS fail.
            pipe.hmget(k.meta, "rev", "n")
            pipe.get(k.seq)
            pipe.get(k.tail)
            if version:
                pipe.hget(k.meta, f"srev:{version}")
                pipe.get(k.state(version))
        replies = pipe.execute()
        step = 5 if version else 3
        views = []
        for i in range(len(user_ids)):
            (rev, n), seq, tail, *st = replies[step * i: step * (i + 1)]
            rev = int(rev or 0)
            state = st[1] if st and st[0] is not None and int(st[0]) == rev else None
            views.append(UserView(sequence=self._visible(seq, tail), state=state, rev=rev, n=int(n or 0)))
        return views

    def read_index_heads(self, user_ids: Sequence[int], version: str, fmt: str, seed: int,
                         with_state: bool, whole: bool = False) -> list[IndexHead]:
        """The indexed path's first round trip, for many users: meta (is the block index of `version` current,
        in format `fmt`), the newest `seed` records and (with_state) the state. The summaries come next
        (`read_index_entries`), only those of the blocks the position bound leaves.

        `whole`: read each user's whole sequence and state instead of its newest records (the same snapshot,
        in the same round trip), kept as `IndexHead.view` (what `read_users` returns): when the index is
        expected not to prune, the whole-sequence path then needs no second read."""
        check_version(version)
        pipe = self.client.pipeline(transaction=not self.cfg.cluster)
        span = seed * RECORD_BYTES
        for u in user_ids:
            k = self.keys.user(u)
            pipe.hmget(k.meta, "rev", "n", f"srev:{version}", f"ixrev:{version}", f"ix0:{version}", f"ixfmt:{version}")
            if whole:
                pipe.get(k.seq)
                pipe.get(k.tail)
                pipe.get(k.state(version))
                continue
            pipe.strlen(k.seq)
            pipe.strlen(k.tail)
            pipe.getrange(k.seq, -span, -1)
            pipe.getrange(k.tail, -span, -1)
            if with_state:
                pipe.get(k.state(version))
        replies = pipe.execute()
        step = 4 if whole else 6 if with_state else 5
        out = []
        for i in range(len(user_ids)):
            view = None
            if whole:
                (rev, n, srev, ixrev, ix0, ixfmt), seq, tail, state_bytes = replies[step * i: step * (i + 1)]
                seq, tail = seq or b"", tail or b""
                m, t, seq_end, tail_end, st = len(seq), len(tail), seq[-span:], tail[-span:], [state_bytes]
            else:
                (rev, n, srev, ixrev, ix0, ixfmt), m, t, seq_end, tail_end, *st = replies[step * i: step * (i + 1)]
            rev = int(rev or 0)
            stored = (m + t) // RECORD_BYTES
            visible = min(stored, self.cfg.seq_cap)
            newest = decode_sequence(seq_end[len(seq_end) % RECORD_BYTES:] + tail_end if seq_end else tail_end)
            newest = newest[len(newest) - min(seed, visible, len(newest)):]
            current = ixrev is not None and int(ixrev) == rev and ixfmt is not None and ixfmt.decode() == fmt
            state = st[0] if st and srev is not None and int(srev) == rev else None
            if whole:
                view = UserView(sequence=self._visible(seq, tail), state=state, rev=rev, n=int(n or 0))
                read = m + t + len(st[0] or b"")
            else:
                read = len(seq_end) + len(tail_end) + len(st[0] or b"" if st else b"")
            out.append(IndexHead(rev=rev, n=int(n or 0), stored=stored, seq_records=m // RECORD_BYTES, visible=visible,
                                 state=state if with_state else None, ix0=int(ix0) if current else None, newest=newest,
                                 bytes_read=read, view=view))
        return out

    def read_index_entries(self, requests: Sequence[tuple[int, IndexHead, Sequence[tuple[int, int]]]], version: str,
                           entry_bytes: int) -> list[list[bytes] | None]:
        """The indexed path's second round trip: per (user, head, [(first block, last block + 1), ...]) the
        block summaries of those runs, or None when the user's rev moved since the head was read."""
        pipe = self.client.pipeline(transaction=not self.cfg.cluster)
        for u, head, runs in requests:
            k = self.keys.user(u)
            pipe.hget(k.meta, "rev")
            for a, b in runs:
                pipe.getrange(k.index(version), (a - head.ix0) * entry_bytes, (b - head.ix0) * entry_bytes - 1)
        replies = pipe.execute() if requests else []
        out, at = [], 0
        for u, head, runs in requests:
            rev = int(replies[at] or 0)
            got = replies[at + 1: at + 1 + len(runs)]
            at += 1 + len(runs)
            ok = rev == head.rev and all(len(g) == (b - a) * entry_bytes for g, (a, b) in zip(got, runs))
            out.append(list(got) if ok else None)
        return out

    def read_ranges(self, requests: Sequence[tuple[int, IndexHead, Sequence[tuple[int, int]]]]) -> list[list[np.ndarray] | None]:
        """The indexed path's second round trip: per (user, head, [(abs lo, abs hi), ...]) the records of
        each range (oldest first), or None when the user's rev moved since the head was read (the layout
        may have changed: the caller reads again)."""
        pipe = self.client.pipeline(transaction=not self.cfg.cluster)
        shape = []
        for u, head, ranges in requests:
            k = self.keys.user(u)
            pipe.hget(k.meta, "rev")
            base = head.n - head.stored                # abs index of the first stored record
            parts = []
            for lo, hi in ranges:
                a, b = lo - base, hi - base            # physical record positions in seq ++ seqt
                got = 0
                if a < head.seq_records:
                    pipe.getrange(k.seq, a * RECORD_BYTES, min(b, head.seq_records) * RECORD_BYTES - 1)
                    got += 1
                if b > head.seq_records:
                    a2 = max(a, head.seq_records) - head.seq_records
                    pipe.getrange(k.tail, a2 * RECORD_BYTES, (b - head.seq_records) * RECORD_BYTES - 1)
                    got += 1
                parts.append(got)
            shape.append(parts)
        replies = pipe.execute() if requests else []
        out, at = [], 0
        for (u, head, ranges), parts in zip(requests, shape):
            rev = int(replies[at] or 0)
            at += 1
            recs = []
            for got in parts:
                recs.append(decode_sequence(b"".join(replies[at:at + got])))
                at += got
            ok = rev == head.rev and all(len(r) == hi - lo for r, (lo, hi) in zip(recs, ranges))
            out.append(recs if ok else None)
        return out

    def read_users(self, user_ids: Sequence[int], version: str) -> list[UserView]:
        """Sequences and current states of `version` for many users in one round trip."""
        return self._read(user_ids, check_version(version))

    def iter_user_ids(self) -> Iterator[int]:
        """Every user with applied events (SCAN: no blocking, order undefined)."""
        for key in self.client.scan_iter(match=self.keys.user_meta_pattern(), count=1000):
            yield self.keys.user_of(key)

    def summary(self, user_id: int) -> UserSummary:
        k = self.keys.user(user_id)
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(k.meta)
        pipe.strlen(k.seq)
        pipe.strlen(k.tail)
        meta, seq_bytes, tail_bytes = pipe.execute()
        meta = {a.decode(): b.decode() for a, b in meta.items()}
        rev = int(meta.get("rev", 0))
        return UserSummary(
            user_id=user_id,
            history_len=min((seq_bytes + tail_bytes) // RECORD_BYTES, self.cfg.seq_cap),
            events_applied=int(meta.get("n", 0)),
            last_event_ts=int(meta["hwm_ts"]) if "hwm_ts" in meta else None,
            last_event_id=meta.get("hwm_eid"),
            rev=rev,
            state_versions=sorted(f[5:] for f, v in meta.items() if f.startswith("srev:") and int(v) == rev),
        )
