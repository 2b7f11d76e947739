"""recsys.checkpoint's chunked reader of DCP safetensors shard files: what it copies equals the stored
tensors bit for bit however the destination is cut (rows and columns, ranges across stored shards), and it
never holds more than one chunk beyond the destination (its largest buffer and read; and the one-process
read's peak RSS is the tables plus at most a chunk, not plus a stored shard as with DCP's stock reader).

The shard files are written in the format the training ranks write (one file per rank, each shard's offset
in the JSON header's DCP_SHARDING_INFO); the destinations are ShardedTensors with several local shards in
a 1-rank gloo group, so DCP's own planner asks for row and column sub-ranges of the stored shards.
"""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed._shard.sharded_tensor import Shard, init_from_local_shards

from recsys.checkpoint import CHUNK_BYTES, SHAPES_KEY, TABLES, WEIGHTS, chunked_reader, read_weights

ROWS, DIM = 3000, 5


def _write(folder: Path, tables: dict[str, tuple[torch.Tensor, list[int]]]) -> None:
    """One file per 'rank' i holding rows cuts[i]:cuts[i + 1] of each table (0-d tensors: file 1 only)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = max(len(cuts) - 1 for _, cuts in tables.values())
    for i in range(files):
        tensors, offsets = {}, {}
        for key, (full, cuts) in tables.items():
            if full.dim() == 0:
                if i == 0:
                    tensors[key], offsets[key] = full, {"saved_offsets": []}
            elif i < len(cuts) - 1:
                tensors[key] = full[cuts[i]:cuts[i + 1]].contiguous()
                offsets[key] = {"saved_offsets": [cuts[i]] + [0] * (full.dim() - 1)}
        save_file(tensors, folder / f"shard-{i + 1:05d}-model-00001-of-00001.safetensors",
                  metadata={"DCP_SHARDING_INFO": json.dumps(offsets), "DCP_VERSION": "1.0", "format": "pt"})


def _sharded(full: torch.Tensor, boxes: list[tuple[int, int, int, int]]):
    """A ShardedTensor of `full`'s shape whose local shards are the boxes (row0, row1, col0, col1), all NaN."""
    shards = [Shard.from_tensor_and_offsets(torch.full((r1 - r0, c1 - c0), float("nan"), dtype=full.dtype), [r0, c0], 0)
              for r0, r1, c0, c1 in boxes]
    return init_from_local_shards(shards, *full.shape)


@pytest.fixture
def one_rank():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_chunks_smaller_than_a_shard_reshard_rows_and_columns_bit_for_bit(tmp_path, one_rank):
    """Stored in 3 files at rows 0/700/1900; read into shards cut at other rows and columns with a chunk
    of 64 rows and a bit (so chunks end inside stored shards and inside each requested range, and a range
    spans two stored shards): every destination shard equals the stored rows; whole rows were read in
    place, column ranges through a buffer of one chunk, and no read was larger than a chunk."""
    g = torch.Generator().manual_seed(0)
    item = torch.randn(ROWS, DIM, generator=g)
    state = torch.rand(ROWS, generator=g, dtype=torch.float64)
    step = torch.tensor(17, dtype=torch.int64)
    _write(tmp_path, {"item": (item, [0, 700, 1900, ROWS]), "state": (state, [0, 1234, ROWS]), "step": (step, [])})

    rows_cut = _sharded(item, [(0, 1000, 0, DIM), (1000, 1500, 0, DIM), (1500, ROWS, 0, DIM)])
    grid = _sharded(item, [(0, 1600, 0, DIM), (1600, ROWS, 0, 2), (1600, ROWS, 2, DIM)])
    vec = torch.full((ROWS,), float("nan"), dtype=torch.float64)
    dest = {"item": rows_cut, "state": vec, "step": torch.tensor(0, dtype=torch.int64)}
    chunk = 64 * DIM * 4 + 7
    reader = chunked_reader(tmp_path, chunk_bytes=chunk)
    dcp.load(dest, storage_reader=reader)
    # whole rows into contiguous shards: read in place, no buffer
    assert reader.largest_buffer == 0 and reader.largest_read == 64 * DIM * 4
    # one read per chunk of each (destination shard x stored shard) range: 64 rows of item, 160 of state
    ranges = {64: [700, 300, 500, 400, 1100], 160: [1234, ROWS - 1234]}
    assert reader.reads == sum(-(-n // k) for k, ns in ranges.items() for n in ns) + 1

    again = chunked_reader(tmp_path, chunk_bytes=chunk)
    dcp.load({"item": grid}, storage_reader=again)
    assert again.largest_buffer == again.largest_read == 64 * DIM * 4  # column ranges go through the buffer
    for st in (rows_cut, grid):
        for s in st.local_shards():
            (r0, c0), (r, c) = s.metadata.shard_offsets, s.metadata.shard_sizes
            assert torch.equal(s.tensor, item[r0:r0 + r, c0:c0 + c]), s.metadata
    assert torch.equal(dest["state"], state) and int(dest["step"]) == 17


def test_a_chunk_smaller_than_a_row_reads_one_row_at_a_time(tmp_path):
    """The chunk's floor is one stored row: a 3-byte chunk still copies every row exactly."""
    item = torch.arange(40 * DIM, dtype=torch.float32).view(40, DIM)
    _write(tmp_path, {"item": (item, [0, 13, 40])})
    out = {"item": torch.zeros(40, DIM)}
    reader = chunked_reader(tmp_path, chunk_bytes=3)
    dcp.load(out, storage_reader=reader, no_dist=True)
    assert torch.equal(out["item"], item) and reader.largest_read == DIM * 4 and reader.reads == 40


def _peak_of_read(folder: str, rows: int, dim: int, queue) -> None:
    """In a fresh process: RSS before read_weights, its peak during it (VmHWM reset just before), and
    whether it read the table exactly."""
    def status(field):
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field + ":"))

    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = status("VmRSS")
    got = read_weights(folder)
    peak = status("VmHWM")
    queue.put((before, peak, torch.equal(got["tables.item"], torch.arange(rows * dim, dtype=torch.float32).view(rows, dim))))


def test_one_process_read_peaks_at_the_tables_plus_a_chunk(tmp_path):
    """read_weights (the bundle export) of a 64 MB table stored as two 32 MB rank files: its peak RSS is
    the table plus at most a chunk and 4 MB of slack, well under the table plus one stored shard (what DCP's
    stock safetensors reader adds by materialising every shard before copying it)."""
    rows, dim = 4_000_000, 4
    item = torch.arange(rows * dim, dtype=torch.float32).view(rows, dim)
    save_file({"head.bias": torch.zeros(1)}, tmp_path / WEIGHTS, metadata={SHAPES_KEY: json.dumps({"tables.item": [rows, dim]})})
    _write(tmp_path / TABLES, {"tables.item": (item, [0, rows // 2, rows])})
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=_peak_of_read, args=(str(tmp_path), rows, dim, queue))
    p.start()
    before, peak, exact = queue.get(timeout=120)
    p.join()
    assert p.exitcode == 0 and exact
    table = rows * dim * 4
    assert peak - before < table + CHUNK_BYTES + (4 << 20), (peak - before) / 2**20
