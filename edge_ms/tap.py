"""Where a hidden state is tapped: the ctypes boundary to native/edge_ms_tap.c.

llama.cpp calls ``cb_eval`` for every graph node; the C callback answers those
calls itself and copies the rows of ``l_out-<layer>`` into a numpy buffer that
this module owns. Nothing here runs per graph node.
"""

from __future__ import annotations

import ctypes
import os
import sys
import sysconfig
from pathlib import Path

import llama_cpp  # noqa: F401  (loads ggml-base with RTLD_GLOBAL, which the tap links against)
import numpy as np

from edge_ms.errors import EdgeMSError

MAX_LAYERS = 8  # EDGE_MS_TAP_MAX_LAYERS
_STATUS = {1: "more rows than the tap buffer holds", 2: "row width differs from n_embd", 3: "tensor is not float32"}


class _TapStruct(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char * 64),
        ("enabled", ctypes.c_int32),
        ("n_embd", ctypes.c_int32),
        ("capacity_rows", ctypes.c_int32),
        ("n_rows", ctypes.c_int32),
        ("n_calls", ctypes.c_int32),
        ("status", ctypes.c_int32),
        ("data", ctypes.POINTER(ctypes.c_float)),
        ("n_layers", ctypes.c_int32),
        ("layers", ctypes.c_int32 * MAX_LAYERS),
        ("layer_rows", ctypes.c_int32 * MAX_LAYERS),
    ]


def _lib_name() -> str:
    if sys.platform == "darwin":
        return "libedge_ms_tap.dylib"
    if os.name == "nt":
        return "edge_ms_tap.dll"
    return "libedge_ms_tap.so"


def _find_lib() -> Path:
    # An editable install keeps the built library in site-packages while the
    # Python sources stay in the checkout, so look in both places.
    name = _lib_name()
    candidates = [Path(os.environ["EDGE_MS_TAP_LIB"])] if os.environ.get("EDGE_MS_TAP_LIB") else []
    candidates.append(Path(__file__).with_name(name))
    for key in ("platlib", "purelib"):
        candidates.append(Path(sysconfig.get_paths()[key]) / "edge_ms" / name)
    for path in candidates:
        if path.is_file():
            return path
    raise EdgeMSError(f"{name}: native tap library not found; reinstall edge_ms (pip install .)")


def _load_ggml_base() -> None:
    # The tap resolves ggml_* symbols at load time; make llama-cpp-python's
    # ggml-base visible to it (re-opening an already loaded library is cheap).
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
        if (lib_dir / name).exists():
            ctypes.CDLL(str(lib_dir / name), mode=ctypes.RTLD_GLOBAL)
            return


_lib = None


def native_lib() -> ctypes.CDLL:
    """The loaded tap library (loaded once)."""
    global _lib
    if _lib is None:
        _load_ggml_base()
        path = _find_lib()
        lib = ctypes.CDLL(str(path))
        if not hasattr(lib, "edge_ms_tap_init_layers"):
            raise EdgeMSError(f"{path}: native tap library from an older edge_ms; reinstall edge_ms (pip install .)")
        lib.edge_ms_tap_init.argtypes = [
            ctypes.POINTER(_TapStruct),
            ctypes.c_int32,
            ctypes.c_int32,
            ctypes.POINTER(ctypes.c_float),
            ctypes.c_int32,
        ]
        lib.edge_ms_tap_init.restype = ctypes.c_int
        lib.edge_ms_tap_init_layers.argtypes = [
            ctypes.POINTER(_TapStruct),
            ctypes.POINTER(ctypes.c_int32),
            ctypes.c_int32,
            ctypes.c_int32,
            ctypes.POINTER(ctypes.c_float),
            ctypes.c_int32,
        ]
        lib.edge_ms_tap_init_layers.restype = ctypes.c_int
        lib.edge_ms_tap_reset.argtypes = [ctypes.POINTER(_TapStruct)]
        lib.edge_ms_tap_reset.restype = None
        _lib = lib
    return _lib


class Tap:
    """Rows of layer ``layer`` (and of ``extra_layers``) for every token of the last ``llama_decode``.

    With extra layers, a token's row is its rows of ``layer`` then of each extra layer, side
    by side (``len(layers) * n_embd`` floats): one decode reads every candidate layer, which is
    how training data for a choice of layer is sampled once. Owns the C struct and the row
    buffer; both must outlive the llama context created with :attr:`cb_eval` and :attr:`user_data`.
    """

    def __init__(self, layer: int, n_embd: int, capacity_rows: int, extra_layers: tuple[int, ...] = ()) -> None:
        lib = native_lib()
        self.layers = (layer, *extra_layers)
        if len(self.layers) > MAX_LAYERS or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"bad tap layers {self.layers}: at most {MAX_LAYERS}, each once")
        self.buffer = np.zeros((capacity_rows, len(self.layers) * n_embd), dtype=np.float32)
        self._struct = _TapStruct()
        layers = (ctypes.c_int32 * len(self.layers))(*self.layers)
        rc = lib.edge_ms_tap_init_layers(
            ctypes.byref(self._struct),
            layers,
            len(self.layers),
            n_embd,
            self.buffer.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
            capacity_rows,
        )
        if rc != 0:
            raise ValueError(f"bad tap arguments: layers={self.layers} n_embd={n_embd} capacity={capacity_rows}")
        self.layer = layer
        address = ctypes.cast(lib.edge_ms_tap_cb, ctypes.c_void_p).value
        self.cb_eval = llama_cpp.ggml_backend_sched_eval_callback(address)
        self.user_data = ctypes.cast(ctypes.byref(self._struct), ctypes.c_void_p)

    @property
    def enabled(self) -> bool:
        return bool(self._struct.enabled)

    @enabled.setter
    def enabled(self, on: bool) -> None:
        self._struct.enabled = 1 if on else 0

    def reset(self) -> None:
        """Forget the rows of the previous decode; call before each llama_decode."""
        native_lib().edge_ms_tap_reset(ctypes.byref(self._struct))

    @property
    def n_calls(self) -> int:
        return self._struct.n_calls

    def rows(self) -> np.ndarray:
        """A view of the rows written since :meth:`reset`, in batch order (valid until the next decode)."""
        status = self._struct.status
        counts = set(self._struct.layer_rows[: len(self.layers)])
        if not status and len(counts) > 1:  # a layer the graph does not have, or skipped
            raise EdgeMSError(f"tap of layers {self.layers}: rows per layer differ ({sorted(counts)})")
        if status:
            names = ", ".join(f"l_out-{k}" for k in self.layers)
            raise EdgeMSError(f"{names}: tap failed: {_STATUS.get(status, status)}")
        return self.buffer[: self._struct.n_rows]


class AbortFlag:
    """A flag that aborts a running llama_decode from another thread (checked in C between graph nodes)."""

    def __init__(self) -> None:
        self._flag = ctypes.c_int32(0)
        address = ctypes.cast(native_lib().edge_ms_abort_cb, ctypes.c_void_p).value
        self.callback = llama_cpp.ggml_abort_callback(address)
        self.data = ctypes.cast(ctypes.byref(self._flag), ctypes.c_void_p)

    def set(self) -> None:
        self._flag.value = 1

    def clear(self) -> None:
        self._flag.value = 0

    def is_set(self) -> bool:
        return self._flag.value != 0
