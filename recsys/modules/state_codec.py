"""Per-user streaming state <-> bytes, for the Redis state store.

Format: safetensors bytes (a JSON header + raw little-endian arrays; nothing is executed on load),
with header metadata {"format": "recsys-state/1", "kind": "aaren" | "titans", "model_version": ...}.
A state is only valid for the model that wrote it, so `decode` refuses another model version, another
format version, a different kind, missing or extra tensors, and truncated or corrupt bytes, each with a
message that names what is wrong. `split` / `stack` turn a batched state into per-user states (batch 1,
what one Redis key holds) and back.
"""

from __future__ import annotations

import json
from dataclasses import fields

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from recsys.modules.aaren import AarenState
from recsys.modules.titans import MemoryState

FORMAT = "recsys-state/1"
KINDS: dict[str, type] = {"aaren": AarenState, "titans": MemoryState}
State = AarenState | MemoryState


class StateCodecError(ValueError):
    """State bytes that cannot be decoded into the expected state."""


def _kind(state: State) -> str:
    for kind, cls in KINDS.items():
        if isinstance(state, cls):
            return kind
    raise TypeError(f"not a streaming state: {type(state).__name__}")


def to_tensors(state: State) -> dict[str, torch.Tensor]:
    """Flat name -> tensor; list fields become `name.0`, `name.1`, ..."""
    out = {}
    for f in fields(state):
        value = getattr(state, f.name)
        if isinstance(value, list):
            out.update({f"{f.name}.{i}": t for i, t in enumerate(value)})
        else:
            out[f.name] = value
    return out


def from_tensors(kind: str, tensors: dict[str, torch.Tensor]) -> State:
    cls = KINDS[kind]
    values, used = {}, set()
    for f in fields(cls):
        if f.name in tensors:
            values[f.name] = tensors[f.name]
            used.add(f.name)
            continue
        items = []
        while f"{f.name}.{len(items)}" in tensors:
            used.add(f"{f.name}.{len(items)}")
            items.append(tensors[f"{f.name}.{len(items)}"])
        if not items:
            raise StateCodecError(f"{kind} state: tensor '{f.name}' is missing")
        values[f.name] = items
    extra = sorted(set(tensors) - used)
    if extra:
        raise StateCodecError(f"{kind} state: unexpected tensors {extra}")
    return cls(**values)


def encode(state: State, model_version: str) -> bytes:
    """State (any batch size; the service stores batch 1) -> safetensors bytes tagged with the version."""
    tensors = {k: t.detach().cpu().contiguous() for k, t in to_tensors(state).items()}
    return st_save(tensors, metadata={"format": FORMAT, "kind": _kind(state), "model_version": model_version})


def decode(data: bytes, expected_version: str, kind: str | None = None) -> State:
    """Bytes from `encode` -> state. Raises StateCodecError on a version/format/kind mismatch or bad bytes."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise StateCodecError(f"state bytes: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < 8:
        raise StateCodecError(f"state bytes: truncated ({len(data)} bytes, no header)")
    header_len = int.from_bytes(data[:8], "little")
    if 8 + header_len > len(data):
        raise StateCodecError(f"state bytes: truncated (header says {header_len} bytes, {len(data) - 8} follow)")
    try:
        meta = _metadata(data[8:8 + header_len])
        tensors = st_load(data)
    except (SafetensorError, ValueError) as e:
        raise StateCodecError(f"state bytes: truncated or corrupt: {e}") from None
    if meta.get("format") != FORMAT:
        raise StateCodecError(f"state bytes: format {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("model_version") != expected_version:
        raise StateCodecError(
            f"state bytes: model_version {meta.get('model_version')!r}, expected {expected_version!r} "
            "(rebuild the state for this model)")
    got_kind = meta.get("kind")
    if got_kind not in KINDS or (kind is not None and got_kind != kind):
        raise StateCodecError(f"state bytes: kind {got_kind!r}, expected {kind or sorted(KINDS)!r}")
    return from_tensors(got_kind, tensors)


def _metadata(header: bytes) -> dict:
    try:
        return json.loads(header).get("__metadata__", {}) or {}
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"header is not a JSON object: {e}") from None


def split(state: State) -> list[State]:
    """Batched state -> one state (batch 1) per user."""
    kind, tensors = _kind(state), to_tensors(state)
    return [from_tensors(kind, {k: t[i:i + 1].clone() for k, t in tensors.items()}) for i in range(state.batch_size)]


def stack(states: list[State]) -> State:
    """Per-user states of one kind (batch >= 1 each) -> one batched state, in order."""
    if not states:
        raise ValueError("stack: no states")
    kind = _kind(states[0])
    flat = [to_tensors(s) for s in states]
    for i, (s, t) in enumerate(zip(states, flat)):
        if _kind(s) != kind or t.keys() != flat[0].keys():
            raise ValueError(f"stack: state {i} is a different kind or layout than state 0")
    return from_tensors(kind, {k: torch.cat([t[k] for t in flat]) for k in flat[0]})
