"""The backbone loader: the tokenizer normalization a GGUF carries, applied before llama.cpp's BPE."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from edge_ms import gguf_export
from edge_ms.errors import EdgeMSError
from edge_ms.model import Model
from edge_ms.safetensors_io import open_checkpoint

FIXTURES = Path(__file__).parent / "fixtures"


def _gguf(path: Path, normalizer: tuple[str, ...]) -> Path:
    """The tiny fixture as an f32 GGUF whose metadata records ``normalizer`` as given, unchecked."""
    hf = FIXTURES / "tiny-qwen2"
    params = gguf_export.read_params(hf / "config.json")
    vocab = dataclasses.replace(gguf_export.read_vocab(hf, params.vocab_size), normalizer=normalizer)
    plan = gguf_export.plan_tensors(open_checkpoint(hf), params)
    gguf_export.write_gguf(path, "tiny", params, vocab, plan, "0123456789abcdef", "f32")
    return path


def test_gguf_without_the_key_tokenizes_the_text_as_given(tmp_path: Path) -> None:
    model = Model(_gguf(tmp_path / "plain.gguf", ()))
    try:
        assert model.normalizer == ()
        assert model.tokenize("cafe\u0301") != model.tokenize("caf\u00e9")
    finally:
        model.close()


def test_gguf_with_nfc_tokenizes_both_spellings_alike(tmp_path: Path) -> None:
    model = Model(_gguf(tmp_path / "nfc.gguf", ("NFC",)))
    try:
        assert model.normalizer == ("NFC",)
        assert model.tokenize("cafe\u0301 A\u030a") == model.tokenize("caf\u00e9 \u00c5")
    finally:
        model.close()


def test_unknown_form_in_the_gguf_is_one_line(tmp_path: Path) -> None:
    path = _gguf(tmp_path / "odd.gguf", ("NFC", "Lowercase"))
    with pytest.raises(EdgeMSError) as err:
        Model(path)
    assert str(err.value) == f"{path}: edge_ms.tokenizer.normalizer names an unknown Unicode form 'Lowercase'"
