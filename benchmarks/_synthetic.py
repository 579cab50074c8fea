"""A random-weight GGUF with the real MetaStone-S1-1.5B shape, and a random SPRM head for it.

The benchmark measures speed and memory, which depend on the shape and the weight format,
not on what the weights say. So the tensors are written straight as Q4_0 / Q8_0 blocks of
random bytes with sane f16 scales (no f32 copy of 1.5B parameters is ever made) through
gguf-py's GGUFWriter, one tensor at a time.

Three choices make random weights behave like a reasoning model where it matters for timing:

* Step delimiters. A real head scores the token before ``".\\n\\n"`` (one id). A random model
  would sample that one id about once in 150k tokens, so there would be no steps to score.
  The head written here lists 3% of the vocabulary as delimiters instead, chosen so that they
  also hold ~3% of the model's mean next-token probability (see ``delimiter_ids``): a step
  then starts about every 30 tokens, the order of a real reasoning step (a sentence or two).
* Logit scale. ``output.weight`` is scaled so the next-token distribution is peaked (a few
  dozen tokens carry most of the mass), like a trained model's, not flat over 152k ids: a
  flat distribution makes llama.cpp's top-p sampler sort the whole vocabulary every token,
  a cost a real model does not pay and that would dilute every overhead measured here.
* Zero-mean weights. Random block bytes are not zero-mean (Q4_0 holds -8..7); each block's
  scale gets a random sign, or a shared direction grows through the 28 layers until every
  position has the same logits and sampling falls into a loop.

Files are cached under ``~/.cache/edge_ms/bench/`` and written through a temp file + rename.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from edge_ms import gguf_export
from edge_ms.atomic import atomic_path

CACHE = Path(os.environ.get("EDGE_MS_BENCH_CACHE", Path.home() / ".cache" / "edge_ms" / "bench"))
VERSION = 4  # bump when the generator changes what it writes
HEAD_VERSION = 2  # bump when the head or its delimiters change

# R1-Distill-Qwen special ids (docs/method.md, section 2).
EOS_ID, USER_ID, ASSISTANT_ID, BOS_ID, THINK_ID, END_THINK_ID = 151643, 151644, 151645, 151646, 151648, 151649
SPECIALS = {
    EOS_ID: "<｜end▁of▁sentence｜>",
    USER_ID: "<｜User｜>",
    ASSISTANT_ID: "<｜Assistant｜>",
    BOS_ID: "<｜begin▁of▁sentence｜>",
    151647: "<|EOT|>",
    THINK_ID: "<think>",
    END_THINK_ID: "</think>",
}
FIRST_SPECIAL = 151643
N_SPECIAL = 22  # 151643..151664 are added tokens in Qwen2; the rest up to 151936 is padding


@dataclass(frozen=True)
class Shape:
    """MetaStone-S1-1.5B (docs/method.md, section 2)."""

    n_layer: int = 28
    hidden: int = 1536
    n_head: int = 12
    n_head_kv: int = 2
    ffn: int = 8960
    vocab: int = 151936
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6
    context_length: int = 131072

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.n_head * self.n_head_kv


S1_1_5B = Shape()

WEIGHT_TYPES = {"q4_0": gguf.GGMLQuantizationType.Q4_0, "q8_0": gguf.GGMLQuantizationType.Q8_0}
FILE_TYPES = {"q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
# Standard deviation of the integer part of a block: Q4_0 holds nibble-8 in [-8, 7], Q8_0 an int8.
_Q_STD = {"q4_0": np.sqrt((16**2 - 1) / 12), "q8_0": np.sqrt((256**2 - 1) / 12)}

WEIGHT_STD = 0.02  # HF initializer_range: keeps the residual stream in a sane range over 28 layers
# Logits get a std of ~6 (measured). llama.cpp applies top-p before the temperature, at T=1;
# there the 0.95 nucleus then mostly fits in the 256 candidates llama.cpp sorts first, as with a
# trained model, instead of forcing a sort of all 152k ids each token (3x the sampling cost).
# After temperature 0.6 sampling stays diverse (no loops) and ~3% of the tokens start a step.
OUTPUT_STD = 0.15
DELIMITER_FRACTION = 0.03


def bytes_to_unicode() -> list[str]:
    """GPT-2's byte-level alphabet: the printable stand-in for each of the 256 bytes."""
    keep = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return [chars[b] for b in range(256)]


