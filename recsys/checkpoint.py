"""A model's weights and buffers as plain named tensors, and back: what bundles (safetensors) and training
checkpoints store. Embedding tables are named `<set>.<table>` through their TableSet, so the same names
come out whether the tables are plain or sharded.

A weights folder (`save_weights` / `load_weights` / `read_weights`; the training loop's best/ and every
checkpoint):
  model.safetensors   every plain tensor (with sharded tables: all but those tables), written by rank 0
  tables/             sharded tables only: torch.distributed.checkpoint (DCP) with its safetensors
                      storage: every rank writes one file holding its own shards
                      (`shard-<rank + 1>-model-00001-of-00001.safetensors`; each shard's offset in the full
                      table in the file's JSON header); no rank gathers a table
  tables_optim/       checkpoints only: the fused optimizer's row-wise state of those shards, the same way
Loading into a sharded model is per rank: each rank reads the parts of the files its shards cover, so a
folder written by N ranks loads into M ranks (DCP reshards by row offsets). `read_weights` reads a folder
into full plain tensors in one process without a process group (the bundle export). Both read through
`chunked_reader`: each stored shard, or the row range of it a destination needs, goes into the destination
in reads of at most CHUNK_BYTES, in place for row-wise shards, else through a buffer of that size, so reading
holds the destination plus at most a chunk. No file of a weights
folder is ever unpickled: DCP's own default storage writes a pickled `.metadata`; its safetensors storage
keeps the sharding in JSON headers instead.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from recsys.embeddings import table_sets

WEIGHTS, TABLES, TABLES_OPTIM = "model.safetensors", "tables", "tables_optim"
SHAPES_KEY = "sharded_tables"  # model.safetensors' header: {"<set>.<table>": [rows, dim]} of the sharded tables
CHUNK_BYTES = 4 << 20  # what reading a shard holds beyond its destination


def state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """All weights and buffers as plain named tensors (tables as `<set>.<table>`; unsharded sets only)."""
    sets = table_sets(model)
    out = {f"{s}.{n}": w.contiguous() for s, t in sets.items() for n, w in t.weights().items()}
    return out | _plain(model)


def load_state_tensors(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """The inverse of state_tensors; with `fused` table sets, every tensor but their tables (these load
    from a weights folder's shards)."""
    sets = table_sets(model)
    plain = {n: t for n, t in list(model.named_parameters()) + list(model.named_buffers()) if not _in_set(n, sets)}
    expected = set(plain) | {f"{s}.{n}" for s, t in sets.items() if t.backend != "fused" for n in t.specs}
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise KeyError(f"model weights: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    for s, t in sets.items():
        if t.backend != "fused":
            t.load_weights({n: state[f"{s}.{n}"] for n in t.specs})
    with torch.no_grad():
        for name, own in plain.items():
            if own.shape != state[name].shape:
                raise ValueError(f"model weight {name!r}: shape {tuple(state[name].shape)}, expected {tuple(own.shape)}")
            own.copy_(state[name])


def save_weights(model: nn.Module, folder: str | Path, rank: int = 0, optimizer: bool = False) -> None:
    """Write `model`'s weights into `folder` (see the module docstring); with `optimizer` also the sharded
    tables' fused optimizer state. With sharded tables every rank calls it (a collective: each rank writes
    its shards, rank 0 also the plain tensors); without, rank 0's call writes everything."""
    folder = Path(folder)
    sharded = _sharded_sets(model)
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        # the sharded tables' full shapes, so a reader can tell a complete set of shard files
        shapes = {f"{s}.{n}": [spec.num_embeddings, spec.dim] for s, t in sharded.items() for n, spec in t.specs.items()}
        save_file(_plain(model) if sharded else state_tensors(model), folder / WEIGHTS,
                  metadata={SHAPES_KEY: json.dumps(shapes)})
    if sharded:
        _save_dcp(_shards(sharded, False), folder / TABLES, sharded)
        if optimizer:
            _save_dcp(_shards(sharded, True), folder / TABLES_OPTIM, sharded)


def load_weights(model: nn.Module, folder: str | Path, optimizer: bool = False) -> None:
    """Load a weights folder into `model` (on every rank when its tables are sharded: each rank reads its own
    shards); with `optimizer` also the sharded tables' fused optimizer state."""
    import torch.distributed.checkpoint as dcp

    folder = Path(folder)
    load_state_tensors(model, load_file(folder / WEIGHTS))
    sharded = _sharded_sets(model)
    if not sharded:
        return
    for sub, opt in [(TABLES, False)] + ([(TABLES_OPTIM, True)] if optimizer else []):
        if not (folder / sub).is_dir():
            raise FileNotFoundError(f"{folder}: no {sub}/ (sharded tables' files) for table sets {sorted(sharded)}")
        reader, _ = _reader(folder / sub)
        try:
            dcp.load(_shards(sharded, opt), storage_reader=reader,
                     process_group=next(iter(sharded.values())).process_group)
        except Exception as e:  # DCP names the tensor; say which folder, so a wrong checkpoint is found
            raise ValueError(f"{folder / sub}: cannot load the sharded tables: {e}") from e


def read_weights(folder: str | Path, optimizer: bool = False) -> dict[str, torch.Tensor]:
    """A weights folder as full plain tensors, in one process and without a process group: the sharded
    tables are assembled from every rank's shard file (bundle export, tests). `optimizer`: also the sharded
    tables' optimizer state (`<set>.<table>.<state>`) of a checkpoint."""
    import torch.distributed.checkpoint as dcp

    folder = Path(folder)
    out = load_file(folder / WEIGHTS)
    with safe_open(folder / WEIGHTS, framework="pt") as f:
        shapes = json.loads((f.metadata() or {}).get(SHAPES_KEY, "{}"))
    for sub in [TABLES] + ([TABLES_OPTIM] if optimizer else []):
        if not shapes:
            break
        reader, metadata = _reader(folder / sub)
        missing = set(shapes) - {k if sub == TABLES else k.rsplit(".", 1)[0] for k in metadata}
        if missing:
            raise ValueError(f"{folder / sub}: no shards of tables {sorted(missing)}")
        for key, md in metadata.items():
            table = key if sub == TABLES else key.rsplit(".", 1)[0]
            if table not in shapes or md.size[0] != shapes[table][0]:
                raise ValueError(f"{folder / sub}: {key!r} has {md.size[0]} rows in its shard files, the model saved "
                                 f"tables {shapes} (a rank's file missing or from another run?)")
        # the full shapes come from the files' headers (each shard's offset + size)
        tables = {k: torch.empty(md.size, dtype=md.properties.dtype) for k, md in metadata.items()}
        dcp.load(tables, storage_reader=reader, no_dist=True)
        out |= tables
    return out


def _reader(path: Path):
    """A chunked reader of `path` and its tensors' metadata, checked complete: DCP would leave the rows of a
    missing shard file unset without a word."""
    reader = chunked_reader(path)
    metadata = reader.read_metadata().state_dict_metadata
    if not metadata:
        raise FileNotFoundError(f"{path}: no shard files")
    for key, md in metadata.items():
        covered = sum(math.prod(c.sizes) for c in md.chunks)
        if covered != math.prod(md.size):
            raise ValueError(f"{path}: {key!r} {tuple(md.size)}: the shard files hold {covered} of its "
                             f"{math.prod(md.size)} values (a rank's file missing or from another run?)")
    return reader, metadata


def chunked_reader(path: str | Path, chunk_bytes: int = CHUNK_BYTES):
    """DCP's safetensors storage reader (the layout from the files' JSON headers, as HuggingFaceStorageReader)
    copying every stored shard, or the row range of it a destination shard covers, into the destination
    in positioned reads of at most `chunk_bytes` (at least one stored row) at the offsets the file's header
    gives: whole rows of the stored dtype straight into the destination's memory, anything else (a column
    range, another dtype, a non-contiguous destination) through one buffer of that size. The stock reader
    materialises each requested slice whole (safetensors' get_slice) before copying it: one transient copy
    of the rank's shards at resume, and of the largest shard in a one-process read. (Reading in place also
    spares a copy_ per chunk: through the buffer, the one-process read ran ~3x slower than the stock reader
    with two torch threads on a loaded 2-core machine.)
    `largest_buffer` / `largest_read` / `reads`: the largest buffer it held and the largest read (bytes),
    how many reads it made, for the tests."""
    from torch.distributed.checkpoint._hf_utils import DTYPE_MAP
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader
    from torch.distributed.checkpoint.planner import LoadItemType
    from torch.futures import Future

    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")

    def header(fd: int, name: str) -> tuple[dict, int]:
        """The safetensors JSON header and where the data starts."""
        n = int.from_bytes(os.pread(fd, 8, 0), "little")
        raw = os.pread(fd, n, 8)
        if len(raw) != n:
            raise ValueError(f"{name}: the file ends inside its safetensors header")
        return json.loads(raw), 8 + n

    class ChunkedReader(HuggingFaceStorageReader):
        largest_buffer, largest_read, reads = 0, 0, 0

        def read_data(self, plan, planner):
            per_file: dict[str, list] = {}
            for req in plan.items:
                per_file.setdefault(self.storage_data[req.storage_index].relative_path, []).append(req)
            for name, reqs in per_file.items():
                fd = os.open(name, os.O_RDONLY)
                try:
                    head, start = header(fd, name)
                    for req in reqs:
                        self._copy(fd, name, head, start, req, planner)
                finally:
                    os.close(fd)
            fut: Future = Future()
            fut.set_result(None)
            return fut

        def _copy(self, fd, name, head, start, req, planner) -> None:
            key = req.storage_index.fqn
            if req.type != LoadItemType.TENSOR or key not in head:
                raise ValueError(f"{name}: no tensor {key!r} to read ({req.type})")
            entry = head[key]
            dtype, shape = DTYPE_MAP[entry["dtype"]], list(entry["shape"])
            begin, end = entry["data_offsets"]
            esize = torch.empty((), dtype=dtype).element_size()
            if end - begin != math.prod(shape) * esize:
                raise ValueError(f"{name}: {key!r} {shape} {entry['dtype']} spans {end - begin} bytes")
            target = planner.resolve_tensor(req).detach()
            if tuple(target.shape) != tuple(req.lengths):
                raise ValueError(f"{name}: {key!r}: destination {tuple(target.shape)}, read {tuple(req.lengths)}")
            # chunks are whole stored rows (the first dimension); the other dimensions are cut after reading
            row_shape = shape[1:]
            row_bytes = math.prod(row_shape) * esize
            first, count = (req.storage_offsets[0], req.lengths[0]) if shape else (0, 1)
            inner = tuple(slice(o, o + n) for o, n in zip(req.storage_offsets[1:], req.lengths[1:]))
            step = max(1, chunk_bytes // max(row_bytes, 1))
            at_row = start + begin + first * row_bytes
            whole_rows = all(s.start == 0 and s.stop == n for s, n in zip(inner, row_shape))
            if target.numel() and whole_rows and target.dtype == dtype and target.is_contiguous():
                # whole rows into a contiguous destination (row-wise shards): the reads land in its own
                # memory, no buffer and no second copy
                dest = memoryview(target.reshape(-1).view(torch.uint8).numpy())
                for at in range(0, count, step):
                    n = min(step, count - at)
                    self._pread(fd, name, key, dest[at * row_bytes:(at + n) * row_bytes], at_row + at * row_bytes)
            elif target.numel():
                buf = torch.empty(min(step, count) * row_bytes, dtype=torch.uint8)
                self.largest_buffer = max(self.largest_buffer, buf.numel())
                for at in range(0, count, step):
                    n = min(step, count - at)
                    self._pread(fd, name, key, memoryview(buf.numpy())[: n * row_bytes], at_row + at * row_bytes)
                    src = buf[: n * row_bytes].view(dtype)
                    if shape:
                        target[at:at + n].copy_(src.view(n, *row_shape)[(slice(None),) + inner])
                    else:
                        target.copy_(src.view(()))
            planner.commit_tensor(req, target)

        def _pread(self, fd, name, key, view, pos) -> None:
            self.largest_read = max(self.largest_read, len(view))
            while view:
                got = os.preadv(fd, [view], pos)
                if got == 0:
                    raise ValueError(f"{name}: ends inside {key!r}")
                view, pos = view[got:], pos + got
                self.reads += 1

    return ChunkedReader(str(path))


def _save_dcp(state: dict, path: Path, sharded: dict) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save(state, storage_writer=_streaming_writer(path), process_group=next(iter(sharded.values())).process_group)


def _streaming_writer(path: Path):
    """DCP's safetensors storage writer (every rank one file, each shard's offset in the JSON header; what
    HuggingFaceStorageReader reads) writing the file straight from the shards' memory. The stock writer
    serialises the whole file into one bytes object first (safetensors.torch.save): two transient copies of
    the rank's shards, measured as a checkpoint peak of 3x the shard's RSS."""
    from torch.distributed.checkpoint._hf_utils import DTYPE_MAP, _gen_file_name
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageWriter
    from torch.distributed.checkpoint.planner import WriteItemType
    from torch.distributed.checkpoint.storage import WriteResult
    from torch.futures import Future

    names = {dtype: name for name, dtype in DTYPE_MAP.items()}

    class StreamingWriter(HuggingFaceStorageWriter):
        def write_data(self, plan, planner):
            items = [(item, planner.resolve_data(item).detach().contiguous()) for item in plan.items]
            fqns = [item.index.fqn for item, _ in items]
            if any(item.type == WriteItemType.BYTE_IO for item, _ in items) or len(set(fqns)) != len(fqns):
                raise ValueError(f"{path}: only one tensor chunk per key and rank is written, got {fqns}")
            header, sharding, spans, pos = {}, {}, [], 0
            for item, t in items:
                n = t.numel() * t.element_size()
                header[item.index.fqn] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [pos, pos + n]}
                sharding[item.index.fqn] = {"saved_offsets": list(item.tensor_data.chunk.offsets)}
                spans.append((pos, n))
                pos += n
            header["__metadata__"] = {"DCP_SHARDING_INFO": json.dumps(sharding), "DCP_VERSION": "1.0", "format": "pt"}
            raw = json.dumps(header).encode()
            raw += b" " * (-len(raw) % 8)  # safetensors aligns the data to 8 bytes
            name = _gen_file_name(1, 1, plan.storage_data["shard_index"])
            results = []
            if items:
                with open(Path(self.path) / name, "wb") as f:
                    f.write(len(raw).to_bytes(8, "little"))
                    f.write(raw)
                    for _, t in items:
                        f.write(t.reshape(-1).view(torch.uint8).numpy().data)  # the shard's own bytes, no copy
                    f.flush()
                    os.fsync(f.fileno())
                results = [WriteResult(index=item.index, size_in_bytes=n, storage_data=_StorageInfo(name, 8 + len(raw) + at, n))
                           for (item, _), (at, n) in zip(items, spans)]
            fut: Future = Future()
            fut.set_result(results)
            return fut

    return StreamingWriter(str(path), save_distributed=True)


def _sharded_sets(model: nn.Module) -> dict:
    sets = table_sets(model)
    unsharded_fused = [s for s, t in sets.items() if t.backend == "fused" and not t.sharded]
    if unsharded_fused:
        raise ValueError(f"table sets {unsharded_fused} are fused but not sharded yet (TableSet.shard)")
    return {s: t for s, t in sets.items() if t.sharded}


def _shards(sharded: dict, optimizer: bool) -> dict:
    return {f"{s}.{k}": st for s, t in sharded.items() for k, st in t.shard_state(optimizer).items()}


def _in_set(name: str, sets: dict) -> bool:
    return any(name.startswith(s + ".") for s in sets)


def _plain(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every weight and buffer outside the table sets."""
    sets = table_sets(model)
    return {n: t.detach().contiguous() for n, t in list(model.named_parameters()) + list(model.named_buffers())
            if not _in_set(n, sets)}
