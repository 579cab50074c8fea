"""Read an untrusted input file whole: a regular file only, size-capped, never blocking.

A downloaded checkpoint or head may be a symlink to /dev/zero (an unbounded read) or a FIFO
(``open`` waits forever for a writer): the file is opened non-blocking and checked with
``fstat`` on the open descriptor, so what is read is what was checked.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from edge_ms.errors import fail

__all__ = ["read_capped"]


def read_capped(path: str | os.PathLike[str], limit: int, what: str = "file") -> bytes:
    """The bytes of ``path``; one ``EdgeMSError`` line if it is missing, not a regular file or over ``limit``."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise fail(path, f"{what} not found") from None
    except OSError as err:
        raise fail(path, f"cannot open: {err.strerror or err}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise fail(path, f"not a regular file (a {what} must be one, not a device, FIFO or directory)")
        if st.st_size > limit:
            raise fail(path, f"is {st.st_size} bytes; a {what} is at most {_size(limit)}")
        chunks, total = [], 0
        while total <= limit:  # bounded even if the file grows after the fstat
            chunk = os.read(fd, min(1 << 24, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as err:
        raise fail(path, f"cannot read: {err.strerror or err}") from None
    finally:
        os.close(fd)
    if total > limit:
        raise fail(path, f"grew past {_size(limit)} while being read")
    return b"".join(chunks)


def _size(n: int) -> str:
    return f"{n / 2**30:.0f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"
