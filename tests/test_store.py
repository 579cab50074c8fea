"""The model store: `edge-ms pull` from a real (offline) Hugging Face cache, `edge-ms list`, `--model NAME`."""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import onnx
import pytest

from edge_ms.errors import EdgeMSError
from edge_ms.head import HeadSpec, load_head, write_head
from edge_ms.store import list_models, resolve_model, store_root

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SHARDED = FIXTURES / "tiny-qwen2-sharded"
OTHER = FIXTURES / "tiny-qwen2"
REPO = "Tiny-Org/Tiny-Qwen2-Sharded"
NAME = "tiny-qwen2-sharded"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


# --- helpers ------------------------------------------------------------------------------------


def _hub_cache(
    cache: Path, repo_id: str, src: Path, commit: str = COMMIT, skip: tuple[str, ...] = ()
) -> None:
    """Lay ``src`` out as huggingface_hub does: content-addressed blobs, a snapshot of symlinks, refs/main."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    blobs, snapshot = repo / "blobs", repo / "snapshots" / commit
    blobs.mkdir(parents=True, exist_ok=True)
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = f.relative_to(src)
        if rel.name in skip:
            continue
        data = f.read_bytes()
        blob = blobs / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An isolated store and an offline Hub cache holding both fixture checkpoints; returns the cache."""
    cache = tmp_path / "hf" / "hub"
    _hub_cache(cache, REPO, SHARDED)
    _hub_cache(cache, "Tiny-Org/Tiny-Qwen2", OTHER)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setenv("EDGE_MS_HOME", str(tmp_path / "home"))
    return cache