def synthetic_vocab(n_vocab: int = S1_1_5B.vocab) -> tuple[list[str], list[int], list[str]]:
    """Tokens, token types and merges of a byte-level BPE vocabulary with Qwen2's ids for the specials.

    Every token is a string over GPT-2's byte alphabet, so llama.cpp can turn any id back
    into bytes. The only merges join digit pairs: any text without digits tokenizes to one
    token per byte, which makes prompt lengths exact.
    """
    alphabet = bytes_to_unicode()
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    pool = itertools.chain(
        alphabet,
        ("".join(p) for p in itertools.product(alphabet, repeat=2)),
        ("".join(p) for p in itertools.product(letters, repeat=3)),
    )
    tokens = list(itertools.islice(pool, FIRST_SPECIAL))
    types = [int(gguf.TokenType.NORMAL)] * FIRST_SPECIAL
    for i in range(FIRST_SPECIAL, n_vocab):
        if i in SPECIALS:
            tokens.append(SPECIALS[i])
            types.append(int(gguf.TokenType.CONTROL))
        elif i < FIRST_SPECIAL + N_SPECIAL:
            tokens.append(f"<|extra_{i}|>")
            types.append(int(gguf.TokenType.CONTROL))
        else:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
    merges = [f"{a} {b}" for a in "0123456789" for b in "0123456789"]
    return tokens, types, merges


def delimiter_ids(mean_probs: np.ndarray, fraction: float = DELIMITER_FRACTION, seed: int = 0) -> list[int]:
    """``fraction`` of the ordinary (multi-byte) token ids, together holding ~``fraction`` of the mass.

    A random model prefers some tokens to others, so ids drawn uniformly can hold far more or
    far less than their share of the next-token mass. Drawing one id from each run of
    ``1/fraction`` ids ranked by ``mean_probs`` (the model's mean next-token distribution)
    keeps both the count and the mass at ``fraction``: steps then start at that rate.
    """
    rng = np.random.default_rng(seed + 1)
    ordinary = np.arange(256, FIRST_SPECIAL)
    ranked = ordinary[np.argsort(-mean_probs[ordinary], kind="stable")]
    k = int(round(1 / fraction))
    chosen = [int(ranked[i + rng.integers(0, min(k, len(ranked) - i))]) for i in range(0, len(ranked), k)]
    return sorted(chosen)


def mean_next_token_probs(
    model, n_positions: int = 128, temperature: float = 0.6, seed: int = 0
) -> np.ndarray:
    """The model's next-token distribution at ``temperature``, averaged over a random context."""
    import llama_cpp

    p = llama_cpp.llama_context_default_params()
    p.n_ctx = p.n_batch = p.n_ubatch = n_positions
    p.n_seq_max = 1
    p.n_threads = p.n_threads_batch = model.settings.threads()
    p.no_perf = True
    ctx = llama_cpp.llama_init_from_model(model.ptr, p)
    batch = llama_cpp.llama_batch_init(n_positions, 0, 1)
    try:
        ids = np.random.default_rng(seed + 3).integers(256, FIRST_SPECIAL, size=n_positions)
        for i, tok in enumerate(ids):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = int(tok), i, 1, True
            batch.seq_id[i][0] = 0
        batch.n_tokens = n_positions
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed while calibrating the delimiters")
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx), shape=(n_positions, model.n_vocab))
        z = logits / temperature
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return (z / z.sum(axis=1, keepdims=True)).mean(axis=0)
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)


