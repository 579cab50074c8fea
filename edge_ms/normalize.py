"""The Unicode normalization a checkpoint's tokenizer applies before BPE, carried in the GGUF.

llama.cpp's BPE tokenizer normalizes nothing, but a ``tokenizer.json`` may declare a normalizer
(MetaStone-S1 and DeepSeek-R1-Distill-Qwen declare NFC): without it "e" + U+0301 would tokenize
differently from the checkpoint's own tokenizer. The converter records the forms under
:data:`GGUF_KEY`; ``Model.tokenize`` applies them before llama.cpp sees the text.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

__all__ = ["FORMS", "GGUF_KEY", "apply", "from_gguf", "from_tokenizer_json", "to_gguf"]

GGUF_KEY = "edge_ms.tokenizer.normalizer"
FORMS = ("NFC", "NFD", "NFKC", "NFKD")


def from_tokenizer_json(spec: object) -> tuple[str, ...]:
    """The forms of a ``tokenizer.json`` normalizer, in the order applied.

    Raises ``ValueError`` naming the first normalizer that is not a form (or a Sequence of them):
    Lowercase, Replace, Prepend and the like change text in ways llama.cpp would not follow.
    """
    if spec is None:
        return ()
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind in FORMS:
        return (kind,)
    if kind == "Sequence" and isinstance(spec.get("normalizers"), list):
        return tuple(form for step in spec["normalizers"] for form in from_tokenizer_json(step))
    raise ValueError(str(kind) if isinstance(kind, str) else repr(spec)[:60])


def to_gguf(forms: Sequence[str]) -> str:
    return ",".join(forms)


def from_gguf(value: str) -> tuple[str, ...]:
    """The forms stored by :func:`to_gguf`; ``ValueError`` for anything else."""
    forms = tuple(value.split(",")) if value else ()
    unknown = [f for f in forms if f not in FORMS]
    if unknown:
        raise ValueError(unknown[0])
    return forms


def apply(text: str, forms: Sequence[str]) -> str:
    for form in forms:
        text = unicodedata.normalize(form, text)
    return text