def _cli(*args: str) -> subprocess.CompletedProcess:
    # A fresh process: huggingface_hub reads HF_HUB_OFFLINE / HF_HUB_CACHE once, at import.
    return subprocess.run(
        [sys.executable, "-c", "from edge_ms.cli import main; main()", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


def _one_line_error(proc: subprocess.CompletedProcess, needle: str) -> str:
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
    return lines[0]


def _models(home: Path) -> Path:
    return home / "models"


def _gguf_meta(path: Path, key: str) -> str:
    field = gguf.GGUFReader(path).fields[key]
    return bytes(field.parts[field.data[0]]).decode()


def _write_gguf(path: Path) -> None:
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_block_count(2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _handmade(directory: Path, name: str, quants: tuple[str, ...], fingerprint: str = "fp-hand") -> None:
    """A converted-model directory made by hand: one head and the GGUFs (the store never reads their tensors)."""
    directory.mkdir(parents=True, exist_ok=True)
    c = 8
    rng = np.random.default_rng(0)
    weights = {
        "0.weight": rng.standard_normal((2 * c, c)).astype(np.float32),
        "0.bias": np.zeros(2 * c, np.float32),
        "3.weight": rng.standard_normal((1, 2 * c)).astype(np.float32),
        "3.bias": np.zeros(1, np.float32),
    }
    write_head(directory / f"{name}.sprm.onnx", weights, HeadSpec(
        layer=0, hidden_size=c, step_delimiter_ids=(5,), think_start_id=None, think_end_id=None,
        backbone_fingerprint=fingerprint,
    ))
    for q in quants:
        _write_gguf(directory / f"{name}-{q}.gguf")


# --- pull / list / resolve through the real CLI ------------------------------------------------


def test_pull_list_resolve_then_add_a_second_quant(env: Path) -> None:
    home = Path(os.environ["EDGE_MS_HOME"])
    proc = _cli("pull", REPO, "--quant", "f16")
    assert proc.returncode == 0, proc.stderr
    assert f"pulled {NAME} (f16)" in proc.stdout

    entry = _models(home) / NAME
    assert sorted(p.name for p in entry.iterdir()) == [f"{NAME}-f16.gguf", f"{NAME}.sprm.onnx"]
    assert [p.name for p in _models(home).iterdir()] == [NAME]  # no staging directory left behind
    head = load_head(entry / f"{NAME}.sprm.onnx")
    # The head and the GGUF name the same backbone, so a run can check that they belong together.
    assert (
        _gguf_meta(entry / f"{NAME}-f16.gguf", "edge_ms.backbone_fingerprint")
        == head.spec.backbone_fingerprint
    )
    assert _gguf_meta(entry / f"{NAME}-f16.gguf", "general.architecture") == "qwen2"

    proc = _cli("list", "--json")
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(proc.stdout)
    assert row["name"] == NAME and row["quants"] == ["f16"] and row["note"] is None
    assert row["fingerprint"] == head.spec.backbone_fingerprint
    assert row["path"] == str(entry)
    assert row["size_bytes"] == sum(p.stat().st_size for p in entry.iterdir())

    proc = _cli("list")
    assert proc.returncode == 0, proc.stderr
    assert NAME in proc.stdout and "f16" in proc.stdout and head.spec.backbone_fingerprint in proc.stdout

    files = resolve_model(NAME)
    assert (files.name, files.gguf, files.head) == (
        NAME,
        entry / f"{NAME}-f16.gguf",
        entry / f"{NAME}.sprm.onnx",
    )
    assert resolve_model(REPO) == files  # the repo id a user pulled also finds it

    _one_line_error(_cli("pull", REPO, "--quant", "f16"), "already in the store; pass --force")

    f16 = entry / f"{NAME}-f16.gguf"
    f16_before = (f16.stat().st_ino, f16.read_bytes())
    proc = _cli("pull", REPO, "--quant", "q8_0")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in entry.iterdir()) == [
        f"{NAME}-f16.gguf",
        f"{NAME}-q8_0.gguf",
        f"{NAME}.sprm.onnx",
    ]
    assert (f16.stat().st_ino, f16.read_bytes()) == f16_before  # the first quant is untouched
    q8 = entry / f"{NAME}-q8_0.gguf"
    assert q8.stat().st_size < f16.stat().st_size
    assert _gguf_meta(q8, "edge_ms.backbone_fingerprint") == head.spec.backbone_fingerprint

    assert resolve_model(NAME).gguf == q8  # q8_0 is preferred over f16 when no quant is named
    assert resolve_model(NAME, "f16").gguf == f16
    (info,) = list_models()
    assert info.quants == ("q8_0", "f16")
    assert [p.name for p in _models(home).iterdir()] == [NAME]

    # --force converts again and replaces only that quantization.
    assert _cli("pull", REPO, "--quant", "f16", "--force").returncode == 0
    assert f16.stat().st_ino != f16_before[0]
    assert list_models()[0].quants == ("q8_0", "f16")


def test_pull_refuses_another_backbone_under_the_same_name(env: Path) -> None:
    home = Path(os.environ["EDGE_MS_HOME"])
    assert _cli("pull", REPO, "--quant", "f16").returncode == 0
    entry = _models(home) / NAME
    before = {p.name: p.read_bytes() for p in entry.iterdir()}

    _one_line_error(
        _cli("pull", "Tiny-Org/Tiny-Qwen2", "--quant", "q8_0", "--name", NAME), "holds another backbone"
    )
    assert {p.name: p.read_bytes() for p in entry.iterdir()} == before
    assert [p.name for p in _models(home).iterdir()] == [NAME]

    # --name keeps both; --force replaces the entry wholesale.
    assert _cli("pull", "Tiny-Org/Tiny-Qwen2", "--quant", "f16").returncode == 0
    assert [m.name for m in list_models()] == ["tiny-qwen2", NAME]
    other_fp = load_head(resolve_model("tiny-qwen2").head).spec.backbone_fingerprint
    assert other_fp != load_head(resolve_model(NAME).head).spec.backbone_fingerprint
    assert _cli("pull", "Tiny-Org/Tiny-Qwen2", "--quant", "f16", "--name", NAME, "--force").returncode == 0
    assert load_head(resolve_model(NAME).head).spec.backbone_fingerprint == other_fp


def test_unknown_repo_offline_is_one_line(env: Path) -> None:
    line = _one_line_error(
        _cli("pull", "Tiny-Org/No-Such-Model"), "Tiny-Org/No-Such-Model: not in the local Hugging"
    )
    assert "offline" in line
    assert not _models(Path(os.environ["EDGE_MS_HOME"])).exists() or not any(
        _models(Path(os.environ["EDGE_MS_HOME"])).iterdir()
    )


def test_bad_repo_id_and_bad_name_are_one_line(env: Path) -> None:
    _one_line_error(_cli("pull", "not a repo!"), "not a valid Hugging Face repo id")
    _one_line_error(_cli("pull", REPO, "--name", "../escape"), "not a usable store name")


def test_failed_conversion_leaves_store_untouched(env: Path) -> None:
    models = _models(Path(os.environ["EDGE_MS_HOME"]))
    _hub_cache(env, "Tiny-Org/Headless", SHARDED, skip=("score_module.pt",))
    line = _one_line_error(_cli("pull", "Tiny-Org/Headless", "--quant", "f16"), "score_module.pt")
    assert "file not found" in line
    assert not models.exists() or list(models.iterdir()) == []

    assert _cli("pull", REPO, "--quant", "f16").returncode == 0
    before = {p.name: p.read_bytes() for p in (models / NAME).iterdir()}
    _one_line_error(
        _cli("pull", "Tiny-Org/Headless", "--quant", "q8_0", "--name", NAME, "--force"), "score_module.pt"
    )
    assert {p.name: p.read_bytes() for p in (models / NAME).iterdir()} == before
    assert [p.name for p in models.iterdir()] == [NAME]


# --- resolve_model / list_models on hand-made directories ---------------------------------------


def _err(model: str | Path, quant: str | None = None) -> str:
    with pytest.raises(EdgeMSError) as err:
        resolve_model(model, quant)
    text = str(err.value)
    assert "\n" not in text
    return text


def test_resolve_prefers_q4_k_m_then_q8_0_then_f16_then_f32(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("EDGE_MS_HOME", str(tmp_path / "home"))
    d = tmp_path / "home" / "models" / "m"
    _handmade(d, "m", ("f32",))
    assert resolve_model("m").gguf.name == "m-f32.gguf"
    for q in ("f16", "q8_0", "q4_k_m"):
        _write_gguf(d / f"m-{q}.gguf")
        assert resolve_model("m").gguf.name == f"m-{q}.gguf"
    for q in ("f32", "f16", "q8_0", "q4_k_m"):
        assert resolve_model("m", q).gguf.name == f"m-{q}.gguf"
    assert re.search(r"m: no q5_k_m GGUF here \(have: .*m-f16.gguf", _err("m", "q5_k_m"))


def test_resolve_a_directory_path_wins_over_the_store(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("EDGE_MS_HOME", str(tmp_path / "home"))
    _handmade(tmp_path / "home" / "models" / "m", "m", ("f16",))
    local = tmp_path / "work" / "m"
    _handmade(local, "m", ("q8_0",))
    monkeypatch.chdir(tmp_path / "work")
    files = resolve_model("m")
    assert files.gguf == Path("m") / "m-q8_0.gguf" and files.name == "m"
    monkeypatch.chdir(tmp_path)
    assert resolve_model("m").gguf == tmp_path / "home" / "models" / "m" / "m-f16.gguf"
    assert resolve_model(local).gguf == local / "m-q8_0.gguf"


def test_resolve_errors_are_one_line_and_name_the_problem(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("EDGE_MS_HOME", str(tmp_path / "home"))
    assert re.match(r"nope: no such model directory or store name \(the store at .* is empty", _err("nope"))

    models = tmp_path / "home" / "models"
    _handmade(models / "alpha", "alpha", ("f16",))
    _handmade(models / "beta", "beta", ("q8_0",))
    assert _err("nope") == "nope: no such model directory or store name (store has: alpha, beta)"

    (models / "beta" / "beta.sprm.onnx").unlink()
    assert _err("beta") == f"{models / 'beta'}: no *.sprm.onnx head in this model directory"

    (models / "alpha" / "alpha-f16.gguf").unlink()
    assert _err("alpha") == f"{models / 'alpha'}: no .gguf model file in this model directory"

    d = tmp_path / "amb"
    _handmade(d, "x", ())
    _write_gguf(d / "one.gguf")
    _write_gguf(d / "two.gguf")
    assert (
        _err(d) == f"{d}: cannot tell which GGUF to use (one.gguf, two.gguf); name them <name>-<quant>.gguf"
    )
    _write_gguf(d / "x-f16.gguf")  # a named quant settles it
    assert resolve_model(d).gguf.name == "x-f16.gguf"
    _write_gguf(d / "y-f16.gguf")
    assert "several GGUFs for one quantization (x-f16.gguf, y-f16.gguf)" in _err(d)

    (d / "y.sprm.onnx").write_bytes((d / "x.sprm.onnx").read_bytes())
    assert "several heads (x.sprm.onnx, y.sprm.onnx)" in _err(d)

    (tmp_path / "file.txt").write_text("x")
    assert "not a model directory (store has: alpha, beta)" in _err(tmp_path / "file.txt")


def test_list_reports_broken_entries_instead_of_failing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("EDGE_MS_HOME", str(tmp_path / "home"))
    assert list_models() == []
    models = tmp_path / "home" / "models"
    _handmade(models / "good", "good", ("q4_k_m", "f16"), fingerprint="fp-good")
    _handmade(models / "nohead", "nohead", ("f16",))
    (models / "nohead" / "nohead.sprm.onnx").unlink()
    _handmade(models / "badhead", "badhead", ("f16",))
    (models / "badhead" / "badhead.sprm.onnx").write_bytes(b"not onnx at all")
    (models / ".pull-good-1234").mkdir()  # a pull in progress is not an entry

    infos = {m.name: m for m in list_models()}
    assert sorted(infos) == ["badhead", "good", "nohead"]
    good = infos["good"]
    assert good.quants == ("q4_k_m", "f16") and good.fingerprint == "fp-good" and good.note is None
    assert good.size_bytes == sum(p.stat().st_size for p in (models / "good").iterdir())
    assert infos["nohead"].note == "no *.sprm.onnx head" and infos["nohead"].fingerprint is None
    assert "not an ONNX file" in infos["badhead"].note and infos["badhead"].fingerprint is None

    proc = _cli("list")
    assert proc.returncode == 0, proc.stderr
    assert "broken" in proc.stdout and "fp-good" in proc.stdout


def test_list_on_an_empty_store_says_how_to_fill_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("EDGE_MS_HOME", str(tmp_path / "empty"))
    proc = _cli("list")
    assert proc.returncode == 0 and "edge-ms pull REPO_ID" in proc.stdout
    proc = _cli("list", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout) == []


def test_store_root_defaults_to_user_cache(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("EDGE_MS_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert store_root() == tmp_path / ".cache" / "edge_ms"
    monkeypatch.setenv("EDGE_MS_HOME", str(tmp_path / "elsewhere"))
    assert store_root() == tmp_path / "elsewhere"


# --- a store that is broken, or that another user's permissions close -------------------------


def test_list_notes_a_head_that_cannot_load_and_goes_on(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("EDGE_MS_HOME", str(tmp_path / "home"))
    models = tmp_path / "home" / "models"
    _handmade(models / "good", "good", ("f16",), fingerprint="fp-good")
    _handmade(models / "deep", "deep", ("f16",))
    head = models / "deep" / "deep.sprm.onnx"
    model = onnx.load(str(head))
    for prop in model.metadata_props:
        if prop.key.endswith("step_delimiter_ids"):
            prop.value = "[" * 100_000 + "]" * 100_000  # a hostile head: json recursion in the loader
    onnx.save(model, str(head))

    infos = {m.name: m for m in list_models()}
    assert infos["good"].fingerprint == "fp-good" and infos["good"].note is None
    assert infos["deep"].fingerprint is None and str(head) in infos["deep"].note

    proc = _cli("list")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "fp-good" in proc.stdout and f"deep: broken: {head}" in proc.stdout


def test_list_shows_long_names_and_paths_whole(tmp_path: Path, monkeypatch) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("EDGE_MS_HOME", str(home))
    monkeypatch.setenv("COLUMNS", "80")
    name = "metastone-s1-1.5b-" + "distilled-" * 6 + "q"
    _handmade(home / "models" / name, name, ("q4_k_m",), fingerprint="fp-long")
    proc = _cli("list")
    assert proc.returncode == 0, proc.stderr
    row = next(line for line in proc.stdout.splitlines() if "fp-long" in line)
    assert name in row and str(home / "models" / name) in row


def test_a_store_root_that_is_a_file_is_one_line(env: Path, tmp_path: Path, monkeypatch) -> None:
    home = tmp_path / "home-file"
    home.write_text("not a directory")
    monkeypatch.setenv("EDGE_MS_HOME", str(home))
    for args in (["list"], ["list", "--json"], ["pull", REPO, "--quant", "f16"]):
        line = _one_line_error(_cli(*args), f"{home}: the model store is not a directory")
        assert "set EDGE_MS_HOME to a directory you can write" in line
    assert home.read_text() == "not a directory"


def _without_root_overrides() -> None:
    """In the child, as root: drop the capabilities that let root ignore mode bits."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP: gone after exec
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@pytest.fixture
def as_user(tmp_path: Path):
    """Run the CLI so that mode bits apply to it, even when the tests run as root."""
    root = os.geteuid() == 0
    if root and not sys.platform.startswith("linux"):
        pytest.skip("needs Linux capabilities to make root honour mode bits")

    def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", "from edge_ms.cli import main; main()", *args],
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, **env},
            preexec_fn=_without_root_overrides if root else None,
        )

    yield run
    for path in tmp_path.rglob("*"):  # let pytest clean up
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o755)


def test_an_unwritable_store_fails_pull_before_downloading(env: Path, as_user) -> None:
    home = Path(os.environ["EDGE_MS_HOME"])
    (home / "models").mkdir(parents=True)
    for path in (home, home / "models"):
        path.chmod(0o555)
    line = _one_line_error(as_user("pull", REPO, "--quant", "f16", env={}), "cannot write to the model store")
    assert line.startswith(f"error: {home / 'models'}: ") and "Permission denied" in line
    assert list((home / "models").iterdir()) == []


def test_an_unreadable_store_or_entry_is_one_line(tmp_path: Path, as_user) -> None:
    home = tmp_path / "home"
    models = home / "models"
    _handmade(models / "good", "good", ("f16",), fingerprint="fp-good")
    _handmade(models / "closed", "closed", ("f16",))
    env = {"EDGE_MS_HOME": str(home)}

    (models / "closed").chmod(0o311)  # its files cannot be listed
    proc = as_user("list", env=env)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "fp-good" in proc.stdout and "closed: broken: cannot read: Permission denied" in proc.stdout

    models.chmod(0o311)  # the store itself cannot be listed
    line = _one_line_error(as_user("list", env=env), f"{models}: cannot read the model store")
    assert "Permission denied" in line
    # Asking for a model by a name the store might hold says why it cannot answer.
    line = _one_line_error(as_user("solve", "hi", "--model", "nope", env=env), "nope: no such model directory")
    assert f"{models}: cannot read the model store" in line
