"""JSON from files that may be hostile: one line naming the file, never a hang or a traceback."""

from __future__ import annotations

import os
import sys

import pytest

from edge_ms.errors import EdgeMSError
from edge_ms.jsonio import load_json, parse_json


def _err(fn, *args) -> str:
    with pytest.raises(EdgeMSError) as err:
        fn(*args)
    return str(err.value)


def test_reads_a_regular_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"hidden_size": 8}')
    assert load_json(path, 1000) == {"hidden_size": 8}


def test_a_file_over_the_cap_is_refused_unread(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("[" + "0," * 600 + "0]")
    assert _err(load_json, path, 1000).startswith(f"{path}: is 1203 bytes; a JSON file is at most")


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
    path = tmp_path / "config.json"
    os.mkfifo(path)
    assert _err(load_json, path, 1000).startswith(f"{path}: not a regular file")


def test_missing_and_directory(tmp_path):
    assert _err(load_json, tmp_path / "nope.json", 1000) == f"{tmp_path / 'nope.json'}: JSON file not found"
    assert _err(load_json, tmp_path, 1000).startswith(f"{tmp_path}: not a regular file")


@pytest.mark.parametrize(
    "raw, detail",
    [
        (b"[" * 50_000, "nested too deeply"),
        (b'{"a": 1', "Expecting ',' delimiter: line 1 column 8 (char 7)"),
        (b'"\xc3"', "not UTF-8 at byte 1"),
        pytest.param(
            b"1" * 5000,
            "Exceeds the limit (4300 digits)",
            marks=pytest.mark.skipif(not hasattr(sys, "get_int_max_str_digits"), reason="no int digit limit"),
        ),
    ],
    ids=["deep", "syntax", "utf8", "long-int"],
)
def test_parse_failures_are_one_line(raw, detail):
    message = _err(parse_json, raw, "x.json", "corrupt header: ")
    assert message.startswith(f"x.json: corrupt header: not valid JSON ({detail}") and "\n" not in message
