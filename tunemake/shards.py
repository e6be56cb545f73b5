"""Safetensors shards read and written a slice of rows at a time, so a model never sits in memory whole.

The safetensors library reads through ``mmap`` (every touched page counts as the process's memory
until the file is closed) and writes only whole state dicts, so the merge stage, which must stay
within about one base shard's size of memory, uses this small implementation of the documented
format (https://github.com/huggingface/safetensors#format):

- 8 bytes: ``N``, the header's length, an unsigned little-endian 64-bit integer;
- ``N`` bytes: a JSON object ``{name: {"dtype": "F16", "shape": [..], "data_offsets": [begin, end]},
  "__metadata__": {"format": "pt"}}``, padded with spaces to a multiple of 8 bytes;
- the tensors' raw little-endian, row-major bytes; offsets count from the end of the header, and
  the tensors fill the data area in order, with no gaps.

Output shards are named as transformers' ``save_pretrained`` names them: ``model.safetensors``
alone, or ``model-00001-of-00003.safetensors``... with ``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator, Protocol, Sequence

import torch

from tunemake.atomic import write_json
from tunemake.errors import TunemakeError, at

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
# The order of safetensors' dtype enum: its save_file stores tensors by dtype, last first, then by name.
_DTYPE_ORDER = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "F16", "BF16", "I32", "F32", "F64", "I64")

SINGLE_FILE = "model.safetensors"
# Elements streamed at a time (at least one row): 2M, so the reused buffers take about 20 MB.
CHUNK_ELEMENTS = 2 * 2**20
INDEX_FILE = "model.safetensors.index.json"
# The header of a real checkpoint is well under a megabyte; this only rejects garbage lengths.
_MAX_HEADER = 100 * 2**20
_METADATA = {"format": "pt"}


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes lie in a safetensors file."""

    path: Path
    dtype: str  # the safetensors name: "F16", "BF16", "F32", ...
    shape: tuple[int, ...]
    offset: int  # of the first byte, from the start of the file
    nbytes: int


