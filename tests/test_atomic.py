"""Whole-file-or-nothing writes and directory swaps: what is left on disk after success and after failure."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edge_ms.atomic import atomic_path, atomic_write, fresh_dir, replace_dir, write_bytes, write_text


def test_write_text_and_bytes_replace_the_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "out.json"
    path.write_text("old")
    write_text(path, "new ✓")
    assert path.read_text(encoding="utf-8") == "new ✓"
    write_bytes(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert os.listdir(tmp_path) == ["out.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "log.json"
    path.write_text("kept")
    with pytest.raises(RuntimeError), atomic_write(path) as f:
        f.write("half of a new")
        raise RuntimeError("disk full")
    assert path.read_text() == "kept"
    assert os.listdir(tmp_path) == ["log.json"]


def test_atomic_path_gives_writers_a_file_name(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    with atomic_path(path) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".model.gguf.") and tmp.exists()
        tmp.write_bytes(b"GGUF")
        assert not path.exists()  # nothing under the final name until the writer is done
    assert path.read_bytes() == b"GGUF" and os.listdir(tmp_path) == ["model.gguf"]
    with pytest.raises(KeyboardInterrupt), atomic_path(path) as tmp:
        tmp.write_bytes(b"GG")
        raise KeyboardInterrupt
    assert path.read_bytes() == b"GGUF" and os.listdir(tmp_path) == ["model.gguf"]


def test_new_files_get_the_umask_not_0600(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644


def test_replace_dir_swaps_and_puts_the_old_one_back_on_failure(tmp_path: Path) -> None:
    dest = tmp_path / "model"
    new = fresh_dir(dest, "tmp")
    (new / "v2").write_text("2")
    replace_dir(new, dest, tmp_path / "aside-1")  # no dest yet: a plain rename
    assert os.listdir(dest) == ["v2"] and not new.exists()

    newer = fresh_dir(dest, "tmp")
    (newer / "v3").write_text("3")
    replace_dir(newer, dest, tmp_path / "aside-2")
    assert os.listdir(dest) == ["v3"] and os.listdir(tmp_path / "aside-2") == ["v2"]

    with pytest.raises(FileNotFoundError):
        replace_dir(tmp_path / "vanished", dest, tmp_path / "aside-3")
    assert os.listdir(dest) == ["v3"] and not (tmp_path / "aside-3").exists()
