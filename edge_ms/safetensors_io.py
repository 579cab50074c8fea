"""A small, torch-free safetensors reader that streams one tensor at a time.

Written by hand because the safetensors package's numpy backend cannot return bf16, and
MetaStone checkpoints are bf16. Layout: 8-byte little-endian header length N, N bytes of
JSON header ``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}``,
then the data block; offsets are relative to the start of the data block.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_ms.errors import fail
from edge_ms.jsonio import load_json, parse_json

__all__ = [
    "DTYPE_SIZES",
    "TensorEntry",
    "read_header",
    "open_checkpoint",
    "load_tensor",
    "iter_chunks",
    "convert_into",
    "INDEX_NAME",
]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

# Only the float types a checkpoint's weights come in; anything else is refused at the header.
DTYPE_SIZES = {"BF16": 2, "F16": 2, "F32": 4}
_RAW_DTYPES = {"BF16": np.dtype("<u2"), "F16": np.dtype("<f2"), "F32": np.dtype("<f4")}

_CHUNK = 4 * 1024 * 1024

# A header larger than this is not a weights file (real headers are well under 10 MB).
_MAX_HEADER = 100 * 1024 * 1024
# An index maps each tensor name to a shard: tens of KB even for a 32B model.
_MAX_INDEX = 16 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: ``offset`` is absolute in ``path``; nothing is read yet."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: Path
    offset: int
    nbytes: int


def read_header(path: str | os.PathLike[str]) -> dict[str, TensorEntry]:
    """Read and validate the header of one ``.safetensors`` file (the data is not touched)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise fail(path, f"truncated safetensors file ({size} bytes, no header length)")
            (n,) = struct.unpack("<Q", head)
            if n < 2 or n > _MAX_HEADER or 8 + n > size:
                raise fail(path, f"corrupt safetensors header length {n} (file is {size} bytes)")
            raw = f.read(n)
    except OSError as err:
        raise fail(path, f"cannot read safetensors file: {err.strerror or err}") from None
    header = parse_json(raw, path, "corrupt safetensors header: ")
    if not isinstance(header, dict):
        raise fail(path, "corrupt safetensors header: not a JSON object")

    data_start = 8 + n
    data_size = size - data_start
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        entries[name] = _entry(path, name, info, data_start, data_size)
    return entries


def _entry(path: Path, name: str, info: object, data_start: int, data_size: int) -> TensorEntry:
    if not isinstance(info, dict):
        raise fail(path, f"corrupt safetensors header: entry {name!r} is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise fail(path, f"tensor {name!r} has dtype {dtype!r}; supported: {', '.join(DTYPE_SIZES)}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise fail(path, f"corrupt safetensors header: tensor {name!r} has shape {shape!r}")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) and o >= 0 for o in offsets)
    ):
        raise fail(path, f"corrupt safetensors header: tensor {name!r} has data_offsets {offsets!r}")
    begin, end = offsets
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != expected:
        raise fail(
            path,
            f"corrupt safetensors header: tensor {name!r} {dtype}{shape} needs {expected} bytes, "
            f"data_offsets span {end - begin}",
        )
    if end > data_size:
        raise fail(
            path,
            f"truncated safetensors file: tensor {name!r} ends at data byte {end}, data block has {data_size}",
        )
    return TensorEntry(name, dtype, tuple(shape), path, data_start + begin, expected)


def open_checkpoint(hf_dir: str | os.PathLike[str]) -> dict[str, TensorEntry]:
    """All tensors of a Hugging Face checkpoint dir: ``model.safetensors`` or a sharded index."""
    hf_dir = Path(hf_dir)
    index_path = hf_dir / INDEX_NAME
    if index_path.exists() or index_path.is_symlink():  # a broken one is an error, not "no index"
        index = load_json(index_path, _MAX_INDEX, "not a safetensors index: ")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise fail(index_path, "not a valid safetensors index (needs a 'weight_map' object)")
        entries: dict[str, TensorEntry] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = hf_dir / shard
            if Path(shard).name != shard:
                raise fail(index_path, f"shard name {shard!r} is not a plain file name")
            if not shard_path.is_file():
                raise fail(index_path, f"names shard {shard!r}, which does not exist")
            for name, entry in read_header(shard_path).items():
                if name in entries:
                    raise fail(shard_path, f"tensor {name!r} also appears in {entries[name].path.name}")
                entries[name] = entry
        missing = sorted(n for n, s in weight_map.items() if n not in entries or entries[n].path.name != s)
        if missing:
            raise fail(index_path, f"tensor {missing[0]!r} is not in the shard the index names")
        return entries
    single = hf_dir / SINGLE_NAME
    if single.is_file():
        return read_header(single)
    raise fail(hf_dir, f"no weights: neither {SINGLE_NAME} nor {INDEX_NAME}")


def _map(entry: TensorEntry, start: int, count: int) -> np.ndarray:
    """Map ``count`` raw elements from element ``start``; the mapping lives as long as the array."""
    raw = _RAW_DTYPES[entry.dtype]
    if count == 0:
        return np.empty(0, dtype=raw)
    try:
        return np.memmap(
            entry.path, dtype=raw, mode="r", offset=entry.offset + start * raw.itemsize, shape=(count,)
        )
    except (OSError, ValueError) as err:
        raise fail(entry.path, f"cannot map tensor {entry.name!r}: {err}") from None


def _to_float(raw: np.ndarray, dtype: str, out_dtype: np.dtype) -> np.ndarray:
    if dtype == "BF16":
        # bf16 is the top half of an f32: widening the bits is exact.
        return (raw.astype(np.uint32) << 16).view(np.float32).astype(out_dtype, copy=False)
    return raw.astype(out_dtype)


def load_tensor(entry: TensorEntry, out_dtype: np.dtype | type = np.float32) -> np.ndarray:
    """Read one tensor into memory as ``out_dtype`` (float32 or float16), in its original shape."""
    return _to_float(_map(entry, 0, math.prod(entry.shape)), entry.dtype, np.dtype(out_dtype)).reshape(
        entry.shape
    )


def iter_chunks(entry: TensorEntry, chunk_bytes: int = _CHUNK) -> Iterator[np.ndarray]:
    """The raw little-endian elements of one tensor, flat, in chunks of about ``chunk_bytes``.

    Each chunk is its own short-lived mapping, so touching a 2 GB embedding does not keep
    2 GB of file pages resident.
    """
    total = math.prod(entry.shape)
    step = max(1, chunk_bytes // DTYPE_SIZES[entry.dtype])
    for start in range(0, total, step):
        yield _map(entry, start, min(step, total - start))


def convert_into(entry: TensorEntry, out: np.ndarray, chunk_bytes: int = _CHUNK) -> None:
    """Fill ``out`` (float32/float16, ``entry.shape``) chunk by chunk, never holding a full f32 copy."""
    flat = out.reshape(-1)
    pos = 0
    for raw in iter_chunks(entry, chunk_bytes):
        flat[pos : pos + raw.size] = _to_float(raw, entry.dtype, out.dtype)
        pos += raw.size
