"""Reading torch.save state dicts without torch, and refusing pickles that would run code."""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_ms.errors import EdgeMSError
from edge_ms.pt_load import load_state_dict

C = 8
SHAPES = [(2 * C, C), (2 * C,), (1, 2 * C), (1,)]  # the head of a width-C backbone


def _head(c: int = C) -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(c, 2 * c), torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(2 * c, 1)
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda h: h.state_dict(),  # what MetaStone ships: OrderedDict with _metadata
        lambda h: {k: v.to(torch.bfloat16) for k, v in h.state_dict().items()},
        lambda h: {k: v.to(torch.float16) for k, v in h.state_dict().items()},
        lambda h: dict(h.named_parameters()),  # Parameters -> torch._utils._rebuild_parameter
        lambda h: {
            "t": torch.arange(12.0).reshape(3, 4).t(),
            "head": (base := torch.arange(10.0))[:6],
            "tail": base[6:],  # one storage, two offsets
        },  # strides, offsets
    ],
    ids=["state_dict", "bf16", "f16", "parameters", "views"],
)
def test_matches_torch_load(tmp_path, make):
    saved = make(_head())
    path = tmp_path / "score_module.pt"
    torch.save(saved, path)
    ref = torch.load(path, weights_only=True)
    got = load_state_dict(path, [tuple(t.shape) for t in ref.values()])
    assert list(got) == list(ref)
    for key, tensor in ref.items():
        assert got[key].dtype == np.float32
        np.testing.assert_array_equal(got[key], tensor.detach().float().numpy())


class _Payload:
    """Unpickling this runs ``func(arg)``: the classic pickle code-execution vector."""

    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return (self.func, (self.arg,))


def _malicious_pt(tmp_path: Path, payload: object, name: str = "score_module.pt") -> Path:
    """A real torch.save archive whose data.pkl is replaced by ``payload`` inside a state dict."""
    good = tmp_path / "good.pt"
    torch.save(_head().state_dict(), good)
    path = tmp_path / name
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("/data.pkl"):
                data = pickle.dumps({"0.weight": payload}, protocol=2)
            dst.writestr(info.filename, data)
    return path


def test_payload_is_live(tmp_path):
    # The control: plain unpickling of the same payload really does run the command.
    marker = tmp_path / "control-marker"
    pickle.loads(pickle.dumps(_Payload(os.system, f"touch {marker}")))
    assert marker.exists()


@pytest.mark.parametrize(
    "func, refused",
    # torch pickles use protocol 2, which spells builtins as Python 2's __builtin__.
    [(os.system, f"{os.system.__module__}.system"), (eval, "__builtin__.eval"), (exec, "__builtin__.exec")],
)
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, func, refused):
    marker = tmp_path / "pwned"
    arg = f"touch {marker}" if func is os.system else f"open({str(marker)!r}, 'w').close()"
    path = _malicious_pt(tmp_path, _Payload(func, arg))
    with pytest.raises(EdgeMSError) as err:
        load_state_dict(path, SHAPES)
    assert str(err.value).startswith(f"{path}: refused global {refused}")
    assert not marker.exists()


def test_plain_pickle_file_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "score_module.pt"
    path.write_bytes(pickle.dumps(_Payload(os.system, f"touch {marker}")))
    with pytest.raises(EdgeMSError, match="not a torch.save zip archive"):
        load_state_dict(path, SHAPES)
    assert not marker.exists()


def test_whole_module_is_refused(tmp_path):
    path = tmp_path / "score_module.pt"
    torch.save(_head(), path)
    with pytest.raises(EdgeMSError, match=r"refused global torch\.nn\.modules\.container\.Sequential"):
        load_state_dict(path, SHAPES)


def test_storage_out_of_bounds_is_refused(tmp_path):
    path = tmp_path / "score_module.pt"
    torch.save({"w": torch.zeros(4)}, path)
    # Claim a larger tensor than the storage holds: must not read past the buffer.
    with zipfile.ZipFile(path) as z:
        members = {i.filename: z.read(i) for i in z.infolist()}
    pkl = next(k for k in members if k.endswith("data.pkl"))
    members[pkl] = members[pkl].replace(b"K\x04\x85", b"K\x40\x85")  # size (4,) -> (64,)
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    with pytest.raises(EdgeMSError, match="reads past its storage"):
        load_state_dict(path, SHAPES)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(EdgeMSError, match="file not found"):
        load_state_dict(tmp_path / "nope.pt", SHAPES)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(EdgeMSError, match=f"^{bad}: "):
        load_state_dict(bad, SHAPES)


