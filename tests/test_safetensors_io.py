"""The hand-written safetensors reader against files written by the safetensors package itself."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file as save_torch

from edge_ms.errors import EdgeMSError
from edge_ms.safetensors_io import convert_into, load_tensor, open_checkpoint, read_header

FIXTURES = Path(__file__).parent / "fixtures"


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.bf16": (torch.randn(33, 17, generator=g) * 3).to(torch.bfloat16),
        "b.f16": torch.randn(5, 7, generator=g).to(torch.float16),
        "c.f32": torch.randn(4, 3, 2, generator=g),
        "d.scalarish": torch.tensor([1.5], dtype=torch.bfloat16),
        "e.empty": torch.zeros(0, 4, dtype=torch.float32),
    }


def test_values_equal_what_torch_saved(tmp_path):
    tensors = _tensors()
    path = tmp_path / "model.safetensors"
    save_torch(tensors, str(path))
    entries = read_header(path)
    assert set(entries) == set(tensors)
    for name, t in tensors.items():
        got = load_tensor(entries[name])
        assert got.dtype == np.float32 and got.shape == tuple(t.shape)
        # bf16 -> f32 is exact, so equality is exact too.
        np.testing.assert_array_equal(got, t.float().numpy())
    assert entries["a.bf16"].dtype == "BF16" and entries["a.bf16"].nbytes == 33 * 17 * 2


def test_chunked_conversion_equals_whole_tensor(tmp_path):
    path = tmp_path / "model.safetensors"
    big = torch.randn(257, 31).to(torch.bfloat16)
    save_torch({"w": big}, str(path))
    entry = read_header(path)["w"]
    for dtype in (np.float32, np.float16):
        out = np.empty(entry.shape, dtype=dtype)
        convert_into(entry, out, chunk_bytes=1000)  # many chunks, not aligned to rows
        np.testing.assert_array_equal(out, big.float().numpy().astype(dtype))


def test_numpy_written_f16_f32(tmp_path):
    arrays = {
        "x": np.arange(12, dtype=np.float16).reshape(3, 4),
        "y": np.linspace(0, 1, 10, dtype=np.float32),
    }
    path = tmp_path / "n.safetensors"
    save_numpy(arrays, str(path))
    entries = read_header(path)
    np.testing.assert_array_equal(load_tensor(entries["x"], np.float16), arrays["x"])
    np.testing.assert_array_equal(load_tensor(entries["y"]), arrays["y"])


def test_sharded_fixture_has_every_tensor():
    model = FIXTURES / "tiny-qwen2-sharded"
    index = json.loads((model / "model.safetensors.index.json").read_text())
    entries = open_checkpoint(model)
    assert set(entries) == set(index["weight_map"])
    assert {e.path.name for e in entries.values()} == set(index["weight_map"].values())
    assert len({e.path.name for e in entries.values()}) == 3


def _valid(tmp_path: Path) -> Path:
    path = tmp_path / "model.safetensors"
    save_torch({"w": torch.ones(64, 64, dtype=torch.bfloat16), "b": torch.ones(64)}, str(path))
    return path


def _rewrite_header(path: Path, edit) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def _replace_header(path: Path, new: bytes) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-100]), "truncated safetensors file"),
        (lambda p: p.write_bytes(p.read_bytes()[:5]), "truncated safetensors file"),
        (lambda p: p.write_bytes(struct.pack("<Q", 10**12) + p.read_bytes()[8:]), "header length"),
        (lambda p: p.write_bytes(p.read_bytes()[:8] + b"{not json" + p.read_bytes()[17:]), "not valid JSON"),
        # As deep as the header length allows: json's recursion limit, not a traceback.
        (lambda p: _replace_header(p, b"[" * 100_000 + b"]" * 100_000), "not valid JSON (nested too deeply)"),
        (lambda p: _replace_header(p, b'{"w": "\xff"}'), "not valid JSON (not UTF-8 at byte 7)"),
        (lambda p: _rewrite_header(p, lambda h: h["w"].update(dtype="I64")), "dtype 'I64'"),
        (lambda p: _rewrite_header(p, lambda h: h["w"].update(shape=[64, 65])), "needs 8320 bytes"),
        (lambda p: _rewrite_header(p, lambda h: h["b"].update(data_offsets=[10**9, 10**9 + 256])), "ends at"),
        (lambda p: _rewrite_header(p, lambda h: h["w"].update(shape="64x64")), "shape"),
    ],
)
def test_damaged_file_is_one_line_error_naming_it(tmp_path, damage, message):
    path = _valid(tmp_path)
    damage(path)
    with pytest.raises(EdgeMSError) as err:
        read_header(path)
    text = str(err.value)
    assert text.startswith(str(path) + ": ") and message in text and "\n" not in text


def test_index_naming_missing_shard(tmp_path):
    save_torch({"w": torch.ones(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    index = {"weight_map": {"w": "model-00001-of-00002.safetensors", "v": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(EdgeMSError, match=r"model.safetensors.index.json: names shard 'model-00002-of-00002"):
        open_checkpoint(tmp_path)


def test_no_weights(tmp_path):
    with pytest.raises(EdgeMSError, match="no weights"):
        open_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "index, message",
    [
        ("[" * 100_000 + "]" * 100_000, "not a safetensors index: not valid JSON (nested too deeply)"),
        ('{"weight_map": ', "not a safetensors index: not valid JSON (Expecting value: line 1 column 16"),
        ("[1, 2]", "not a valid safetensors index (needs a 'weight_map' object)"),
        ('{"weight_map": {"w": 1}}', "not a valid safetensors index (needs a 'weight_map' object)"),
        (None, "not a regular file"),
    ],
    ids=["deep", "syntax", "list", "bad-map", "directory"],
)
def test_bad_index_is_one_line_naming_it(tmp_path, index, message):
    path = tmp_path / "model.safetensors.index.json"
    if index is None:
        path.mkdir()
        (tmp_path / "model.safetensors").write_bytes(b"")  # the index is looked for first
    else:
        path.write_text(index)
    with pytest.raises(EdgeMSError) as err:
        open_checkpoint(tmp_path)
    assert str(err.value).startswith(f"{path}: {message}"), err.value
