"""Write a file or a directory whole or not at all: build it under a hidden name beside it, then rename.

A rename within one directory is atomic, so a reader sees the old file or the new one, never
half of one; on any error (KeyboardInterrupt included) the temporary is removed and whatever
was at the destination is left as it was.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

__all__ = ["atomic_path", "atomic_write", "fresh_dir", "replace_dir", "write_bytes", "write_text"]


def _hidden(path: Path, tag: str) -> Path:
    return path.parent / f".{path.name}.{secrets.token_hex(4)}.{tag}"


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A new empty file beside ``path`` for a writer that wants a file name (``onnx.save``, gguf-py).

    On success it is synced and renamed over ``path``; on error it is removed. Created with mode
    0o666 minus the umask, like a plain ``open`` (mkstemp would force 0600).
    """
    path = Path(path)
    while True:
        tmp = _hidden(path, "tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
    try:
        yield tmp
        _sync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_write(path: str | os.PathLike, binary: bool = False) -> Iterator[IO]:
    """Open a temp file beside ``path`` (text is UTF-8); on success it replaces ``path``, on error it is removed."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            yield f


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """``path`` holds ``data`` afterwards, or is untouched."""
    with atomic_write(path, binary=True) as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """``path`` holds ``text`` (UTF-8) afterwards, or is untouched."""
    with atomic_write(path) as f:
        f.write(text)


def _sync(path: Path) -> None:
    # Without it a crash soon after the rename can leave an empty file under the final name.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fresh_dir(beside: Path, tag: str) -> Path:
    """A new hidden directory beside ``beside`` (same filesystem, so renames from it are atomic).

    Made with mkdir rather than mkdtemp so that it gets the user's umask, not mode 0700.
    """
    while True:
        path = _hidden(beside, tag)
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def replace_dir(new: Path, dest: Path, aside: Path) -> None:
    """Rename directory ``new`` to ``dest``; an existing ``dest`` is first renamed to ``aside``.

    If the second rename fails, the old ``dest`` is put back. ``aside`` is left for the caller
    to delete (or keep), since only the caller knows when the old contents are no longer needed.
    """
    if not dest.exists():
        os.rename(new, dest)
        return
    os.rename(dest, aside)
    try:
        os.rename(new, dest)
    except BaseException:
        os.rename(aside, dest)
        raise