def _random_blocks(rng: np.random.Generator, rows: int, cols: int, kind: str, std: float) -> np.ndarray:
    """``rows`` x ``cols`` weights as quantized blocks of random bytes, in gguf's byte layout."""
    qtype = WEIGHT_TYPES[kind]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    per_row = cols // block
    data = np.frombuffer(bytearray(rng.bytes(rows * per_row * size)), dtype=np.uint8).reshape(
        rows, per_row, size
    )
    # Both formats start each block with its f16 scale; vary it a little so rows differ in norm.
    # The integer part of a block is not zero-mean (Q4_0: -8..7, Q8_0: -128..127), so a random
    # sign on each scale is what makes the weights zero-mean: without it every matrix shares a
    # common direction that grows layer after layer, and every position ends up with the same logits.
    sign = np.where(rng.integers(0, 2, size=(rows, per_row), dtype=np.uint8) == 1, 1.0, -1.0)
    d = (sign * std / _Q_STD[kind] * rng.uniform(0.75, 1.25, size=(rows, per_row))).astype(np.float16)
    data[:, :, 0:2] = d.view(np.uint8).reshape(rows, per_row, 2)
    return data.reshape(rows, per_row * size)


def _plan(shape: Shape, kind: str) -> list[tuple[str, tuple[int, int] | tuple[int], str, float]]:
    """(gguf name, numpy shape, storage, std) for every tensor, in llama.cpp's order."""
    shapes = gguf_export.qwen2_tensor_shapes(
        n_layer=shape.n_layer, n_embd=shape.hidden, n_head=shape.n_head, n_head_kv=shape.n_head_kv,
        n_ff=shape.ffn, n_vocab=shape.vocab,
    )
    plan = []
    for name, dims in shapes.items():
        if len(dims) == 1:  # norms start at one; Qwen2's q, k and v biases are random
            plan.append((name, dims, "ones", 0.0) if name.endswith("norm.weight") else (name, dims, "normal", WEIGHT_STD))
        elif name == "output.weight":
            # llama-quantize keeps the output matrix in higher precision; Q8_0 does that here.
            plan.append((name, dims, "q8_0", OUTPUT_STD))
        else:
            plan.append((name, dims, kind, WEIGHT_STD))
    return plan


def _tensor(rng: np.random.Generator, shape: tuple[int, ...], storage: str, std: float) -> np.ndarray:
    if storage == "ones":
        return np.ones(shape, dtype=np.float32)
    if storage == "normal":
        return (rng.standard_normal(shape) * std).astype(np.float32)
    return _random_blocks(rng, shape[0], shape[1], storage, std)


