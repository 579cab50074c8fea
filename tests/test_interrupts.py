"""Ctrl-C around native code: held while it runs, raised once it returns; heavy imports deferred."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import pytest

from edge_ms.interrupts import hold_interrupt


def test_an_interrupt_is_held_then_raised():
    ran_on = []
    with pytest.raises(KeyboardInterrupt):
        with hold_interrupt() as interrupted:
            assert not interrupted()
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # Python code runs on, as inside a ctypes callback
                ran_on.append(1)
            assert interrupted()
    assert len(ran_on) == 1000
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_no_interrupt_no_exception():
    with hold_interrupt() as interrupted:
        pass
    assert not interrupted()


def test_another_handler_and_other_threads_are_left_alone():
    seen = []
    old = signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
    try:
        with hold_interrupt() as interrupted:
            assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
            os.kill(os.getpid(), signal.SIGINT)
            sum(range(1000))
            assert not interrupted()
        assert seen == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, old)

    out = []
    thread = threading.Thread(target=lambda: out.append(hold_interrupt().__enter__()()))
    thread.start()
    thread.join()
    assert out == [False]


def test_import_edge_ms_is_light_and_onnx_still_precedes_llama_cpp():
    # The package import runs before the CLI can catch Ctrl-C: it must not load onnx (seconds),
    # yet onnx / onnxruntime must still come before llama_cpp (a CUDA build crashed otherwise).
    code = (
        "import sys, edge_ms; before = 'onnx' in sys.modules or 'onnxruntime' in sys.modules; "
        "import llama_cpp; m = list(sys.modules); "
        "print(before, m.index('onnx') < m.index('llama_cpp'), m.index('onnxruntime') < m.index('llama_cpp'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "True", "True"], out.stderr
