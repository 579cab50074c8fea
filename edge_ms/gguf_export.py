"""Write a Qwen2 backbone as GGUF with gguf-py, one tensor at a time, and quantize it with llama.cpp.

Three inputs are read here: ``config.json`` (hyper-parameters), ``tokenizer.json`` /
``tokenizer_config.json`` / ``generation_config.json`` (the vocabulary, as llama.cpp's
"gpt2" BPE tokenizer with the "qwen2" pre-tokenizer), and the safetensors entries
(streamed by :mod:`edge_ms.safetensors_io`).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from edge_ms import normalize
from edge_ms.errors import EdgeMSError, fail
from edge_ms.jsonio import parse_json
from edge_ms.readfile import read_capped
from edge_ms.safetensors_io import TensorEntry, convert_into

__all__ = [
    "FINGERPRINT_KEY",
    "Qwen2Params",
    "Vocab",
    "read_params",
    "read_vocab",
    "add_metadata",
    "plan_tensors",
    "qwen2_tensor_shapes",
    "write_gguf",
    "quantize",
    "tokenize",
]


# Qwen2's tokenizer.json is 7 MB and the largest vocabularies stay under 40 MB: anything past this
# cap is not a tokenizer, config or chat template (and /dev/zero would be read until memory ran out).
MAX_TEXT_BYTES = 64 << 20
FINGERPRINT_KEY = "edge_ms.backbone_fingerprint"
ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN2]

# The pre-tokenizer split of Qwen2's tokenizer.json; llama.cpp's "qwen2" pre-tokenizer
# implements exactly this one, so any other regex would tokenize differently.
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class Qwen2Params:
    """The hyper-parameters llama.cpp's qwen2 graph needs, from ``config.json``."""

    n_layer: int
    hidden_size: int
    n_head: int
    n_head_kv: int
    head_dim: int
    ffn_size: int
    context_length: int
    rope_theta: float
    rms_eps: float
    vocab_size: int
    tied_embeddings: bool


