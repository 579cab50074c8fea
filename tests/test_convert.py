"""`edge-ms convert` end to end: the GGUF llama.cpp runs matches transformers, the head matches torch,
quantized files stay close to f16, and every bad input is one error line with nothing left behind."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from functools import cache
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from pytap import decode_and_tap, quiet_llama

from edge_ms import convert as convert_mod
from edge_ms.cli import main
from edge_ms.convert import fingerprint
from edge_ms.head import load_head
from edge_ms.quants import QUANTS
from edge_ms.safetensors_io import open_checkpoint

FIXTURES = Path(__file__).parent / "fixtures"
MODELS = ["tiny-qwen2", "tiny-qwen2-sharded"]


def run_convert(*args: str):
    return CliRunner().invoke(main, ["convert", *args])


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@cache
def reference(model: str) -> tuple[dict, dict[str, np.ndarray]]:
    record = json.loads((FIXTURES / "reference" / f"{model}.json").read_text(encoding="utf-8"))
    with np.load(FIXTURES / "reference" / f"{model}.npz") as npz:
        return record, dict(npz)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[tuple[str, str], Path]:
    """Every fixture in every quantization, through the real CLI: {(model, quant): out_dir}."""
    root = tmp_path_factory.mktemp("converted")
    outs = {}
    for model in MODELS:
        for quant in QUANTS:
            out = root / f"{model}-{quant}"
            result = run_convert(str(FIXTURES / model), "-o", str(out), "--quant", quant)
            assert result.exit_code == 0, result.output
            assert f"backbone: {out / f'{model}-{quant}.gguf'}" in result.stdout
            outs[model, quant] = out
    return outs


@cache
def tapped(out: Path, model: str, quant: str) -> list[tuple[np.ndarray, np.ndarray]]:
    record, _ = reference(model)
    gguf_path = out / f"{model}-{quant}.gguf"
    return [decode_and_tap(gguf_path, ids, record["spec"]["layer"]) for ids in record["ids"]]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("quant", QUANTS)
def test_output_layout(converted, model, quant):
    out = converted[model, quant]
    assert sorted(p.name for p in out.iterdir()) == [f"{model}-{quant}.gguf", f"{model}.sprm.onnx"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left


@pytest.mark.parametrize("model", MODELS)
def test_llama_cpp_tokenizes_like_tokenizers(converted, model):
    record, _ = reference(model)
    with quiet_llama():
        vocab = llama_cpp.Llama(
            str(converted[model, "f16"] / f"{model}-f16.gguf"), vocab_only=True, verbose=False
        )
    try:
        for name, text, ids in zip(record["names"], record["texts"], record["ids"]):
            assert vocab.tokenize(text.encode(), add_bos=False, special=True) == ids, name
            assert vocab.detokenize(ids, special=True).decode() == text, name  # and back
    finally:
        vocab.close()


# Texts whose bytes change under normalization: decomposed accents, a ligature, full-width digits.
NORMALIZE_TEXTS = ["cafe\u0301", "A\u030a", "cafe\u0301 and caf\u00e9, A\u030angstr\u00f6m",
                   "\ufb01nd \uff11\uff12 <think>e\u0301</think>", "plain ascii"]


@pytest.mark.parametrize(
    "normalizer",
    [{"type": "NFC"}, {"type": "NFKC"}, {"type": "Sequence", "normalizers": [{"type": "NFD"}, {"type": "NFKC"}]},
     {"type": "NFD"}, None],
    ids=["nfc", "nfkc", "sequence", "nfd", "none"],
)
def test_runtime_tokenizes_like_tokenizers_after_normalization(tmp_path, normalizer):
    from tokenizers import Tokenizer

    from edge_ms.model import Model

    hf = tmp_path / "m"
    shutil.copytree(FIXTURES / "tiny-qwen2", hf)
    _edit_json(hf / "tokenizer.json", lambda t: t.update(normalizer=normalizer))
    result = run_convert(str(hf), "-o", str(tmp_path / "out"), "--quant", "f32")
    assert result.exit_code == 0, result.output
    want = Tokenizer.from_file(str(hf / "tokenizer.json"))
    model = Model(tmp_path / "out" / "m-f32.gguf")
    try:
        for text in NORMALIZE_TEXTS:
            assert model.tokenize(text) == want.encode(text, add_special_tokens=False).ids, text
    finally:
        model.close()


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("quant, tol", [("f32", 2e-3), ("f16", 2e-2)])
def test_hidden_states_and_logits_match_transformers(converted, model, quant, tol):
    record, arrays = reference(model)
    for i, (hidden, logits) in enumerate(tapped(converted[model, quant], model, quant)):
        assert hidden.shape == arrays[f"hidden_{i}"].shape
        assert rel_err(hidden, arrays[f"hidden_{i}"]) < tol, record["names"][i]
        assert rel_err(logits, arrays[f"logits_{i}"]) < tol, record["names"][i]


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def quant_drift(converted, model: str, quant: str) -> dict[str, float]:
    """Against the f16 GGUF over all reference texts: hidden rel. error, top-1 agreement, KL(f16 || quant)."""
    base = tapped(converted[model, "f16"], model, "f16")
    ours = tapped(converted[model, quant], model, quant)
    hid, agree, kl = [], [], []
    for (h, lg), (h0, lg0) in zip(ours, base):
        hid.append(rel_err(h, h0))
        agree.append(lg.argmax(-1) == lg0.argmax(-1))
        p0, p = _softmax(lg0.astype(np.float64)), _softmax(lg.astype(np.float64))
        kl.append((p0 * (np.log(p0 + 1e-300) - np.log(p + 1e-300))).sum(-1))
    return {
        "hidden_rel": max(hid),
        "top1": float(np.concatenate(agree).mean()),
        "kl_mean": float(np.concatenate(kl).mean()),
    }


@pytest.mark.parametrize("model", MODELS)
def test_quantized_models_stay_close_to_f16(converted, model):
    q8, q4 = quant_drift(converted, model, "q8_0"), quant_drift(converted, model, "q4_k_m")
    print(f"{model}: q8_0 {q8}  q4_k_m {q4}")
    # Random tiny weights quantize worse than trained ones; these bounds are a few times the
    # measured values (measured here: q8_0 ~1.5e-2 / 95% / 7e-4, q4_k_m ~0.1 / 75% / 0.03).
    assert q8["hidden_rel"] < 0.05 and q8["top1"] > 0.9 and q8["kl_mean"] < 5e-3
    assert q4["hidden_rel"] < 0.3 and q4["top1"] > 0.6 and q4["kl_mean"] < 0.15
    assert q8["kl_mean"] < q4["kl_mean"]  # fewer bits, more drift: the files really differ
    for quant, kind in (("q8_0", "Q8_0"), ("q4_k_m", "Q5_0" if model.endswith("sharded") else "Q4_K")):
        # (width 64 is not a multiple of 256, so llama.cpp falls back from Q4_K to Q5_0 there)
        types = {
            t.tensor_type.name
            for t in gguf.GGUFReader(converted[model, quant] / f"{model}-{quant}.gguf").tensors
        }
        assert kind in types


@pytest.mark.parametrize("model", MODELS)
def test_head_spec_and_scores_match_torch(converted, model):
    record, arrays = reference(model)
    spec = record["spec"]
    head = load_head(converted[model, "f16"] / f"{model}.sprm.onnx")
    assert head.spec.layer == spec["n_layer"] - 2 == spec["layer"]
    assert head.spec.hidden_size == spec["hidden_size"]
    assert list(head.spec.step_delimiter_ids) == spec["step_delimiter_ids"]
    assert (head.spec.think_start_id, head.spec.think_end_id) == (
        spec["think_start_id"],
        spec["think_end_id"],
    )

    c = spec["hidden_size"]
    torch_head = torch.nn.Sequential(
        torch.nn.Linear(c, 2 * c), torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(2 * c, 1)
    )
    torch_head.load_state_dict(torch.load(FIXTURES / model / "score_module.pt", weights_only=True))
    torch_head.eval()
    rows = np.concatenate([arrays[f"hidden_{i}"] for i in range(len(record["ids"]))])
    with torch.no_grad():
        want = torch.sigmoid(torch_head(torch.from_numpy(rows)))[:, 0].numpy()
    np.testing.assert_allclose(head.score(rows), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("model", MODELS)
def test_fingerprint_ties_head_to_every_quantization(converted, model):
    fp = fingerprint(open_checkpoint(FIXTURES / model))
    assert len(fp) == 16 and int(fp, 16) >= 0
    for quant in QUANTS:
        out = converted[model, quant]
        r = gguf.GGUFReader(out / f"{model}-{quant}.gguf")
        assert r.fields["edge_ms.backbone_fingerprint"].contents() == fp
        assert load_head(out / f"{model}.sprm.onnx").spec.backbone_fingerprint == fp


def test_fingerprint_changes_with_one_weight(tmp_path):
    hf = tmp_path / "m"
    shutil.copytree(FIXTURES / "tiny-qwen2", hf)
    before = fingerprint(open_checkpoint(hf))
    entry = open_checkpoint(hf)["model.layers.1.mlp.up_proj.weight"]
    with open(entry.path, "r+b") as f:
        f.seek(entry.offset + 1000)
        byte = f.read(1)
        f.seek(entry.offset + 1000)
        f.write(bytes([byte[0] ^ 1]))
    assert fingerprint(open_checkpoint(hf)) != before


# ---------------------------------------------------------------- bad input


def _malicious_head(hf: Path, marker: Path) -> None:
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = hf / "score_module.pt"
    with zipfile.ZipFile(path) as z:
        members = {i.filename: z.read(i) for i in z.infolist()}
    pkl = next(k for k in members if k.endswith("/data.pkl"))
    members[pkl] = pickle.dumps({"0.weight": Payload()}, protocol=2)
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    edit(data)
    path.write_text(json.dumps(data), encoding="utf-8")


def _narrow_head(hf: Path) -> None:
    c = 32
    h = torch.nn.Sequential(
        torch.nn.Linear(c, 2 * c), torch.nn.ReLU(), torch.nn.Dropout(), torch.nn.Linear(2 * c, 1)
    )
    torch.save(h.state_dict(), hf / "score_module.pt")


def _sparse(path: Path, size: int) -> None:
    path.unlink()
    with open(path, "wb") as f:
        f.truncate(size)  # a hole: no disk used, but a reader sees `size` bytes


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 4096])


BAD_INPUTS = {
    # name: (fixture, damage(hf_dir, marker), file the message must name, text it must hold)
    "no_config": ("tiny-qwen2", lambda hf, m: (hf / "config.json").unlink(), "config.json", "file not found"),
    "no_tokenizer": (
        "tiny-qwen2",
        lambda hf, m: (hf / "tokenizer.json").unlink(),
        "tokenizer.json",
        "not found",
    ),
    "no_weights": (
        "tiny-qwen2",
        lambda hf, m: (hf / "model.safetensors").unlink(),
        "model.safetensors",
        "no weights",
    ),
    "no_head": (
        "tiny-qwen2",
        lambda hf, m: (hf / "score_module.pt").unlink(),
        "score_module.pt",
        "not found",
    ),
    "llama_arch": (
        "tiny-qwen2",
        lambda hf, m: _edit_json(hf / "config.json", lambda c: c.update(architectures=["LlamaForCausalLM"])),
        "config.json",
        "only Qwen2ForCausalLM",
    ),
    "head_width": ("tiny-qwen2", lambda hf, m: _narrow_head(hf), "score_module.pt", "hidden_size 256"),
    "truncated": (
        "tiny-qwen2",
        lambda hf, m: _truncate(hf / "model.safetensors"),
        "model.safetensors",
        "truncated",
    ),
    "truncated_shard": (
        "tiny-qwen2-sharded",
        lambda hf, m: _truncate(hf / "model-00002-of-00003.safetensors"),
        "model-00002-of-00003.safetensors",
        "truncated",
    ),
    "missing_shard": (
        "tiny-qwen2-sharded",
        lambda hf, m: (hf / "model-00003-of-00003.safetensors").unlink(),
        "model.safetensors.index.json",
        "names shard 'model-00003-of-00003.safetensors', which does not exist",
    ),
    "malicious_head": ("tiny-qwen2", _malicious_head, "score_module.pt", "refused global"),
    "lowercase_normalizer": (
        "tiny-qwen2",
        lambda hf, m: _edit_json(
            hf / "tokenizer.json",
            lambda t: t.update(
                normalizer={"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Lowercase"}]}
            ),
        ),
        "tokenizer.json",
        "normalizer Lowercase is not supported (only NFC, NFD, NFKC, NFKD and Sequences of them)",
    ),
    "replace_normalizer": (
        "tiny-qwen2",
        lambda hf, m: _edit_json(
            hf / "tokenizer.json",
            lambda t: t.update(normalizer={"type": "Replace", "pattern": {"String": " "}, "content": "_"}),
        ),
        "tokenizer.json",
        "normalizer Replace is not supported",
    ),
    "huge_tokenizer": (
        "tiny-qwen2",
        lambda hf, m: _sparse(hf / "tokenizer.json", (64 << 20) + 1),
        "tokenizer.json",
        "is 67108865 bytes; a JSON file is at most 64 MiB",
    ),
    "deep_config": (
        "tiny-qwen2",
        lambda hf, m: (hf / "config.json").write_text("[" * 100_000 + "]" * 100_000),
        "config.json",
        "not valid JSON (nested too deeply)",
    ),
    "config_is_a_directory": (
        "tiny-qwen2",
        lambda hf, m: ((hf / "config.json").unlink(), (hf / "config.json").mkdir()),
        "config.json",
        "not a regular file",
    ),
    "deep_index": (
        "tiny-qwen2-sharded",
        lambda hf, m: (hf / "model.safetensors.index.json").write_text('{"weight_map": ' + "[" * 100_000),
        "model.safetensors.index.json",
        "not valid JSON (nested too deeply)",
    ),
    "gpt2_pretokenizer": (
        "tiny-qwen2",
        lambda hf, m: _edit_json(
            hf / "tokenizer.json",
            lambda t: t["pre_tokenizer"]["pretokenizers"][0]["pattern"].update(
                Regex=r" ?\p{L}+| ?\p{N}+|\s+"
            ),
        ),
        "tokenizer.json",
        "not Qwen2's",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_error_line_and_leaves_nothing(tmp_path, case):
    fixture, damage, names, says = BAD_INPUTS[case]
    hf = tmp_path / "src" / fixture
    shutil.copytree(FIXTURES / fixture, hf)
    marker = tmp_path / "pwned"
    damage(hf, marker)
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"

    result = run_convert(str(hf), "-o", str(out))
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and names in lines[0] and says in lines[0], (
        lines
    )
    assert "Traceback" not in result.output
    assert not out.exists() and list(work.iterdir()) == []  # no output, no temp dir
    assert not marker.exists()


def _to_device(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.symlink_to("/dev/zero")


def _to_fifo(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.mkfifo(path)


def _limit_memory() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "config.json", "chat_template.jinja"])
@pytest.mark.parametrize("make", [_to_device, _to_fifo], ids=["dev-zero", "fifo"])
def test_special_files_are_refused_without_hanging_or_filling_memory(tmp_path, name, make):
    # A subprocess with a time and memory bound: the old reader hung on a FIFO and read /dev/zero
    # until memory ran out, which must fail this test rather than the machine.
    hf = tmp_path / "m"
    shutil.copytree(FIXTURES / "tiny-qwen2", hf)
    if name == "chat_template.jinja":  # read only where tokenizer_config.json has no template
        _edit_json(hf / "tokenizer_config.json", lambda t: t.pop("chat_template"))
    make(hf / name)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "edge_ms.cli", "convert", str(hf), "-o", str(out)],
        capture_output=True, text=True, timeout=120, preexec_fn=_limit_memory,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    what = "chat template" if name.endswith(".jinja") else "JSON file"
    assert proc.stderr == f"error: {hf / name}: not a regular file (a {what} must be one, not a device, FIFO or directory)\n"
    assert not out.exists()


def test_unknown_quant_is_one_line(tmp_path):
    out = tmp_path / "out"
    result = run_convert(str(FIXTURES / "tiny-qwen2"), "-o", str(out), "--quant", "q5_k")
    assert result.exit_code == 1
    assert (
        result.stderr == "error: --quant q5_k: unknown quantization; choose one of f32, f16, q8_0, q4_k_m\n"
    )
    assert not out.exists()


def test_existing_output_is_kept_without_force_and_replaced_with_it(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    result = run_convert(str(FIXTURES / "tiny-qwen2-sharded"), "-o", str(out))
    assert result.exit_code == 1 and "already exists (use --force to replace it)" in result.stderr
    assert [p.name for p in out.iterdir()] == ["mine.txt"]

    # --force with a broken input still fails before touching the old output.
    hf = tmp_path / "broken"
    shutil.copytree(FIXTURES / "tiny-qwen2-sharded", hf)
    (hf / "score_module.pt").unlink()
    result = run_convert(str(hf), "-o", str(out), "--force")
    assert result.exit_code == 1 and [p.name for p in out.iterdir()] == ["mine.txt"]

    result = run_convert(str(FIXTURES / "tiny-qwen2-sharded"), "-o", str(out), "--force")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "tiny-qwen2-sharded-f16.gguf",
        "tiny-qwen2-sharded.sprm.onnx",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "out"]


def test_output_over_the_input_is_refused_even_with_force(tmp_path):
    hf = tmp_path / "m"
    shutil.copytree(FIXTURES / "tiny-qwen2-sharded", hf)
    before = sorted(p.name for p in hf.iterdir())
    for out in (hf, tmp_path):
        result = run_convert(str(hf), "-o", str(out), "--force")
        assert result.exit_code == 1 and "is or contains the input directory" in result.stderr
    assert sorted(p.name for p in hf.iterdir()) == before


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # as if Ctrl-C arrived after the GGUF was written

    monkeypatch.setattr(convert_mod, "write_head", interrupted)
    result = run_convert(str(FIXTURES / "tiny-qwen2-sharded"), "-o", str(out), "--quant", "q8_0", "--force")
    assert result.exit_code == 130
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