# ---------------------------------------------------------------- hostile sizes


class _Storage:
    def __init__(self, key: str, numel: int) -> None:
        self.key, self.numel = key, numel


class _Tensor:
    """Pickles as torch.save pickles a tensor, with whatever geometry a hostile file may claim."""

    def __init__(self, storage: _Storage, size: tuple, stride: tuple, offset: int = 0) -> None:
        self.storage, self.size, self.stride, self.offset = storage, size, stride, offset

    def __reduce__(self):
        args = (self.storage, self.offset, self.size, self.stride, False, collections.OrderedDict())
        return (torch._utils._rebuild_tensor_v2, args)


class _TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel)
        return None


def _zeros(z: zipfile.ZipFile, name: str, nbytes: int) -> None:
    """A member of ``nbytes`` zeros, deflated: half a GiB takes about 2 MB in the file."""
    chunk = bytes(1 << 24)
    with z.open(name, "w", force_zip64=True) as f:
        for start in range(0, nbytes, len(chunk)):
            f.write(chunk[: min(len(chunk), nbytes - start)])


def _torch_zip(path: Path, tensors: dict, storages: dict[str, int], pkl_zeros: int = 0) -> Path:
    """A torch.save-layout zip: ``tensors`` pickled, storage ``key`` holding ``storages[key]`` zero bytes."""
    buf = io.BytesIO()
    _TorchPickler(buf, protocol=2).dump(collections.OrderedDict(tensors))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        z.writestr("archive/data.pkl", buf.getvalue() + bytes(pkl_zeros))
        z.writestr("archive/byteorder", "little")
        for key, nbytes in storages.items():
            _zeros(z, f"archive/data/{key}", nbytes)
    return path


def _declare_size(path: Path, member: str, size: int) -> None:
    """Make the central directory lie about ``member``'s inflated size (a classic zip bomb)."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(member)
    name = member.encode()
    at = 0
    while True:  # the central directory record of this member
        at = data.index(b"PK\x01\x02", at)
        if data[at + 46 : at + 46 + len(name)] == name:
            break
        at += 4
    assert struct.unpack_from("<I", data, at + 24)[0] == info.file_size
    struct.pack_into("<I", data, at + 24, size)
    path.write_bytes(bytes(data))


def _load_capped(path: Path, shapes: list, headroom: int = 256 << 20) -> str:
    """Load in a child whose address space may grow by ``headroom`` only; returns what it printed.

    An allocation beyond the cap fails with MemoryError, so only a loader that checks the
    declared sizes first can print its refusal.
    """
    script = f"""
import resource
from edge_ms.errors import EdgeMSError
from edge_ms.pt_load import load_state_dict
status = open("/proc/self/status").read()
vm = int(next(l for l in status.splitlines() if l.startswith("VmSize:")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + {headroom}, vm + {headroom}))
try:
    state = load_state_dict({str(path)!r}, {shapes!r})
    print("loaded", sorted(state))
except EdgeMSError as err:
    print(err)
except MemoryError:
    print("MemoryError")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    return proc.stdout.strip()


needs_proc = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmSize from /proc")


@needs_proc
def test_capped_child_loads_a_real_head(tmp_path):
    path = tmp_path / "score_module.pt"
    torch.save(_head().state_dict(), path)
    assert _load_capped(path, SHAPES) == "loaded ['0.bias', '0.weight', '3.bias', '3.weight']"


@needs_proc
def test_storage_that_inflates_to_half_a_gib_is_refused_unread(tmp_path):
    # The tensor itself has the right shape; its storage record and member claim 512 MiB.
    big = 128 << 20
    w = _Storage("0", big)
    path = _torch_zip(
        tmp_path / "score_module.pt", {"0.weight": _Tensor(w, (2 * C, C), (C, 1))}, {"0": 4 * big}
    )
    assert path.stat().st_size < 4 << 20
    budget = sum(math.prod(s) for s in SHAPES)
    assert _load_capped(path, SHAPES) == (
        f"{path}: storage '0' declares {big} elements, more than the state dict needs "
        "([16, 8], [16], [1, 16], [1])"
    )
    assert big > budget

    # The record claims the right size but the member holds 512 MiB: refused on its declared size.
    w = _Storage("0", 2 * C * C)
    _torch_zip(path, {"0.weight": _Tensor(w, (2 * C, C), (C, 1))}, {"0": 4 * big})
    assert _load_capped(path, SHAPES) == (
        f"{path}: archive/data/0 declares {4 * big} bytes, expected {4 * 2 * C * C} bytes"
    )


