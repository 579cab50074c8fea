"""``edge-ms convert``: a Hugging Face MetaStone-S1 checkpoint -> backbone GGUF + SPRM head ONNX, torch-free.

Everything is validated before anything is written, written into a temporary directory beside
the output, and renamed into place at the end, so a failed or interrupted conversion leaves no
half-written output and an existing output directory survives unless ``force`` is given.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_ms import gguf_export
from edge_ms.atomic import fresh_dir, replace_dir
from edge_ms.errors import EdgeMSError, fail
from edge_ms.head import WEIGHT_KEYS, HeadSpec, weight_shapes, write_head
from edge_ms.pt_load import load_state_dict
from edge_ms.quants import QUANTS
from edge_ms.safetensors_io import TensorEntry, iter_chunks, open_checkpoint

__all__ = ["ConvertResult", "convert", "fingerprint", "STEP_DELIMITER"]

log = logging.getLogger(__name__)

# MetaStone-S1 ends every reasoning step with this text (docs/method.md, section 3).
STEP_DELIMITER = ".\n\n"
HEAD_FILE = "score_module.pt"


@dataclass(frozen=True)
class ConvertResult:
    gguf_path: Path
    head_path: Path
    fingerprint: str


def fingerprint(entries: Mapping[str, TensorEntry]) -> str:
    """sha256 over name, dtype, shape and raw bytes of every tensor, in sorted name order; 16 hex chars.

    Computed on the source checkpoint, so every quantization of one backbone shares it and a
    head can be matched to its backbone whatever the GGUF type.
    """
    h = hashlib.sha256()
    for name in sorted(entries):
        e = entries[name]
        h.update(f"{name}\0{e.dtype}\0{','.join(map(str, e.shape))}\0".encode())
        for chunk in iter_chunks(e):
            h.update(memoryview(chunk).cast("B"))
    return h.hexdigest()[:16]


def _read_head(hf_dir: Path, hidden_size: int) -> dict[str, np.ndarray]:
    path = hf_dir / HEAD_FILE
    if not path.is_file():
        raise fail(path, "file not found (the SPRM head of a MetaStone-S1 checkpoint)")
    want = weight_shapes(hidden_size)
    # The shapes go to the loader so that a hostile file is refused before anything is inflated.
    state = load_state_dict(path, want.values(), f"a head for hidden_size {hidden_size} of config.json")
    if set(state) != set(WEIGHT_KEYS):
        # A head saved from a wrapper module carries one common prefix ("score_head.0.weight").
        prefixes = {k[: -len(s)] for k in state for s in WEIGHT_KEYS if k.endswith("." + s)}
        if len(prefixes) == 1 and {next(iter(prefixes)) + s for s in WEIGHT_KEYS} == set(state):
            state = {k[len(next(iter(prefixes))) :]: v for k, v in state.items()}
        else:
            raise fail(path, f"expected the keys {', '.join(WEIGHT_KEYS)}, found {', '.join(sorted(state))}")
    for key, shape in want.items():
        if state[key].shape != shape:
            raise fail(
                path,
                f"head {key} has shape {list(state[key].shape)}, hidden_size {hidden_size} of config.json needs "
                f"{list(shape)}",
            )
    return state


def convert(
    hf_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    quant: str = "f16",
    force: bool = False,
) -> ConvertResult:
    """Convert ``hf_dir`` into ``out_dir/<name>-<quant>.gguf`` and ``out_dir/<name>.sprm.onnx``."""
    if quant not in QUANTS:
        raise EdgeMSError(f"--quant {quant}: unknown quantization; choose one of {', '.join(QUANTS)}")
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if not hf_dir.is_dir():
        raise fail(hf_dir, "not a directory")
    if out_dir.exists() and not out_dir.is_dir():
        raise fail(out_dir, "exists and is not a directory")
    if out_dir.exists() and not force:
        raise fail(out_dir, "already exists (use --force to replace it)")
    src, dst = hf_dir.resolve(), out_dir.resolve()
    if dst == src or dst in src.parents:
        # --force would replace the output directory, and with it the checkpoint being read.
        raise fail(out_dir, f"is or contains the input directory {hf_dir}; choose another output")

    # Validate every input before writing anything.
    params = gguf_export.read_params(hf_dir / "config.json")
    vocab = gguf_export.read_vocab(hf_dir, params.vocab_size)
    entries = open_checkpoint(hf_dir)
    plan = gguf_export.plan_tensors(entries, params)
    head_weights = _read_head(hf_dir, params.hidden_size)

    name = src.name.lower()
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = fresh_dir(out_dir, "tmp")
    except OSError as err:
        raise fail(out_dir.parent, f"cannot create the output beside it: {err.strerror or err}") from None
    try:
        fp = fingerprint(entries)
        gguf_path = tmp / f"{name}-{quant}.gguf"
        if quant in ("f32", "f16"):
            gguf_export.write_gguf(gguf_path, name, params, vocab, plan, fp, quant)
        else:
            f16_path = tmp / f".{name}-f16.gguf"
            gguf_export.write_gguf(f16_path, name, params, vocab, plan, fp, "f16")
            gguf_export.quantize(f16_path, gguf_path, quant)
            f16_path.unlink()
        spec = HeadSpec(
            layer=params.n_layer - 2,
            hidden_size=params.hidden_size,
            # Tokenized with the vocabulary just written, i.e. exactly as the runtime will.
            step_delimiter_ids=gguf_export.tokenize(gguf_path, STEP_DELIMITER),
            think_start_id=vocab.ids.get("<think>"),
            think_end_id=vocab.ids.get("</think>"),
            backbone_fingerprint=fp,
        )
        head_path = tmp / f"{name}.sprm.onnx"
        write_head(head_path, head_weights, spec, provenance={"source": src.name})
        _install(tmp, out_dir)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):
            raise fail(out_dir, f"cannot write the output: {err.strerror or err}") from None
        raise
    log.info("converted %s -> %s (fingerprint %s)", hf_dir, out_dir, fp)
    return ConvertResult(out_dir / gguf_path.name, out_dir / head_path.name, fp)


def _install(tmp: Path, out_dir: Path) -> None:
    """Move the finished ``tmp`` to ``out_dir``; an old ``out_dir`` goes only once the new one is whole."""
    old = fresh_dir(out_dir, "old")
    try:
        replace_dir(tmp, out_dir, old / out_dir.name)
    finally:
        shutil.rmtree(old, ignore_errors=True)
