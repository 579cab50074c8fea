"""Reading JSON that came from somewhere else: every problem is one line naming the file.

Downloaded checkpoints carry config.json, tokenizer.json, a shard index and JSON shard headers;
any of them may be damaged or hostile. Besides syntax errors that means bytes that are not
UTF-8, nesting deep enough to exhaust Python's recursion limit, integers too long to convert,
and files that are not regular files or are far larger than any real one.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from edge_ms.errors import fail

__all__ = ["MAX_JSON_BYTES", "load_json", "parse_json"]

# The largest JSON a checkpoint holds is its tokenizer.json: about 7 MB for a 150k vocabulary.
MAX_JSON_BYTES = 64 << 20


def parse_json(raw: bytes | str, path: object, what: str = "") -> object:
    """``raw`` parsed; on any failure ``fail(path, f"{what}not valid JSON (...)")``.

    ``what`` prefixes the problem, e.g. ``"corrupt safetensors header: "``.
    """
    try:
        return json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
    except UnicodeDecodeError as err:
        detail = f"not UTF-8 at byte {err.start}"
    except json.JSONDecodeError as err:
        detail = str(err)
    except RecursionError:
        detail = "nested too deeply"
    except ValueError as err:  # e.g. an integer longer than int() converts
        detail = str(err).splitlines()[0]
    raise fail(path, f"{what}not valid JSON ({detail})")


def load_json(path: str | os.PathLike[str], max_bytes: int = MAX_JSON_BYTES, what: str = "") -> object:
    """The JSON in the regular file ``path``, refused unread when over ``max_bytes``."""
    path = Path(path)
    try:
        # O_NONBLOCK: a FIFO planted under the expected name must not hang the open.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise fail(path, "file not found") from None
    except OSError as err:
        raise fail(path, f"cannot read: {err.strerror or err}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise fail(path, "not a regular file")
        if info.st_size > max_bytes:
            raise fail(path, f"{what}{info.st_size} bytes, larger than any real one ({max_bytes} at most)")
        with open(fd, "rb", closefd=False) as f:
            raw = f.read(max_bytes + 1)
    except OSError as err:
        raise fail(path, f"cannot read: {err.strerror or err}") from None
    finally:
        os.close(fd)
    if len(raw) > max_bytes:  # grew since the stat
        raise fail(path, f"{what}larger than any real one ({max_bytes} bytes at most)")
    return parse_json(raw, path, what)