@dataclass
class Vocab:
    """The full llama.cpp vocabulary: one entry per embedding row, padding included."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    add_bos: bool
    chat_template: str | None
    ids: dict[str, int] = field(repr=False)  # token text -> id, for looking up special tokens
    normalizer: tuple[str, ...] = ()  # Unicode forms applied before BPE (edge_ms.normalize)


def _read_text(path: Path, what: str, optional: bool = False) -> str | None:
    """A checkpoint's text file, read with a bound (see :mod:`edge_ms.readfile`); None if optional and absent."""
    if optional and not os.path.lexists(path):
        return None
    data = read_capped(path, MAX_TEXT_BYTES, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise fail(path, f"not UTF-8 text ({err})") from None


def _read_json(path: Path, optional: bool = False) -> dict:
    text = _read_text(path, "JSON file", optional)
    if text is None:
        return {}
    data = parse_json(text, path)
    if not isinstance(data, dict):
        raise fail(path, "not a JSON object")
    return data


def _int(path: Path, cfg: Mapping, key: str, default: int | None = None) -> int:
    value = cfg.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise fail(path, f"{key} must be a positive integer, got {value!r}")
    return value


def read_params(config_path: str | os.PathLike[str]) -> Qwen2Params:
    """Validate ``config.json`` as a Qwen2ForCausalLM llama.cpp can run exactly."""
    path = Path(config_path)
    cfg = _read_json(path)
    archs = cfg.get("architectures")
    if archs != ["Qwen2ForCausalLM"]:
        raise fail(path, f"architecture {archs!r} is not supported (only Qwen2ForCausalLM)")
    # Transformers 5.x moved rope_theta under rope_parameters; 4.x keeps it top-level.
    rope = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise fail(path, f"rope type {rope_type!r} is not supported (only default RoPE)")
    theta = cfg.get("rope_theta", rope.get("rope_theta"))
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise fail(
            path, f"rope_theta (top-level or in rope_parameters) must be a positive number, got {theta!r}"
        )
    if cfg.get("use_sliding_window"):
        raise fail(path, "use_sliding_window is true; llama.cpp's qwen2 graph has no sliding window")
    hidden = _int(path, cfg, "hidden_size")
    n_head = _int(path, cfg, "num_attention_heads")
    n_head_kv = _int(path, cfg, "num_key_value_heads", n_head)
    if hidden % n_head or n_head % n_head_kv:
        raise fail(path, f"hidden_size {hidden} / heads {n_head} / kv heads {n_head_kv} do not divide")
    n_layer = _int(path, cfg, "num_hidden_layers")
    if n_layer < 2:
        raise fail(path, f"num_hidden_layers is {n_layer}; the SPRM reads layer n_layer-2, so at least 2")
    eps = cfg.get("rms_norm_eps", 1e-6)
    if not isinstance(eps, (int, float)) or eps <= 0:
        raise fail(path, f"rms_norm_eps must be a positive number, got {eps!r}")
    return Qwen2Params(
        n_layer=n_layer,
        hidden_size=hidden,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=_int(path, cfg, "head_dim", hidden // n_head),
        ffn_size=_int(path, cfg, "intermediate_size"),
        context_length=_int(path, cfg, "max_position_embeddings"),
        rope_theta=float(theta),
        rms_eps=float(eps),
        vocab_size=_int(path, cfg, "vocab_size"),
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


def _check_qwen2_tokenizer(path: Path, tok: Mapping) -> None:
    model = tok.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise fail(path, f"tokenizer model is {model.get('type')!r}, expected a byte-level BPE")
    if model.get("ignore_merges"):
        raise fail(path, "BPE ignore_merges is set; Qwen2's tokenizer does not ignore merges")
    pre = tok.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    regexes = [(s.get("pattern") or {}).get("Regex") for s in steps if s.get("type") == "Split"]
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    ok = (
        len(steps) == 2
        and regexes == [QWEN2_REGEX]
        and len(byte_level) == 1
        and not byte_level[0].get("add_prefix_space", False)
        and steps[-1] is byte_level[0]
    )
    if not ok:
        shown = regexes[0] if regexes else pre.get("type")
        raise fail(
            path, f"pre-tokenizer is not Qwen2's (found {shown!r:.120}); only Qwen2 tokenizers are supported"
        )


def _token_text(value: object) -> str | None:
    # tokenizer_config stores special tokens either as a string or as an AddedToken dict.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _is_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _first_id(value: object) -> int | None:
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _token_table(tok_path: Path, tok: dict, vocab_size: int) -> tuple[list[str], list[int], dict[str, int]]:
    """Every row's token text and type (padded past the tokenizer), and each text's id."""
    by_id: dict[int, tuple[str, int]] = {}
    for text, i in tok["model"]["vocab"].items():
        if not _is_id(i):
            raise fail(tok_path, f"vocab entry {text!r} has id {i!r}")
        by_id[i] = (text, gguf.TokenType.NORMAL)
    for added in tok.get("added_tokens") or []:
        if not (
            isinstance(added, dict) and _is_id(added.get("id")) and isinstance(added.get("content"), str)
        ):
            raise fail(tok_path, f"malformed added token {added!r:.80}")
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        by_id[added["id"]] = (added["content"], kind)
    top = max(by_id) + 1 if by_id else 0
    if top > vocab_size:
        raise fail(tok_path, f"token id {top - 1} does not fit vocab_size {vocab_size} of config.json")
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        # The embedding matrix is padded past the tokenizer; llama.cpp needs a token per row.
        text, kind = by_id.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED))
        tokens.append(text)
        types.append(int(kind))
    return tokens, types, {text: i for i, (text, _) in sorted(by_id.items())}


def _special_id(name: str, tcfg: dict, tcfg_path: Path, ids: dict[str, int], sources: tuple[dict, ...],
                vocab_size: int) -> int | None:
    """The id of the ``name`` (bos / eos / pad) token: tokenizer_config.json's text, else a config's id."""
    text = _token_text(tcfg.get(f"{name}_token"))
    if text is not None:
        if text in ids:
            return ids[text]
        if name != "pad":  # a missing pad token is harmless; a missing BOS/EOS is a broken checkpoint
            raise fail(tcfg_path, f"{name}_token {text!r} is not in tokenizer.json")
    for source in sources:
        found = _first_id(source.get(f"{name}_token_id"))
        if found is not None and 0 <= found < vocab_size:
            return found
    return None


def read_vocab(hf_dir: str | os.PathLike[str], vocab_size: int) -> Vocab:
    """Build the GGUF vocabulary from ``tokenizer.json`` and its companion files."""
    hf_dir = Path(hf_dir)
    tok_path = hf_dir / "tokenizer.json"
    tok = _read_json(tok_path)
    try:
        _check_qwen2_tokenizer(tok_path, tok)
    except (AttributeError, TypeError):
        raise fail(
            tok_path, "malformed tokenizer: model / pre_tokenizer are not the expected objects"
        ) from None
    try:
        forms = normalize.from_tokenizer_json(tok.get("normalizer"))
    except ValueError as err:
        raise fail(
            tok_path,
            f"normalizer {err} is not supported (only {', '.join(normalize.FORMS)} and Sequences of them)",
        ) from None
    tokens, types, ids = _token_table(tok_path, tok, vocab_size)
    merges = []
    for m in tok["model"].get("merges") or []:
        # tokenizers >= 0.20 writes merges as pairs, older versions as "a b" strings.
        merges.append(" ".join(m) if isinstance(m, list) else m)
    tcfg_path = hf_dir / "tokenizer_config.json"
    tcfg = _read_json(tcfg_path, optional=True)
    sources = (_read_json(hf_dir / "generation_config.json", optional=True), _read_json(hf_dir / "config.json"))
    bos_id, eos_id, pad_id = (_special_id(name, tcfg, tcfg_path, ids, sources, vocab_size)
                              for name in ("bos", "eos", "pad"))
    add_bos = tcfg.get("add_bos_token")
    if not isinstance(add_bos, bool):
        # Transformers 5.x leaves the flag out; the post-processor then says whether BOS is added.
        single = ((tok.get("post_processor") or {}).get("single")) or []
        first = (
            single[0].get("SpecialToken", {}).get("id") if single and isinstance(single[0], dict) else None
        )
        add_bos = first is not None and bos_id is not None and ids.get(first) == bos_id

    return Vocab(
        tokens=tokens,
        types=types,
        merges=merges,
        bos_id=bos_id,
        eos_id=eos_id,
        pad_id=pad_id,
        add_bos=add_bos,
        chat_template=_chat_template(hf_dir, tcfg),
        ids=ids,
        normalizer=forms,
    )


def _chat_template(hf_dir: Path, tcfg: Mapping) -> str | None:
    template = tcfg.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if isinstance(template, str):
        return template
    return _read_text(hf_dir / "chat_template.jinja", "chat template", optional=True)  # where transformers 5.x saves it


def qwen2_tensor_shapes(
    *, n_layer: int, n_embd: int, n_head: int, n_head_kv: int, n_ff: int, n_vocab: int,
    head_dim: int | None = None, tied_embeddings: bool = False,
) -> dict[str, tuple[int, ...]]:
    """GGUF name -> shape of every tensor of a Qwen2 model, in llama.cpp's order.

    Shapes are [rows, cols] as in the checkpoint (torch's [out, in]); ``head_dim`` defaults to
    ``n_embd // n_head``. A model with tied embeddings has no ``output.weight``.
    """
    head_dim = head_dim or n_embd // n_head
    q, kv = n_head * head_dim, n_head_kv * head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (n_vocab, n_embd),
        "output_norm.weight": (n_embd,),
    }
    if not tied_embeddings:
        shapes["output.weight"] = (n_vocab, n_embd)
    for i in range(n_layer):
        b = f"blk.{i}."
        shapes |= {
            b + "attn_norm.weight": (n_embd,),
            b + "attn_q.weight": (q, n_embd),
            b + "attn_q.bias": (q,),
            b + "attn_k.weight": (kv, n_embd),
            b + "attn_k.bias": (kv,),
            b + "attn_v.weight": (kv, n_embd),
            b + "attn_v.bias": (kv,),
            b + "attn_output.weight": (n_embd, q),
            b + "ffn_norm.weight": (n_embd,),
            b + "ffn_gate.weight": (n_ff, n_embd),
            b + "ffn_up.weight": (n_ff, n_embd),
            b + "ffn_down.weight": (n_embd, n_ff),
        }
    return shapes


