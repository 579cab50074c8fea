"""Ctrl-C around native code, which would otherwise lose it or turn it into another error."""

from __future__ import annotations

import importlib
import importlib.util
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["hold_interrupt", "import_held"]


@contextmanager
def hold_interrupt() -> Iterator[Callable[[], bool]]:
    """Around native code that runs Python inside it: Ctrl-C is noted, then raised once it returns.

    ctypes prints and drops any exception raised inside a callback, and llama.cpp calls its log
    callback throughout loading: a KeyboardInterrupt landing there was lost and the run went on.
    Yields ``interrupted()`` for callbacks that can cut the call short.
    Only the main thread gets signals, and a SIGINT handler someone else installed is left alone.
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield lambda: False
        return
    hits: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: hits.append(signum))
    try:
        yield lambda: bool(hits)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if hits:
        raise KeyboardInterrupt


def import_held(*names: str) -> None:
    """Import the installed ones of ``names`` with Ctrl-C held until they are in.

    onnx's and onnxruntime's native parts turn an interrupt into "ImportError: import numpy
    failed" or "initialization failed", which would end a command with a traceback.
    """
    with hold_interrupt():
        for name in names:
            if importlib.util.find_spec(name) is not None:
                importlib.import_module(name)
