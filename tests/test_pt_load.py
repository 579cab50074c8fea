"""Reading torch.save state dicts without torch, and refusing pickles that would run code."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_ms.errors import EdgeMSError
from edge_ms.pt_load import load_state_dict


def _head(c: int = 8) -> torch.nn.Sequential:
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
            "view": torch.arange(10.0)[3:7],
        },  # strides, offsets
    ],
    ids=["state_dict", "bf16", "f16", "parameters", "views"],
)
def test_matches_torch_load(tmp_path, make):
    saved = make(_head())
    path = tmp_path / "score_module.pt"
    torch.save(saved, path)
    got = load_state_dict(path)
    ref = torch.load(path, weights_only=True)
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
        load_state_dict(path)
    assert str(err.value).startswith(f"{path}: refused global {refused}")
    assert not marker.exists()


def test_plain_pickle_file_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "score_module.pt"
    path.write_bytes(pickle.dumps(_Payload(os.system, f"touch {marker}")))
    with pytest.raises(EdgeMSError, match="not a torch.save zip archive"):
        load_state_dict(path)
    assert not marker.exists()


def test_whole_module_is_refused(tmp_path):
    path = tmp_path / "score_module.pt"
    torch.save(_head(), path)
    with pytest.raises(EdgeMSError, match=r"refused global torch\.nn\.modules\.container\.Sequential"):
        load_state_dict(path)


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
        load_state_dict(path)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(EdgeMSError, match="file not found"):
        load_state_dict(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(EdgeMSError, match=f"^{bad}: "):
        load_state_dict(bad)