def _expected_shapes(p: Qwen2Params) -> dict[str, tuple[int, ...]]:
    return qwen2_tensor_shapes(
        n_layer=p.n_layer, n_embd=p.hidden_size, n_head=p.n_head, n_head_kv=p.n_head_kv, n_ff=p.ffn_size,
        n_vocab=p.vocab_size, head_dim=p.head_dim, tied_embeddings=p.tied_embeddings,
    )


def plan_tensors(entries: Mapping[str, TensorEntry], p: Qwen2Params) -> list[tuple[str, TensorEntry]]:
    """Map every checkpoint tensor to its GGUF name, in llama.cpp order, checking names and shapes."""
    name_map = gguf.TensorNameMap(gguf.MODEL_ARCH.QWEN2, p.n_layer)
    expected = _expected_shapes(p)
    found: dict[str, TensorEntry] = {}
    for hf_name, entry in entries.items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue  # recomputed by llama.cpp from rope_theta
        if hf_name == "lm_head.weight" and p.tied_embeddings:
            continue  # llama.cpp reuses token_embd when output is absent
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name not in expected:
            raise fail(entry.path, f"unexpected tensor {hf_name!r} for a {p.n_layer}-layer Qwen2 model")
        if entry.shape != expected[gguf_name]:
            raise fail(
                entry.path,
                f"tensor {hf_name!r} has shape {list(entry.shape)}, config.json implies "
                f"{list(expected[gguf_name])}",
            )
        found[gguf_name] = entry
    missing = [n for n in expected if n not in found]
    if missing:
        raise fail(next(iter(entries.values())).path.parent, f"checkpoint lacks tensor for {missing[0]!r}")
    return [(n, found[n]) for n in expected]


