"""The local model store: ``edge-ms pull`` fills it, ``edge-ms list`` shows it, ``--model NAME`` reads it.

Layout: ``<root>/models/<name>/`` holds one ``<name>.sprm.onnx`` head and one GGUF per pulled
quantization, ``<name>-<quant>.gguf``. The root is ``$EDGE_MS_HOME`` if set, else ``~/.cache/edge_ms``.
A directory whose name starts with ``.`` under ``models/`` is a pull in progress and is ignored.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from edge_ms.atomic import replace_dir
from edge_ms.default_model import default_model_files
from edge_ms.errors import EdgeMSError, fail
from edge_ms.head import load_head
from edge_ms.quants import QUANT_PREFERENCE, QUANTS

__all__ = [
    "QUANTS",
    "QUANT_PREFERENCE",
    "ModelFiles",
    "ModelInfo",
    "default_name",
    "list_models",
    "locate",
    "models_dir",
    "pull",
    "resolve_model",
    "store_root",
]

HEAD_SUFFIX = ".sprm.onnx"
# Only what the converter reads: no original PyTorch .bin weights, no ONNX/other exports.
HF_ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "score_module.pt",
]
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SET_HOME = "set EDGE_MS_HOME to a directory you can write"


@dataclass(frozen=True)
class ModelFiles:
    """The two files a run needs."""

    name: str
    gguf: Path
    head: Path


@dataclass(frozen=True)
class ModelInfo:
    """One store entry as ``edge-ms list`` shows it; ``note`` says what is wrong with a broken one."""

    name: str
    path: Path
    quants: tuple[str, ...]
    size_bytes: int
    fingerprint: str | None
    note: str | None = None


def store_root() -> Path:
    """``$EDGE_MS_HOME`` if set and non-empty, else ``~/.cache/edge_ms`` (read on every call)."""
    env = os.environ.get("EDGE_MS_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "edge_ms"


def models_dir() -> Path:
    return store_root() / "models"


def default_name(repo_id: str) -> str:
    """The store name of a Hub repo: its name part, lower-cased (``Org/Model-1.5B`` -> ``model-1.5b``)."""
    return repo_id.rstrip("/").rsplit("/", 1)[-1].lower()


def locate(model: str | Path | None, quant: str | None = None, head: str | Path | None = None) -> tuple[Path, Path | None]:
    """(GGUF, head or None) of a GGUF file, a store name or directory, or the embedded default (None)."""
    if model is not None and Path(model).is_file():
        return Path(model), Path(head) if head else None
    if model is None:
        gguf, default_head = default_model_files()
        return gguf, Path(head) if head else default_head
    files = resolve_model(model, quant)
    return files.gguf, Path(head) if head else files.head


def resolve_model(model: str | Path, quant: str | None = None) -> ModelFiles:
    """Find the GGUF and head for ``model``: a model directory, a store name, or a pulled repo id.

    A directory path wins over a store entry of the same name. Without ``quant`` and with several
    GGUFs, the first of ``QUANT_PREFERENCE`` present is used (q4_k_m > q8_0 > f16 > f32).
    """
    path = Path(model)
    if path.is_dir():
        return _model_files(path, path.resolve().name, quant)
    store = models_dir()
    text = str(model)
    for candidate in (text, default_name(text)):
        if _NAME_RE.match(candidate) and (store / candidate).is_dir():
            return _model_files(store / candidate, candidate, quant)
    try:
        names = [m.name for m in _entries()]
        have = (
            f"store has: {', '.join(names)}"
            if names
            else f"the store at {store} is empty; use `edge-ms pull REPO_ID`"
        )
    except EdgeMSError as err:  # the store itself is broken: say so rather than what it holds
        have = str(err)
    if path.exists():
        raise fail(model, f"not a model directory ({have})")
    raise fail(model, f"no such model directory or store name ({have})")


def list_models() -> list[ModelInfo]:
    """Every entry of the store, sorted by name; a broken entry is listed with a ``note``, not raised."""
    out = []
    for entry in _entries():
        try:
            out.append(_inspect(entry))
        except OSError as err:  # e.g. an entry directory that cannot be read
            out.append(ModelInfo(entry.name, entry, (), 0, None, f"cannot read: {err.strerror or err}"))
    return out


def _inspect(entry: Path) -> ModelInfo:
    size = sum(f.stat().st_size for f in entry.iterdir() if f.is_file())
    heads, ggufs = _scan(entry)
    quants = tuple(sorted({q for q in ggufs if q}, key=_quant_rank))
    fingerprint, notes = None, []
    if len(heads) != 1:
        notes.append("no *.sprm.onnx head" if not heads else f"{len(heads)} heads")
    else:
        try:
            fingerprint = load_head(heads[0]).spec.backbone_fingerprint
        except EdgeMSError as err:
            notes.append(str(err))
        except Exception as err:  # noqa: BLE001 - one unloadable head must not hide the other entries
            notes.append(f"{heads[0]}: cannot load the head ({type(err).__name__})")
    if not ggufs:
        notes.append("no .gguf file")
    return ModelInfo(entry.name, entry, quants, size, fingerprint, "; ".join(notes) or None)


def pull(
    repo_id: str,
    quant: str = "q4_k_m",
    revision: str | None = None,
    name: str | None = None,
    force: bool = False,
) -> ModelFiles:
    """Download ``repo_id`` from the Hugging Face Hub, convert it to ``quant`` and add it to the store.

    A second quantization of the same backbone is added beside the first. An existing GGUF of the
    same quantization, or a store entry holding a different backbone, is replaced only with ``force``.
    """
    if quant not in QUANTS:
        raise fail(repo_id, f"unknown quantization {quant!r} (choose from {', '.join(QUANTS)})")
    _check_repo_id(repo_id)
    name = name or default_name(repo_id)
    if not _NAME_RE.match(name):
        raise fail(
            repo_id, f"{name!r} is not a usable store name (letters, digits, '.', '_', '-'; pass --name)"
        )
    dest = models_dir() / name
    gguf_name = f"{name}-{quant}.gguf"
    if (dest / gguf_name).exists() and not force:
        raise fail(dest / gguf_name, "already in the store; pass --force to download and convert again")

    # Staged beside the final directory (same filesystem) so every move below is a rename; made
    # before the download so that a store that cannot be written fails at once, not after it.
    staging = _staging(dest.parent, name)
    try:
        hf_dir = _download(repo_id, revision)
        # Imported here: resolving a model for a run must not pay for loading the converter.
        from edge_ms.convert import convert

        out = staging / "out"
        result = convert(hf_dir, out, quant=quant, force=False)
        # The converter names files after the snapshot directory (a commit hash in the Hub cache).
        os.replace(result.gguf_path, out / gguf_name)
        os.replace(result.head_path, out / f"{name}{HEAD_SUFFIX}")
        for stale in out.iterdir():
            if stale.name not in (gguf_name, f"{name}{HEAD_SUFFIX}"):
                _remove(stale)
        try:
            return _install(out, dest, gguf_name, name, repo_id, force)
        except OSError as err:
            raise fail(dest, f"cannot install into the store: {err.strerror or err}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _install(out: Path, dest: Path, gguf_name: str, name: str, repo_id: str, force: bool) -> ModelFiles:
    """Move a converted ``out`` directory into the store entry ``dest``."""
    new_head = out / f"{name}{HEAD_SUFFIX}"
    new_fp = load_head(new_head).spec.backbone_fingerprint
    old_head = _existing_head(dest)
    if old_head is None and dest.exists() and any(dest.iterdir()) and not force:
        raise fail(dest, "exists but is not a usable model directory; pass --force to replace it")
    if old_head is not None:
        old_fp = _fingerprint_or_none(old_head)
        if old_fp == new_fp:
            # Same backbone: add (or with force replace) this quantization, keep the others.
            os.replace(out / gguf_name, dest / gguf_name)
            if force:
                os.replace(new_head, old_head)
            return ModelFiles(name, dest / gguf_name, old_head)
        if not force:
            raise fail(
                dest,
                f"holds another backbone ({old_fp or 'unreadable head'}) than {repo_id} ({new_fp}); "
                "pass --name to store it beside, or --force to replace it",
            )
    # A new entry, or a forced replacement of another backbone: swap whole directories (the old
    # one is set aside in the staging directory, which the caller removes).
    replace_dir(out, dest, out.parent / "old")
    return ModelFiles(name, dest / gguf_name, dest / f"{name}{HEAD_SUFFIX}")


def _staging(models: Path, name: str) -> Path:
    _check_root()
    try:
        models.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".pull-{name}-", dir=models))
    except OSError as err:
        raise fail(models, f"cannot write to the model store ({_SET_HOME}): {err.strerror or err}") from None


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise fail(repo_id, "not a valid Hugging Face repo id (expected ORG/NAME)") from None


def _download(repo_id: str, revision: str | None) -> Path:
    import huggingface_hub
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id}@{revision}" if revision else repo_id
    try:
        return Path(
            huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=HF_ALLOW_PATTERNS)
        )
    except GatedRepoError:
        raise fail(
            where, "gated repository: accept its terms on huggingface.co, then `hf auth login`"
        ) from None
    except RepositoryNotFoundError:
        raise fail(
            where, "repository not found on the Hugging Face Hub (private ones need `hf auth login`)"
        ) from None
    except RevisionNotFoundError:
        raise fail(where, f"revision {revision!r} not found in the repository") from None
    except LocalEntryNotFoundError:
        raise fail(
            where,
            "not in the local Hugging Face cache and the Hub cannot be reached (offline, or HF_HUB_OFFLINE=1)",
        ) from None
    except HFValidationError:
        raise fail(where, "not a valid Hugging Face repo id (expected ORG/NAME)") from None
    except (HfHubHTTPError, OSError) as err:
        raise fail(where, f"download failed: {_first_line(err)}") from None


def _check_root() -> None:
    for path in (store_root(), models_dir()):
        if path.exists() and not path.is_dir():
            raise fail(path, f"the model store is not a directory ({_SET_HOME})")


def _entries() -> list[Path]:
    _check_root()
    store = models_dir()
    if not store.exists():
        return []
    try:
        return sorted(p for p in store.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as err:
        raise fail(store, f"cannot read the model store ({_SET_HOME}): {err.strerror or err}") from None


def _quant_of(gguf: Path) -> str | None:
    stem = gguf.name[: -len(".gguf")].lower()
    return stem.rsplit("-", 1)[1] if "-" in stem else None


def _quant_rank(quant: str) -> tuple[int, str]:
    return (QUANT_PREFERENCE.index(quant) if quant in QUANT_PREFERENCE else len(QUANT_PREFERENCE), quant)


def _scan(directory: Path) -> tuple[list[Path], dict[str | None, list[Path]]]:
    heads = sorted(p for p in directory.glob(f"*{HEAD_SUFFIX}") if p.is_file())
    ggufs: dict[str | None, list[Path]] = {}
    for p in sorted(directory.glob("*.gguf")):
        if p.is_file():
            ggufs.setdefault(_quant_of(p), []).append(p)
    return heads, ggufs


def _model_files(directory: Path, name: str, quant: str | None) -> ModelFiles:
    heads, ggufs = _scan(directory)
    if not heads:
        raise fail(directory, f"no *{HEAD_SUFFIX} head in this model directory")
    if len(heads) > 1:
        raise fail(directory, f"several heads ({', '.join(p.name for p in heads)}); keep one")
    if not ggufs:
        raise fail(directory, "no .gguf model file in this model directory")
    have = ", ".join(p.name for files in ggufs.values() for p in files)
    if quant is not None:
        chosen = ggufs.get(quant.lower(), [])
        if not chosen:
            raise fail(directory, f"no {quant} GGUF here (have: {have}); `edge-ms pull` can add it")
    else:
        known = [q for q in QUANT_PREFERENCE if q in ggufs]
        if known:
            chosen = ggufs[known[0]]
        elif sum(len(v) for v in ggufs.values()) == 1:
            chosen = next(iter(ggufs.values()))
        else:
            raise fail(directory, f"cannot tell which GGUF to use ({have}); name them <name>-<quant>.gguf")
    if len(chosen) > 1:
        raise fail(
            directory, f"several GGUFs for one quantization ({', '.join(p.name for p in chosen)}); keep one"
        )
    return ModelFiles(name, chosen[0], heads[0])


def _existing_head(dest: Path) -> Path | None:
    if not dest.is_dir():
        return None
    heads, _ = _scan(dest)
    return heads[0] if len(heads) == 1 else None


def _fingerprint_or_none(head: Path) -> str | None:
    try:
        return load_head(head).spec.backbone_fingerprint
    except EdgeMSError:
        return None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