@needs_proc
def test_zip_bombed_pickle_is_refused_unread(tmp_path):
    w = _Storage("0", 2 * C * C)
    tensors = {"0.weight": _Tensor(w, (2 * C, C), (C, 1))}
    path = _torch_zip(tmp_path / "score_module.pt", tensors, {"0": 4 * 2 * C * C}, pkl_zeros=512 << 20)
    assert path.stat().st_size < 4 << 20
    assert _load_capped(path, SHAPES) == (
        f"{path}: archive/data.pkl declares {(512 << 20) + len(_pickled(tensors))} bytes, expected at most 1048576 bytes"
    )
    # The same bomb with a central directory that claims 200 bytes: only 200 are inflated.
    _declare_size(path, "archive/data.pkl", 200)
    out = _load_capped(path, SHAPES)
    assert out.startswith(f"{path}: archive/data.pkl: corrupt zip data (Bad CRC-32"), out


@needs_proc
@pytest.mark.parametrize(
    "size, stride, says",
    [
        ((1 << 14, 1 << 14), (0, 0), "tensor of size [16384, 16384] with a zero stride [0, 0]"),
        ((2 * C, C), (0, 1), "tensor of size [16, 8] with a zero stride [0, 1]"),
    ],
    ids=["1gib", "right-shape"],
)
def test_zero_stride_is_refused_before_any_copy(tmp_path, size, stride, says):
    w = _Storage("0", 2 * C * C)
    path = _torch_zip(
        tmp_path / "score_module.pt", {"0.weight": _Tensor(w, size, stride)}, {"0": 4 * 2 * C * C}
    )
    assert path.stat().st_size < 100_000
    assert _load_capped(path, SHAPES) == f"{path}: {says}"


@needs_proc
def test_unexpected_shape_is_refused_before_any_copy(tmp_path):
    # Rows one element apart stay inside a width-128 head's 32768-element storage, yet a copy
    # of the view would be 1 GiB: only the expected shapes bound it.
    c = 128
    shapes = [(2 * c, c), (2 * c,), (1, 2 * c), (1,)]
    w = _Storage("0", 2 * c * c)
    tensors = {"0.weight": _Tensor(w, (1 << 14, 1 << 14), (1, 1))}
    path = _torch_zip(tmp_path / "score_module.pt", tensors, {"0": 4 * 2 * c * c})
    assert _load_capped(path, shapes) == (
        f"{path}: tensor of shape [16384, 16384], but the state dict needs [256, 128], [256], [1, 256], [1]"
    )


def _pickled(tensors: dict) -> bytes:
    buf = io.BytesIO()
    _TorchPickler(buf, protocol=2).dump(collections.OrderedDict(tensors))
    return buf.getvalue()


@pytest.mark.parametrize(
    "c, says",
    [
        (4, "tensor of shape [8, 4], but a head for hidden_size 8 needs [16, 8], [16], [1, 16], [1]"),
        (
            32,
            "storage '0' declares 2048 elements, more than a head for hidden_size 8 needs "
            "([16, 8], [16], [1, 16], [1])",
        ),
    ],
    ids=["narrower", "wider"],
)
def test_head_of_another_width_is_refused_by_its_sizes(tmp_path, c, says):
    path = tmp_path / "score_module.pt"
    torch.save(_head(c).state_dict(), path)
    with pytest.raises(EdgeMSError) as err:
        load_state_dict(path, SHAPES, "a head for hidden_size 8")
    assert str(err.value) == f"{path}: {says}"


def test_false_string_length_in_the_pickle_is_refused_without_allocating(tmp_path):
    path = tmp_path / "score_module.pt"
    torch.save(_head().state_dict(), path)
    with zipfile.ZipFile(path) as z:
        members = {i.filename: z.read(i) for i in z.infolist()}
    pkl = next(k for k in members if k.endswith("data.pkl"))
    # BINBYTES8 claiming 64 GiB: the C unpickler would allocate that before noticing it is absent.
    members[pkl] = b"\x80\x04\x8e" + struct.pack("<Q", 1 << 36) + b"x."
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    with pytest.raises(
        EdgeMSError, match=r"corrupt pickle in torch.save archive \(expected 68719476736 bytes"
    ):
        load_state_dict(path, SHAPES)
