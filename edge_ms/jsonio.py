"""Reading JSON that came from somewhere else: every problem is one line naming the file.

Downloaded checkpoints carry config.json, tokenizer.json, a shard index and JSON shard headers;
any of them may be damaged or hostile. Besides syntax errors that means bytes that are not
UTF-8, nesting deep enough to exhaust Python's recursion limit and integers too long to
convert; files are read through edge_ms.readfile (regular files only, size-capped).
"""

from __future__ import annotations

import json
import os

from edge_ms.errors import fail
from edge_ms.readfile import read_capped

__all__ = ["load_json", "parse_json"]


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


def load_json(path: str | os.PathLike[str], max_bytes: int, what: str = "") -> object:
    """The JSON in the regular file ``path``, refused unread when over ``max_bytes`` (see edge_ms.readfile)."""
    return parse_json(read_capped(path, max_bytes, "JSON file"), path, what)
