"""Read a ``torch.save`` state dict (e.g. ``score_module.pt``) without torch and without running its code.

A torch.save file is a zip: ``<root>/data.pkl`` is a pickle whose tensors point, through
persistent ids ``("storage", <StorageClass>, key, location, numel)``, at raw little-endian
storages ``<root>/data/<key>``. Plain unpickling would import and call whatever globals the
pickle names, so this unpickler resolves only the few names a state dict of tensors needs
and refuses every other one before anything runs.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_ms.errors import EdgeMSError, fail

__all__ = ["load_state_dict"]


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


def _rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
):
    if not isinstance(storage, np.ndarray):
        raise _Refused("tensor whose storage is not a storage record")
    if not (
        isinstance(storage_offset, int)
        and isinstance(size, tuple)
        and isinstance(stride, tuple)
        and len(size) == len(stride)
        and all(isinstance(d, int) and d >= 0 for d in size)
        and all(isinstance(s, int) and s >= 0 for s in stride)
        and storage_offset >= 0
    ):
        raise _Refused(f"tensor with invalid geometry size={size!r} stride={stride!r}")
    if math.prod(size) == 0:
        return np.zeros(size, dtype=storage.dtype)
    last = storage_offset + sum((d - 1) * s for d, s in zip(size, stride))
    if last >= storage.size:
        raise _Refused(f"tensor of size {size} reads past its storage of {storage.size} elements")
    view = np.lib.stride_tricks.as_strided(
        storage[storage_offset:],
        shape=size,
        strides=tuple(s * storage.itemsize for s in stride),
        writeable=False,
    )
    return np.ascontiguousarray(view)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    if not isinstance(data, np.ndarray):
        raise _Refused("parameter that wraps something other than a tensor")
    return data


# The whole vocabulary a state dict of tensors needs; torch.save of a full module would also
# name torch.nn classes, which are refused on purpose.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): st for name, st in _STORAGES.items()},
}


class _StateDictUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, root: str) -> None:
        super().__init__(io.BytesIO(data))
        self._archive = archive
        self._root = root
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise _Refused(f"refused global {module}.{name} (a state dict needs only tensors)") from None

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise _Refused(f"unknown persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel = pid
        if (
            not isinstance(storage_type, _StorageType)
            or not isinstance(key, str)
            or not isinstance(numel, int)
        ):
            raise _Refused(f"invalid storage record {pid!r:.80}")
        if key not in self._storages:
            member = f"{self._root}data/{key}"
            try:
                raw = self._archive.read(member)
            except KeyError:
                raise _Refused(f"storage {member} is missing") from None
            if len(raw) < numel * storage_type.dtype.itemsize:
                raise _Refused(f"storage {member} holds {len(raw)} bytes, needs {numel} elements")
            arr = np.frombuffer(raw, dtype=storage_type.dtype, count=numel)
            if storage_type.name == "BFloat16Storage":
                arr = (arr.astype(np.uint32) << 16).view(np.float32)
            self._storages[key] = arr.astype(np.float32)
        return self._storages[key]


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Load ``{name: float32 array}`` from a torch.save zip; refuse any pickled global but tensors."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            pkls = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pkls) != 1:
                raise fail(path, "not a torch.save archive (no single <root>/data.pkl)")
            root = pkls[0][: -len("data.pkl")]
            names = set(archive.namelist())
            if f"{root}byteorder" in names and archive.read(f"{root}byteorder").strip() != b"little":
                raise fail(path, "big-endian torch.save archives are not supported")
            result = _StateDictUnpickler(archive.read(pkls[0]), archive, root).load()
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