def _out_dtype(ndim: int, quant: str) -> np.dtype:
    # llama.cpp keeps norms and biases (1-D) in f32 whatever the weight type.
    return np.dtype(np.float16 if quant != "f32" and ndim >= 2 else np.float32)


def add_metadata(
    w: gguf.GGUFWriter,
    name: str,
    params: Qwen2Params,
    vocab: Vocab,
    file_type: gguf.LlamaFileType,
    fingerprint: str | None,
) -> None:
    """The key-value part of a Qwen2 GGUF: what llama.cpp's qwen2 graph and its BPE tokenizer read."""
    w.add_name(name)
    w.add_context_length(params.context_length)
    w.add_embedding_length(params.hidden_size)
    w.add_block_count(params.n_layer)
    w.add_feed_forward_length(params.ffn_size)
    w.add_head_count(params.n_head)
    w.add_head_count_kv(params.n_head_kv)
    if params.head_dim != params.hidden_size // params.n_head:
        w.add_key_length(params.head_dim)
        w.add_value_length(params.head_dim)
    w.add_rope_freq_base(params.rope_theta)
    w.add_layer_norm_rms_eps(params.rms_eps)
    w.add_file_type(file_type)

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    w.add_token_merges(vocab.merges)
    for setter, value in (
        (w.add_bos_token_id, vocab.bos_id),
        (w.add_eos_token_id, vocab.eos_id),
        (w.add_pad_token_id, vocab.pad_id),
    ):
        if value is not None:
            setter(value)
    w.add_add_bos_token(vocab.add_bos)
    if vocab.chat_template:
        w.add_chat_template(vocab.chat_template)
    if vocab.normalizer:
        w.add_string(normalize.GGUF_KEY, normalize.to_gguf(vocab.normalizer))
    if fingerprint is not None:
        w.add_string(FINGERPRINT_KEY, fingerprint)


