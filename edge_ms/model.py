"""Loading a GGUF backbone through llama.cpp: settings, tokenizer, chat template, fingerprint."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import re
import secrets
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import llama_cpp
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edge_ms import normalize
from edge_ms.errors import EdgeMSError, fail
from edge_ms.interrupts import hold_interrupt
from edge_ms.quants import KV_BYTES_PER_VALUE, kv_bytes_per_cell

log = logging.getLogger(__name__)

# llama.cpp's ggml type for each KV-cache type edge_ms offers.
KV_TYPES = {name: getattr(llama_cpp, f"GGML_TYPE_{name.upper()}") for name in KV_BYTES_PER_VALUE}
# Tokens llama.cpp cuts out of text whole when it parses special tokens (llama_vocab's special cache).
_SPECIAL_ATTRS = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN


@dataclass(frozen=True)
class DeviceSettings:
    """What users tune per device. ``None`` means: decide from the machine."""

    n_threads: int | None = None
    n_gpu_layers: int = 0
    kv_type: str = "f16"
    # llama.cpp's extra buffer types (weight repacking, AMX). None: on unless the
    # llama.cpp build has AMX compiled in, which crashes (SIGILL) with quantized
    # weights on some virtual machines; set True where AMX really works.
    extra_bufts: bool | None = None

    def __post_init__(self) -> None:
        if self.kv_type not in KV_TYPES:
            raise EdgeMSError(f"--kv-type {self.kv_type}: unknown KV-cache type (choose from {', '.join(KV_TYPES)})")

    def threads(self) -> int:
        """Explicit setting, else $EDGE_MS_THREADS, else every core."""
        if self.n_threads:
            return self.n_threads
        env = os.environ.get("EDGE_MS_THREADS", "").strip()
        return int(env) if env.isdigit() and int(env) > 0 else max(1, os.cpu_count() or 1)


def _quiet_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    if level >= 4 or os.environ.get("EDGE_MS_LLAMA_LOG"):  # 4 = GGML_LOG_LEVEL_ERROR
        log.debug(text.decode("utf-8", "replace").rstrip())


_log_cb = llama_cpp.llama_log_callback(_quiet_log)
_backend_ready = False


def init_backend() -> None:
    """Initialise llama.cpp once and route its chatter to logging."""
    global _backend_ready
    if not _backend_ready:
        with hold_interrupt():
            llama_cpp.llama_log_set(_log_cb, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
        _backend_ready = True


def _load(path: Path, params) -> int | None:
    """``llama_model_load_from_file``, cut short by Ctrl-C (its progress callback returns false)."""
    ptr = None
    try:
        with hold_interrupt() as interrupted:
            progress = llama_cpp.llama_progress_callback(lambda fraction, data: not interrupted())
            params.progress_callback = progress
            ptr = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    except KeyboardInterrupt:
        if ptr:  # loaded before the interrupt was seen
            llama_cpp.llama_model_free(ptr)
        raise
    return ptr


def build_has_amx() -> bool:
    return b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info()


def default_extra_bufts() -> bool:
    env = os.environ.get("EDGE_MS_EXTRA_BUFTS")
    if env is not None:
        return env.strip().lower() not in ("0", "off", "false", "no")
    return not build_has_amx()


class Model:
    """A loaded llama.cpp model: weights, vocabulary and metadata. Free with :meth:`close`."""

    def __init__(self, path: str | Path, settings: DeviceSettings | None = None) -> None:
        self.path = Path(path)
        self.settings = settings or DeviceSettings()
        if not self.path.is_file():
            raise fail(self.path, "model file not found")
        init_backend()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = self.settings.n_gpu_layers
        extra = self.settings.extra_bufts
        params.use_extra_bufts = default_extra_bufts() if extra is None else extra
        ptr = _load(self.path, params)
        if not ptr:
            raise fail(self.path, "llama.cpp could not load this GGUF (corrupt, truncated or unsupported)")
        self.ptr = ptr
        self.vocab = llama_cpp.llama_model_get_vocab(ptr)
        self.n_layer = llama_cpp.llama_model_n_layer(ptr)
        self.n_embd = llama_cpp.llama_model_n_embd(ptr)
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(ptr)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.eos = llama_cpp.llama_vocab_eos(self.vocab)
        self.bos = llama_cpp.llama_vocab_bos(self.vocab)
        stored = self.meta(normalize.GGUF_KEY)
        try:
            self.normalizer = normalize.from_gguf(stored or "")
        except ValueError as err:
            self.close()
            raise fail(self.path, f"{normalize.GGUF_KEY} names an unknown Unicode form {str(err)!r}") from None

    def close(self) -> None:
        if getattr(self, "ptr", None):
            llama_cpp.llama_model_free(self.ptr)
            self.ptr = None

    def __del__(self) -> None:
        self.close()

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(1 << 16)
        n = llama_cpp.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):  # chat templates can be long
            buf = ctypes.create_string_buffer(n + 1)
            llama_cpp.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace")

    @cached_property
    def size_bytes(self) -> int:
        return llama_cpp.llama_model_size(self.ptr)

    @cached_property
    def fingerprint(self) -> str:
        """The backbone's identity, the same for every quantization of it.

        Converted MetaStone files carry the hash of their source weights; any
        other GGUF is identified by its architecture, shape and vocabulary.
        """
        stored = self.meta("edge_ms.backbone_fingerprint")
        if stored:
            return stored
        h = hashlib.sha256()
        for key in ("general.architecture", "general.name"):
            h.update((self.meta(key) or "").encode() + b"\0")
        h.update(f"{self.n_layer}:{self.n_embd}:{self.n_vocab}".encode())
        for token in range(self.n_vocab):
            h.update(self.token_text(token).encode("utf-8", "replace") + b"\0")
        return "shape-" + h.hexdigest()[:16]

    def token_text(self, token: int) -> str:
        return (llama_cpp.llama_vocab_get_text(self.vocab, token) or b"").decode("utf-8", "replace")

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    @functools.cached_property
    def eog_ids(self) -> tuple[int, ...]:
        """Every end-of-generation token of the vocabulary."""
        return tuple(t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self.vocab, t))

    def tokenize(self, text: str, add_special: bool = False, parse_special: bool = True) -> list[int]:
        # The checkpoint's own normalizer first: llama.cpp's BPE does not apply it.
        data = normalize.apply(text, self.normalizer).encode("utf-8")
        cap = len(data) + 16
        buf = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            buf = (llama_cpp.llama_token * cap)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        return list(buf[:n])

    @cached_property
    def special_tokens(self) -> dict[str, int]:
        """Text -> id of every token that special parsing makes of its text (control, added, unknown)."""
        found: dict[str, int] = {}
        for token in range(self.n_vocab):
            if llama_cpp.llama_vocab_get_attr(self.vocab, token) & _SPECIAL_ATTRS:
                found.setdefault(self.token_text(token), token)
        found.pop("", None)
        return found

    @cached_property
    def _special_re(self) -> re.Pattern | None:
        # Longest first, so that of two texts starting at the same place the whole one is found.
        texts = sorted((t for t in self.special_tokens if len(t) > 1), key=len, reverse=True)
        return re.compile("|".join(map(re.escape, texts))) if texts else None

    def text_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` as plain text, even where it spells a special token."""
        if self._special_re is None:
            return self.tokenize(text, parse_special=False)
        ids, start = [], 0
        for m in self._special_re.finditer(text):
            # llama.cpp matches added (user-defined) tokens even without special parsing: no piece
            # tokenized here may hold the whole text of one.
            ids += self.tokenize(text[start : m.start()], parse_special=False)
            ids += self.tokenize(m.group()[0], parse_special=False) + self.text_ids(m.group()[1:])
            start = m.end()
        return ids + self.tokenize(text[start:], parse_special=False)

    def chat_ids(self, messages: list[dict[str, str]], parse_special: bool = True) -> list[int]:
        """Token ids of ``messages`` through the chat template.

        ``parse_special=True`` is transformers' behaviour: special-token text anywhere, message contents
        included, becomes that token. With ``False`` the contents stay text, for messages from people
        who must not be able to write control tokens (and so other roles' turns), such as the server's.
        """
        if parse_special or self._special_re is None:
            return self.tokenize(self.apply_chat_template(messages))
        # Special-token text in a content becomes a placeholder the template passes through; the
        # rendered prompt is cut at the placeholders, so only the template's own text is parsed.
        # Ordinary contents render exactly as with parse_special=True.
        mark = f"\ue000{secrets.randbelow(10**12)}:"
        hidden: list[str] = []

        def hide(m: re.Match) -> str:
            hidden.append(m.group())
            return f"{mark}{len(hidden) - 1}\ue001"

        masked = [
            {**msg, "content": self._special_re.sub(hide, msg["content"])} if isinstance(msg.get("content"), str) else msg
            for msg in messages
        ]
        parts = re.split(f"{re.escape(mark)}(\\d+)\ue001", self.apply_chat_template(masked))
        ids: list[int] = []
        for i, part in enumerate(parts):
            ids += self.text_ids(hidden[int(part)]) if i % 2 else self.tokenize(part)
        return ids

    def piece(self, token: int, special: bool = False) -> bytes:
        """The bytes of one token (a multi-byte character may span several tokens)."""
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def detokenize(self, tokens: list[int], special: bool = False) -> str:
        return b"".join(self.piece(t, special) for t in tokens).decode("utf-8", "replace")

    @cached_property
    def chat_template(self) -> str | None:
        return self.meta("tokenizer.chat_template")

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        """Render the GGUF's own chat template (jinja2, sandboxed) with a generation prompt."""
        template = self.chat_template
        if not template:
            raise fail(self.path, "the model has no chat template; pass the prompt raw (--raw)")

        def raise_exception(message: str) -> None:
            raise EdgeMSError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(template).render(
            messages=messages,
            add_generation_prompt=True,
            bos_token=self.token_text(self.bos) if self.bos >= 0 else "",
            eos_token=self.token_text(self.eos) if self.eos >= 0 else "",
        )

    def kv_bytes_per_token(self, kv_type: str) -> int:
        """KV-cache bytes per token over all layers (K and V)."""
        n_head = llama_cpp.llama_model_n_head(self.ptr)
        n_head_kv = llama_cpp.llama_model_n_head_kv(self.ptr)
        return int(kv_bytes_per_cell(self.n_layer, n_head_kv, self.n_embd // max(n_head, 1), kv_type))
