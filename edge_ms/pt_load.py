"""Read a ``torch.save`` state dict (e.g. ``score_module.pt``) without torch and without running its code.

A torch.save file is a zip: ``<root>/data.pkl`` is a pickle whose tensors point, through
persistent ids ``("storage", <StorageClass>, key, location, numel)``, at raw little-endian
storages ``<root>/data/<key>``. Plain unpickling would import and call whatever globals the
pickle names, so this unpickler resolves only the few names a state dict of tensors needs
and refuses every other one before anything runs.

The file is downloaded, so it is hostile until checked: the caller says which tensor shapes it
expects, and every size the archive declares (the pickle, each storage, each tensor) is checked
against them before anything is inflated or allocated.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import pickletools
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_ms.errors import EdgeMSError, fail

__all__ = ["load_state_dict", "MAX_PICKLE_BYTES"]

# A state dict's data.pkl is a few hundred bytes per tensor; anything this large is not one.
MAX_PICKLE_BYTES = 1 << 20


@dataclass(frozen=True)
class _StorageType:
    name: str
    dtype: np.dtype  # how the bytes are stored on disk


_STORAGES = {
    "FloatStorage": _StorageType("FloatStorage", np.dtype("<f4")),
    "HalfStorage": _StorageType("HalfStorage", np.dtype("<f2")),
    "BFloat16Storage": _StorageType("BFloat16Storage", np.dtype("<u2")),
    "DoubleStorage": _StorageType("DoubleStorage", np.dtype("<f8")),
}


class _Refused(Exception):
    """Raised from inside the unpickler; turned into the one-line error by the caller."""


def _check_geometry(storage: np.ndarray, storage_offset: object, size: object, stride: object) -> None:
    """Refuse a tensor view that is malformed or reads outside its storage (before any copy)."""
    if not (
        isinstance(storage_offset, int)
        and isinstance(size, tuple)
        and isinstance(stride, tuple)
        and len(size) == len(stride)
        and all(isinstance(d, int) and d >= 0 for d in size)
        and all(isinstance(s, int) and s >= 0 for s in stride)
        and storage_offset >= 0
    ):
        raise _Refused(f"tensor with invalid geometry size={size!r:.80} stride={stride!r:.80}")
    if any(d > 1 and s == 0 for d, s in zip(size, stride)):
        # A zero stride repeats one element: a tiny storage would inflate to the whole shape.
        raise _Refused(f"tensor of size {list(size)} with a zero stride {list(stride)}")
    if math.prod(size) and storage_offset + sum((d - 1) * s for d, s in zip(size, stride)) >= storage.size:
        raise _Refused(f"tensor of size {list(size)} reads past its storage of {storage.size} elements")


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    if not isinstance(data, np.ndarray):
        raise _Refused("parameter that wraps something other than a tensor")
    return data


# The whole vocabulary a state dict of tensors needs (torch._utils._rebuild_tensor_v2 is the
# unpickler's own method, which knows the expected shapes); torch.save of a full module would
# also name torch.nn classes, which are refused on purpose.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): st for name, st in _STORAGES.items()},
}


def _fmt(shapes: Iterable[tuple[int, ...]]) -> str:
    return ", ".join(str(list(shape)) for shape in shapes)


class _StateDictUnpickler(pickle.Unpickler):
    """Builds each tensor only if its shape is one still expected and its storage fits the budget."""

    def __init__(
        self, data: bytes, archive: zipfile.ZipFile, root: str, shapes: list[tuple[int, ...]], what: str
    ) -> None:
        super().__init__(io.BytesIO(data))
        self._archive = archive
        self._root = root
        self._storages: dict[str, tuple[_StorageType, int, np.ndarray]] = {}
        self._expected = Counter(shapes)
        self._all = shapes
        self._what = what
        # Storages may hold no more than the expected tensors together (torch saves them exactly).
        self._budget = sum(math.prod(shape) for shape in shapes)

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return self._rebuild
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise _Refused(f"refused global {module}.{name} (a state dict needs only tensors)") from None

    def _rebuild(
        self, storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
    ) -> np.ndarray:
        if not isinstance(storage, np.ndarray):
            raise _Refused("tensor whose storage is not a storage record")
        _check_geometry(storage, storage_offset, size, stride)
        if self._expected[size] <= 0:
            raise _Refused(f"tensor of shape {list(size)}, but {self._what} needs {_fmt(self._all)}")
        self._expected[size] -= 1
        if math.prod(size) == 0:
            return np.zeros(size, dtype=storage.dtype)
        view = np.lib.stride_tricks.as_strided(
            storage[storage_offset:],
            shape=size,
            strides=tuple(s * storage.itemsize for s in stride),
            writeable=False,
        )
        return np.ascontiguousarray(view)

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise _Refused(f"unknown persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel = pid
        if (
            not isinstance(storage_type, _StorageType)
            or not isinstance(key, str)
            or not isinstance(numel, int)
            or numel < 0
        ):
            raise _Refused(f"invalid storage record {pid!r:.80}")
        if key in self._storages:
            seen_type, seen_numel, arr = self._storages[key]
            if (seen_type, seen_numel) != (storage_type, numel):
                raise _Refused(f"storage {key!r:.40} is declared twice with different types or sizes")
            return arr
        if numel > self._budget:
            raise _Refused(
                f"storage {key!r:.40} declares {numel} elements, more than {self._what} needs "
                f"({_fmt(self._all)})"
            )
        self._budget -= numel
        arr = self._read_storage(f"{self._root}data/{key}", numel, storage_type)
        self._storages[key] = (storage_type, numel, arr)
        return arr

    def _read_storage(self, member: str, numel: int, storage_type: _StorageType) -> np.ndarray:
        need = numel * storage_type.dtype.itemsize
        raw = _read_member(self._archive, member, need, exact=True)
        arr = np.frombuffer(raw, dtype=storage_type.dtype, count=numel)
        if storage_type.name == "BFloat16Storage":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        return arr.astype(np.float32)


def _read_member(archive: zipfile.ZipFile, member: str, limit: int, exact: bool = False) -> bytes:
    """At most ``limit`` bytes of ``member``, judged by its declared size before inflating anything.

    The declared size bounds what zipfile will return, and reading with a count bounds each
    inflate step, so a member that decompresses to gigabytes costs no more than ``limit``.
    """
    try:
        info = archive.getinfo(member)
    except KeyError:
        raise _Refused(f"{member} is missing") from None
    if info.file_size > limit or (exact and info.file_size != limit):
        wanted = f"{limit} bytes" if exact else f"at most {limit} bytes"
        raise _Refused(f"{member} declares {info.file_size} bytes, expected {wanted}")
    try:
        with archive.open(info) as f:
            data = f.read(info.file_size)
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:
        raise _Refused(f"{member}: corrupt zip data ({err})") from None
    if len(data) != info.file_size:
        raise _Refused(f"{member} is truncated ({len(data)} of {info.file_size} bytes)")
    return data


def _check_opcodes(data: bytes) -> None:
    """Walk the pickle's opcodes without building anything.

    The C unpickler allocates a length-prefixed string at its declared length before reading
    it; the pure-Python walk reads only the bytes that are there and fails on a false length.
    """
    try:
        for _ in pickletools.genops(data):
            pass
    except (ValueError, EOFError) as err:
        raise _Refused(f"corrupt pickle in torch.save archive ({err})") from None


def load_state_dict(
    path: str | os.PathLike[str], shapes: Iterable[tuple[int, ...]], what: str = "the state dict"
) -> dict[str, np.ndarray]:
    """Load ``{name: float32 array}`` from a torch.save zip; refuse any pickled global but tensors.

    ``shapes`` lists the shape of every tensor the file may hold; a tensor of another shape, or
    a storage larger than these need, is refused before it is read. ``what`` names them in errors.
    """
    path = Path(path)
    shapes = [tuple(shape) for shape in shapes]
    try:
        with zipfile.ZipFile(path) as archive:
            pkls = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pkls) != 1:
                raise fail(path, "not a torch.save archive (no single <root>/data.pkl)")
            root = pkls[0][: -len("data.pkl")]
            if f"{root}byteorder" in archive.namelist():
                if _read_member(archive, f"{root}byteorder", 16).strip() != b"little":
                    raise fail(path, "big-endian torch.save archives are not supported")
            data = _read_member(archive, pkls[0], MAX_PICKLE_BYTES)
            _check_opcodes(data)
            result = _StateDictUnpickler(data, archive, root, shapes, what).load()
    except EdgeMSError:
        raise
    except _Refused as err:
        raise fail(path, str(err)) from None
    except zipfile.BadZipFile:
        raise fail(path, "not a torch.save zip archive (legacy or corrupt file)") from None
    except FileNotFoundError:
        raise fail(path, "file not found") from None
    except OSError as err:
        raise fail(path, f"cannot read: {err.strerror or err}") from None
    except Exception as err:  # noqa: BLE001 - any unpickling failure of a corrupt file is one user error
        raise fail(path, f"corrupt pickle in torch.save archive ({type(err).__name__}: {err})") from None

    if not isinstance(result, dict) or not all(
        isinstance(k, str) and isinstance(v, np.ndarray) for k, v in result.items()
    ):
        raise fail(path, "does not hold a state dict of tensors")
    return dict(result)
