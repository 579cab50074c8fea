"""A plain-Python reader of llama.cpp's intermediate tensors (tests only).

It is the independent reference the native tap is compared with: a ``cb_eval`` callback over
ctypes that asks for the graph tensor ``l_out-<layer>`` (output of decoder layer ``layer``) and
copies its rows out with ``ggml_backend_tensor_get`` when the scheduler has computed it.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from pathlib import Path

import llama_cpp
import numpy as np

_LIB_DIR = Path(llama_cpp.__file__).parent / "lib"
_ggml = ctypes.CDLL(str(_LIB_DIR / "libggml-base.so"))
_ggml.ggml_get_name.argtypes = [ctypes.c_void_p]
_ggml.ggml_get_name.restype = ctypes.c_char_p
_ggml.ggml_nelements.argtypes = [ctypes.c_void_p]
_ggml.ggml_nelements.restype = ctypes.c_int64
_ggml.ggml_nbytes.argtypes = [ctypes.c_void_p]
_ggml.ggml_nbytes.restype = ctypes.c_size_t
_ggml.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
_ggml.ggml_backend_tensor_get.restype = None


@contextlib.contextmanager
def quiet_llama():
    """llama-cpp-python forwards every llama.cpp log line to stderr; silence them (its level map is off by one)."""
    logger = logging.getLogger("llama-cpp-python")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def decode_and_tap(
    model_path: str | os.PathLike[str], ids: list[int], layer: int
) -> tuple[np.ndarray, np.ndarray]:
    """Decode ``ids`` in one batch; return layer ``layer``'s output rows [T, c] and logits [T, V]."""
    llama_cpp.llama_backend_init()
    target = f"l_out-{layer}".encode()
    chunks: list[np.ndarray] = []

    def on_eval(tensor: int, ask: bool, _user: int) -> bool:
        if ask:
            return _ggml.ggml_get_name(tensor) == target
        if _ggml.ggml_get_name(tensor) == target:
            n = _ggml.ggml_nelements(tensor)
            if _ggml.ggml_nbytes(tensor) != 4 * n:
                raise RuntimeError(f"{target.decode()} is not f32")
            buf = np.empty(n, dtype=np.float32)
            _ggml.ggml_backend_tensor_get(tensor, buf.ctypes.data, 0, buf.nbytes)
            chunks.append(buf)
        return True  # keep computing

    callback = llama_cpp.ggml_backend_sched_eval_callback(on_eval)  # must outlive the context

    with quiet_llama():
        return _decode(model_path, ids, callback, chunks, target)


def _decode(model_path, ids, callback, chunks, target) -> tuple[np.ndarray, np.ndarray]:
    mparams = llama_cpp.llama_model_default_params()
    model = llama_cpp.llama_model_load_from_file(os.fsencode(model_path), mparams)
    if not model:
        raise RuntimeError(f"llama.cpp cannot load {model_path}")
    ctx = None
    batch = None
    try:
        n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
        n_embd = llama_cpp.llama_model_n_embd(model)
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = max(64, len(ids))
        cparams.n_batch = cparams.n_ctx
        cparams.n_ubatch = cparams.n_ctx
        cparams.n_threads = cparams.n_threads_batch = min(4, os.cpu_count() or 1)
        cparams.cb_eval = callback
        ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not ctx:
            raise RuntimeError("llama.cpp cannot create a context")
        batch = llama_cpp.llama_batch_init(len(ids), 0, 1)
        for i, tok in enumerate(ids):
            batch.token[i] = tok
            batch.pos[i] = i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1
        batch.n_tokens = len(ids)
        rc = llama_cpp.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        logits_ptr = llama_cpp.llama_get_logits(ctx)
        logits = (
            np.ctypeslib.as_array(logits_ptr, shape=(len(ids) * n_vocab,)).reshape(len(ids), n_vocab).copy()
        )
    finally:
        if batch is not None:
            llama_cpp.llama_batch_free(batch)
        if ctx:
            llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)
    hidden = np.concatenate(chunks).reshape(-1, n_embd)
    if hidden.shape[0] != len(ids):
        raise RuntimeError(f"tapped {hidden.shape[0]} rows of {target.decode()}, expected {len(ids)}")
    return hidden, logits
