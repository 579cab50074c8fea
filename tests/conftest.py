"""Shared fixtures: the committed checkpoints converted once per test session."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import edge_ms  # noqa: F401  (before any test imports llama_cpp: docs/llama_cpp.md, section 5)

FIXTURES = Path(__file__).parent / "fixtures"

# The fixture models are tiny: one thread is faster than two, and llama.cpp's spinning
# threadpool collapses when the cores are shared with other processes (subprocesses inherit this).
os.environ.setdefault("EDGE_MS_THREADS", "1")


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """``converted(name, quant)`` -> directory holding ``<name>-<quant>.gguf`` + ``<name>.sprm.onnx``."""
    from edge_ms.convert import convert

    cache: dict[tuple[str, str], Path] = {}

    def get(name: str = "tiny-qwen2", quant: str = "f32") -> Path:
        if (name, quant) not in cache:
            out = tmp_path_factory.mktemp("converted") / f"{name}-{quant}"
            convert(FIXTURES / name, out, quant=quant)
            cache[(name, quant)] = out
        return cache[(name, quant)]

    return get


@pytest.fixture
def calibrated_head(converted, tmp_path):
    """``calibrated_head(calibration)`` -> the tiny-qwen2 fixture head, same weights, with ``calibration``."""
    from dataclasses import replace

    from edge_ms.head import load_head, write_head

    def get(calibration, name: str = "tiny-qwen2"):
        head = load_head(converted(name, "f32") / f"{name}.sprm.onnx")
        path = tmp_path / f"{name}-calibrated.sprm.onnx"
        write_head(path, head.weights(), replace(head.spec, calibration=calibration))
        return path

    return get


@pytest.fixture(scope="session")
def reference_json():
    def get(name: str = "tiny-qwen2") -> dict:
        return json.loads((FIXTURES / "reference" / f"{name}.json").read_text())

    return get