def write_raw_gguf(
    path: Path,
    name: str,
    params: gguf_export.Qwen2Params,
    vocab: gguf_export.Vocab,
    file_type: gguf.LlamaFileType,
    tensors: list[tuple[str, tuple[int, ...], str]],
    arrays: Iterable[np.ndarray],
    fingerprint: str | None = None,
) -> None:
    """A Qwen2 GGUF from ready-made data, whole or not at all, one tensor in memory at a time.

    ``tensors`` are (gguf name, shape, ggml type name); ``arrays`` yields their data in that
    order: float32 arrays of the shape for "F32", otherwise the raw blocks as uint8
    [rows, cols // block * block_bytes].
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN2])
        try:
            gguf_export.add_metadata(w, name, params, vocab, file_type, fingerprint)
            for tname, dims, type_name in tensors:
                if type_name == "F32":
                    w.add_tensor_info(tname, dims, np.dtype(np.float32), 4 * int(np.prod(dims)))
                else:
                    qtype = gguf.GGMLQuantizationType[type_name]
                    block, size = gguf.GGML_QUANT_SIZES[qtype]
                    byte_shape = (dims[0], dims[1] // block * size)
                    w.add_tensor_info(tname, byte_shape, np.dtype(np.uint8), byte_shape[0] * byte_shape[1], qtype)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for data in arrays:
                w.write_tensor_data(data)
        finally:
            w.close()


def write_synthetic_gguf(path: Path, kind: str = "q4_0", shape: Shape = S1_1_5B, seed: int = 0) -> None:
    """Write the random model to ``path`` (whole or not at all); only one tensor is in memory at a time."""
    if kind not in WEIGHT_TYPES:
        raise ValueError(f"weights {kind!r}: choose from {', '.join(WEIGHT_TYPES)}")
    params = gguf_export.Qwen2Params(
        n_layer=shape.n_layer, hidden_size=shape.hidden, n_head=shape.n_head, n_head_kv=shape.n_head_kv,
        head_dim=shape.hidden // shape.n_head, ffn_size=shape.ffn, context_length=shape.context_length,
        rope_theta=shape.rope_theta, rms_eps=shape.rms_eps, vocab_size=shape.vocab, tied_embeddings=False,
    )
    tokens, types, merges = synthetic_vocab(shape.vocab)
    vocab = gguf_export.Vocab(tokens=tokens, types=types, merges=merges, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=EOS_ID,
                              add_bos=True, chat_template=None, ids={})
    plan = _plan(shape, kind)
    tensors = [(name, shp, WEIGHT_TYPES[st].name if st in WEIGHT_TYPES else "F32") for name, shp, st, _ in plan]
    rng = np.random.default_rng(seed)
    write_raw_gguf(
        path, f"synthetic MetaStone-S1-1.5B shape ({kind}, random weights)", params, vocab, FILE_TYPES[kind],
        tensors, (_tensor(rng, shp, storage, std) for _, shp, storage, std in plan),
    )


def write_random_head(path: Path, model_path: Path, n_layer: int, hidden: int, seed: int = 0) -> None:
    """A random SPRM head for the model at ``model_path``: layer n_layer-2, 3% of the ids (and mass) as delimiters."""
    from edge_ms.head import HeadSpec, write_head
    from edge_ms.model import Model

    model = Model(model_path)
    try:
        fingerprint = model.fingerprint
        delimiters = delimiter_ids(mean_next_token_probs(model, seed=seed), seed=seed)
    finally:
        model.close()
    rng = np.random.default_rng(seed + 2)
    c = hidden
    weights = {
        "0.weight": rng.standard_normal((2 * c, c)).astype(np.float32) / np.sqrt(c),
        "0.bias": np.zeros(2 * c, np.float32),
        "3.weight": rng.standard_normal((1, 2 * c)).astype(np.float32) / np.sqrt(2 * c),
        "3.bias": np.zeros(1, np.float32),
    }
    spec = HeadSpec(
        layer=n_layer - 2,
        hidden_size=c,
        step_delimiter_ids=tuple(delimiters),
        think_start_id=THINK_ID,
        think_end_id=END_THINK_ID,
        backbone_fingerprint=fingerprint,
    )
    write_head(path, weights, spec, {"source": "benchmarks/_synthetic.py (random weights)"})


def synthetic_model(kind: str = "q4_0", seed: int = 0, cache: Path = CACHE) -> tuple[Path, Path]:
    """(gguf, head) of the random 1.5B-shaped model, written once and cached."""
    stem = f"s1-1.5b-shape-{kind}-seed{seed}-v{VERSION}"
    gguf_path = cache / f"{stem}.gguf"
    head_path = cache / f"{stem}-h{HEAD_VERSION}.sprm.onnx"
    if not gguf_path.is_file():
        write_synthetic_gguf(gguf_path, kind, S1_1_5B, seed)
        head_path.unlink(missing_ok=True)  # a head belongs to one backbone file
    if not head_path.is_file():
        write_random_head(head_path, gguf_path, S1_1_5B.n_layer, S1_1_5B.hidden, seed)
    return gguf_path, head_path