def read_header(path: str | os.PathLike) -> dict[str, StoredTensor]:
    """The tensors of a safetensors file, in the order of their bytes in it.

    Raises:
        TunemakeError: the file is missing, or not a well-formed safetensors file.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8).ljust(8, b"\0"))
            if not 2 <= length <= min(_MAX_HEADER, size - 8):
                raise ValueError(f"header length {length} does not fit a file of {size} bytes")
            header = json.loads(handle.read(length))
    except FileNotFoundError:
        raise TunemakeError(at(str(path), "no such file")) from None
    except (ValueError, struct.error) as exc:
        raise TunemakeError(at(str(path), f"not a safetensors file ({exc})")) from None
    header.pop("__metadata__", None)
    tensors, data_start = [], 8 + length
    for name, entry in header.items():
        dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        if dtype not in DTYPES:
            raise TunemakeError(at(str(path), f"{name}: unsupported dtype {dtype}"))
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        if end - begin != nbytes or data_start + end > size:
            message = f"{name}: data_offsets {[begin, end]} do not fit its shape or the file"
            raise TunemakeError(at(str(path), message))
        tensors.append(StoredTensor(path, dtype, shape, data_start + begin, nbytes))
    names = list(header)
    order = sorted(range(len(names)), key=lambda i: tensors[i].offset)
    return {names[i]: tensors[i] for i in order}


def row_chunks(shape: Sequence[int], max_elements: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` ranges of the first dimension, each holding at most ``max_elements``
    elements (at least one row). A 0-d tensor is one chunk ``(0, 1)``."""
    if not shape:
        yield 0, 1
        return
    per_row = max(1, math.prod(shape[1:]))
    step = max(1, max_elements // per_row)
    for start in range(0, shape[0], step):
        yield start, min(shape[0], start + step)


def read_rows(tensor: StoredTensor, start: int, stop: int, handle: BinaryIO | None = None) -> torch.Tensor:
    """Rows ``start:stop`` of a stored tensor, read with plain file reads (no mmap)."""
    dtype = DTYPES[tensor.dtype]
    row_shape = tensor.shape[1:]
    row_bytes = math.prod(row_shape) * dtype.itemsize
    buffer = bytearray((stop - start) * row_bytes)
    own = handle is None
    handle = handle or open(tensor.path, "rb")
    try:
        handle.seek(tensor.offset + start * row_bytes)
        if handle.readinto(buffer) != len(buffer):
            raise TunemakeError(at(str(tensor.path), "file ends inside a tensor"))
    finally:
        if own:
            handle.close()
    if not buffer:
        return torch.empty((stop - start, *row_shape), dtype=dtype)
    values = torch.frombuffer(buffer, dtype=dtype)
    return values.reshape(tensor.shape if not tensor.shape else (stop - start, *row_shape))


def read_tensor(tensor: StoredTensor) -> torch.Tensor:
    """A whole stored tensor (for small ones, such as an adapter's)."""
    return read_rows(tensor, 0, tensor.shape[0] if tensor.shape else 1)


@dataclass(frozen=True)
class PlannedTensor:
    """An output tensor's name, safetensors dtype and shape: all a header needs."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


def _header_entry(tensor: PlannedTensor, begin: int) -> str:
    entry = {"dtype": tensor.dtype, "shape": list(tensor.shape), "data_offsets": [begin, begin + tensor.nbytes]}
    return json.dumps(tensor.name) + ":" + json.dumps(entry, separators=(",", ":"))


def _header(entries: list[str]) -> bytes:
    metadata = json.dumps("__metadata__") + ":" + json.dumps(_METADATA, separators=(",", ":"))
    text = "{" + ",".join([metadata, *entries]) + "}"
    raw = text.encode("utf-8")
    return raw + b" " * (-len(raw) % 8)


def plan_shards(tensors: Sequence[PlannedTensor], max_bytes: int) -> list[list[PlannedTensor]]:
    """Split ``tensors``, in order, into shards whose files (header included) are at most
    ``max_bytes``. A tensor that alone makes a larger file gets a shard of its own, as in
    transformers."""
    shards: list[list[PlannedTensor]] = []
    current: list[PlannedTensor] = []
    entries: list[str] = []
    data = 0
    for tensor in tensors:
        entry = _header_entry(tensor, data)
        if current and 8 + len(_header(entries + [entry])) + data + tensor.nbytes > max_bytes:
            shards.append(current)
            current, entries, data = [], [], 0
            entry = _header_entry(tensor, 0)
        current.append(tensor)
        entries.append(entry)
        data += tensor.nbytes
    if current or not shards:
        shards.append(current)
    return shards


def safetensors_order(tensors: Sequence[PlannedTensor]) -> list[PlannedTensor]:
    """``tensors`` in the order safetensors' ``save_file`` stores them, so a shard written here has
    the bytes of the one transformers' ``save_pretrained`` writes."""
    return sorted(tensors, key=lambda t: (-_DTYPE_ORDER.index(t.dtype), t.name))


def shard_names(count: int) -> list[str]:
    """transformers' file names for ``count`` shards."""
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


class ShardWriter:
    """Write one safetensors file whose tensors are known in advance, a slice of rows at a time.

    The header is written on opening; :meth:`write` then takes the tensors' values in the planned
    order, in as many pieces as convenient; :meth:`close` checks every planned byte came.
    """

    def __init__(self, path: str | os.PathLike, tensors: Sequence[PlannedTensor]):
        entries, offset = [], 0
        for tensor in tensors:
            entries.append(_header_entry(tensor, offset))
            offset += tensor.nbytes
        header = _header(entries)
        self.path = Path(path)
        self.expected = 8 + len(header) + offset
        self.handle = open(self.path, "wb")
        self.handle.write(struct.pack("<Q", len(header)) + header)

    def write(self, values: torch.Tensor) -> None:
        """Append ``values`` (already in the tensor's dtype) as raw bytes."""
        flat = values.detach().contiguous().reshape(-1)
        if flat.numel():
            self.handle.write(memoryview(flat.view(torch.uint8).numpy()))

    def write_bytes(self, data: bytes | bytearray | memoryview) -> None:
        self.handle.write(data)

    def close(self) -> None:
        written = self.handle.tell()
        self.handle.close()
        if written != self.expected:
            raise RuntimeError(f"{self.path}: wrote {written} bytes, planned {self.expected}")

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.handle.close()


def write_index(out_dir: str | os.PathLike, shards: Sequence[Sequence[PlannedTensor]]) -> None:
    """``model.safetensors.index.json`` for more than one shard (transformers' layout)."""
    names = shard_names(len(shards))
    weight_map = {tensor.name: name for name, shard in zip(names, shards) for tensor in shard}
    total_size = sum(tensor.nbytes for shard in shards for tensor in shard)
    total_parameters = sum(math.prod(tensor.shape) for shard in shards for tensor in shard)
    metadata = {"total_parameters": total_parameters, "total_size": total_size}
    write_json(Path(out_dir) / INDEX_FILE, {"metadata": metadata, "weight_map": weight_map})


def model_tensors(model_dir: str | os.PathLike, error: type[TunemakeError] = TunemakeError) -> dict[str, StoredTensor]:
    """Every tensor of a model directory's safetensors weights, file by file in name order.

    Raises:
        error: no safetensors weights, an unreadable index, or a tensor stored twice.
    """
    model_dir = Path(model_dir)
    if (model_dir / INDEX_FILE).is_file():
        try:
            files = sorted(set(json.loads((model_dir / INDEX_FILE).read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as exc:
            raise error(f"{model_dir / INDEX_FILE}: not a safetensors index ({exc})") from None
    elif (model_dir / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        raise error(f"{model_dir}: no safetensors weights ({SINGLE_FILE} or {INDEX_FILE}); "
                    "re-save the model with safe_serialization")
    tensors: dict[str, StoredTensor] = {}
    for name in files:
        for key, tensor in read_header(model_dir / name).items():
            if key in tensors:
                raise error(f"{model_dir}: tensor {key} is stored twice ({tensors[key].path.name}, {name})")
            tensors[key] = tensor
    return tensors


class Delta(Protocol):
    """An update added, in float32, to rows ``start:stop`` of an output tensor."""

    def add_to(self, rows: torch.Tensor, start: int, stop: int) -> None: ...


@dataclass
class OutputTensor:
    """One output tensor: its value (stored in a file, or a tensor in memory), the float32 updates
    to add to it, and the safetensors dtype it is written in."""

    name: str
    shape: tuple[int, ...]
    stored: StoredTensor | None = None
    value: torch.Tensor | None = None
    deltas: list[Delta] = field(default_factory=list)
    dtype: str = ""


class Buffers:
    """Chunk-sized buffers reused for every slice of every tensor: streaming allocates nothing per
    slice, so the heap does not grow (and fragment) with the model."""

    def __init__(self, elements: int = CHUNK_ELEMENTS):
        self.elements = elements
        self.raw = bytearray()
        self.tensors: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def read(self, handle, nbytes: int) -> memoryview:
        if len(self.raw) < nbytes:
            self.raw = bytearray(nbytes)
        view = memoryview(self.raw)[:nbytes]
        if handle.readinto(view) != nbytes:
            raise TunemakeError(at(str(handle.name), "file ends inside a tensor"))
        return view

    def tensor(self, role: str, dtype: torch.dtype, elements: int) -> torch.Tensor:
        key = (role, dtype)
        if key not in self.tensors or self.tensors[key].numel() < elements:
            self.tensors[key] = torch.empty(max(elements, self.elements), dtype=dtype)
        return self.tensors[key][:elements]


def write_tensor(out: OutputTensor, writer: ShardWriter, buffers: Buffers) -> None:
    """Stream one output tensor into its shard, a slice of rows at a time:
    read (or slice the tensor in memory), add the float32 updates, cast, write."""
    dtype = DTYPES[out.dtype]
    source_dtype = DTYPES[out.stored.dtype] if out.value is None else out.value.dtype
    row_shape = out.shape[1:]
    per_row = math.prod(row_shape)
    handle = open(out.stored.path, "rb") if out.value is None else None
    try:
        if handle:
            handle.seek(out.stored.offset)
        for start, stop in row_chunks(out.shape, buffers.elements):
            elements = (stop - start) * per_row
            if not elements:
                continue
            if handle:
                raw = buffers.read(handle, elements * source_dtype.itemsize)
                if not out.deltas and source_dtype == dtype:
                    writer.write_bytes(raw)
                    continue
                values = torch.frombuffer(raw, dtype=source_dtype)
            else:
                values = out.value.reshape(-1)[start * per_row:stop * per_row]
            if out.deltas:
                work = buffers.tensor("work", torch.float32, elements)
                work.copy_(values)
                rows = work.view((stop - start, *row_shape)) if out.shape else work
                for delta in out.deltas:
                    delta.add_to(rows, start, stop)
                values = work
            result = buffers.tensor("out", dtype, elements)
            result.copy_(values)
            writer.write(result)
    finally:
        if handle:
            handle.close()