def write_gguf(
    path: str | os.PathLike[str],
    name: str,
    params: Qwen2Params,
    vocab: Vocab,
    plan: list[tuple[str, TensorEntry]],
    fingerprint: str,
    quant: str = "f16",
) -> None:
    """Write an f32 or f16 GGUF, streaming: only one converted tensor is in memory at a time."""
    if quant not in ("f32", "f16"):
        raise EdgeMSError(f"--quant {quant}: write_gguf writes f32 or f16 only")
    w = gguf.GGUFWriter(path, ARCH)
    file_type = gguf.LlamaFileType.ALL_F32 if quant == "f32" else gguf.LlamaFileType.MOSTLY_F16
    add_metadata(w, name, params, vocab, file_type, fingerprint)

    # Tensor infos first, then the data one tensor at a time: GGUFWriter never holds the model.
    dtypes = [_out_dtype(len(e.shape), quant) for _, e in plan]
    for (gguf_name, entry), dt in zip(plan, dtypes):
        w.add_tensor_info(gguf_name, entry.shape, dt, math.prod(entry.shape) * dt.itemsize)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for (_, entry), dt in zip(plan, dtypes):
            out = np.empty(entry.shape, dtype=dt)
            convert_into(entry, out)
            w.write_tensor_data(out)
            del out
    except OSError as err:
        raise fail(path, f"cannot write: {err.strerror or err}") from None
    finally:
        w.close()


_FTYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}


@contextlib.contextmanager
def _quiet_llama() -> Iterator[None]:
    """Silence llama.cpp's per-tensor log lines while we call it; failures come back as return codes.

    llama-cpp-python 0.3.36 maps ggml's WARN level to logging.ERROR, so ERROR would still let
    the quantizer's shape-fallback warnings through: only CRITICAL is quiet.
    """
    cpp_logger = logging.getLogger("llama-cpp-python")
    level = cpp_logger.level
    cpp_logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        cpp_logger.setLevel(level)


def quantize(src: str | os.PathLike[str], dst: str | os.PathLike[str], quant: str) -> None:
    """Quantize an f16 GGUF with llama.cpp's own quantizer (it picks per-tensor types, e.g. Q6_K output)."""
    import llama_cpp  # the native library: needed only for quantized output and tokenizing

    if quant not in _FTYPES:
        raise EdgeMSError(f"--quant {quant}: not a llama.cpp quantization ({', '.join(_FTYPES)})")
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = os.cpu_count() or 1
    params.ftype = getattr(llama_cpp, _FTYPES[quant])
    with _quiet_llama():
        rc = llama_cpp.llama_model_quantize(os.fsencode(src), os.fsencode(dst), ctypes.byref(params))
    if rc != 0:
        raise fail(dst, f"llama.cpp quantization to {quant} failed (code {rc})")


def tokenize(gguf_path: str | os.PathLike[str], text: str, parse_special: bool = False) -> tuple[int, ...]:
    """Token ids of ``text`` under the vocabulary of a GGUF file, as llama.cpp itself tokenizes (no BOS)."""
    import llama_cpp

    llama_cpp.llama_backend_init()
    mparams = llama_cpp.llama_model_default_params()
    mparams.vocab_only = True  # tokenizer only: no tensor is loaded
    with _quiet_llama():
        model = llama_cpp.llama_model_load_from_file(os.fsencode(gguf_path), mparams)
    if not model:
        raise fail(gguf_path, "llama.cpp cannot load the vocabulary of this GGUF")
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)
        data = text.encode("utf-8")
        n_max = len(data) + 2  # byte-level BPE never yields more tokens than bytes
        buf = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, n_max, False, parse_special)
        if n < 0:
            raise fail(gguf_path, f"llama.cpp could not tokenize {text!r}")
        return tuple(buf[:n])
    finally:
        llama_cpp.llama_model_free(model)
