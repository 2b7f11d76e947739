"""The Redis key layout, in one place.

Per user u (hash tag `{u:<id>}`: all of one user's keys live in one cluster slot, so one Lua script
may touch them all):
    <prefix>{u:<id>}:meta        hash: rev, n, hwm_ts, hwm_tb, hwm_eid, last_eid, floor, srev:<version>,
                                 ixrev:<version>, ix0:<version>, ixfmt:<version>
    <prefix>{u:<id>}:seq         string: packed 29-byte records (raw catalogue ids), time-ordered (service.state.SEQ_DTYPE),
                                 written whole only (exact allocation), at most the cap
    <prefix>{u:<id>}:seqt        string: the records appended since (the sequence is seq ++ seqt)
    <prefix>{u:<id>}:dedup       zset: applied event id -> ts, the idempotency window
    <prefix>{u:<id>}:st:<ver>    string: opaque model state bytes of model version <ver>
    <prefix>{u:<id>}:ix:<ver>    string: block index of the sequence for model version <ver>
                                 (service.block_index: per block of events, a score-bound summary)
    <prefix>{u:<id>}:erased      string, expiring: the stream position of an erase (DELETE /v1/users/<id>);
                                 events of the user accepted up to it are not applied (service.state.erase)
Per stream partition p (hash tag `{s:<p>}`: partitions spread over the cluster, and a partition's
dead letters and counters share its slot so they can be written with its XACK in one MULTI):
    <prefix>{s:<p>}:events       stream of events
    <prefix>{s:<p>}:dead         stream of rejected events (original fields + reason)
    <prefix>{s:<p>}:stats        hash of counters (rejected:<reason>, ...)
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass

_VERSION = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


@dataclass(frozen=True)
class UserKeys:
    meta: str
    seq: str
    tail: str
    dedup: str
    state_prefix: str
    index_prefix: str
    erased: str

    def state(self, version: str) -> str:
        return self.state_prefix + version

    def index(self, version: str) -> str:
        return self.index_prefix + version

    def data(self, versions: list[str]) -> list[str]:
        """Every key holding the user's data, given the model versions that have a state or index (the meta
        hash's srev:/ixrev:/ix0:/ixfmt: fields name them)."""
        return [self.meta, self.seq, self.tail, self.dedup, *map(self.state, versions), *map(self.index, versions)]


@dataclass(frozen=True)
class PartitionKeys:
    events: str
    dead: str
    stats: str


@dataclass(frozen=True)
class KeySpace:
    prefix: str = "rs:"

    def user(self, user_id: int) -> UserKeys:
        tag = f"{self.prefix}{{u:{user_id}}}"
        return UserKeys(meta=f"{tag}:meta", seq=f"{tag}:seq", tail=f"{tag}:seqt", dedup=f"{tag}:dedup",
                        state_prefix=f"{tag}:st:", index_prefix=f"{tag}:ix:", erased=f"{tag}:erased")

    def user_meta_pattern(self) -> str:
        """SCAN MATCH pattern of every user's meta key (one per user with applied events)."""
        return re.sub(r"([*?\[\]\\])", r"\\\1", self.prefix) + "{u:*}:meta"

    def user_of(self, key: str | bytes) -> int:
        """The user id in one of this key space's user keys."""
        text = key.decode() if isinstance(key, bytes) else key
        if not text.startswith(self.prefix + "{u:"):
            raise ValueError(f"{text!r} is not a user key under prefix {self.prefix!r}")
        return int(text[len(self.prefix) + 3:].split("}", 1)[0])

    @property
    def model_desired(self) -> str:
        """The model every serving process and stream worker converges to (service.model_sync)."""
        return f"{self.prefix}{{m}}:desired"

    @property
    def model_served(self) -> str:
        """Hash: process -> the version it serves, with when it last said so (service.model_sync)."""
        return f"{self.prefix}{{m}}:served"

    def partition(self, p: int) -> PartitionKeys:
        tag = f"{self.prefix}{{s:{p}}}"
        return PartitionKeys(events=f"{tag}:events", dead=f"{tag}:dead", stats=f"{tag}:stats")


def check_version(version: str) -> str:
    """Model versions become part of key names: keep them short and free of braces and spaces."""
    if not _VERSION.match(version):
        raise ValueError(f"model version {version!r}: must match {_VERSION.pattern}")
    return version


def partition_of(user_id: int, n_partitions: int) -> int:
    """Stable across processes and runs (unlike hash() of str); mixes structured id ranges."""
    return zlib.crc32(struct.pack("<q", user_id)) % n_partitions
