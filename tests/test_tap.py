"""The native tap reads the same rows as a plain Python cb_eval, batched or not."""

from __future__ import annotations

import llama_cpp
import numpy as np
import pytest
from pytap import decode_and_tap

from edge_ms.model import Model
from edge_ms.tap import Tap


def _ctx(model: Model, tap: Tap, n_ctx: int, n_batch: int, n_ubatch: int, n_seq: int):
    p = llama_cpp.llama_context_default_params()
    p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max = n_ctx, n_batch, n_ubatch, n_seq
    p.kv_unified = True
    p.n_threads = p.n_threads_batch = 2
    p.cb_eval = tap.cb_eval
    p.cb_eval_user_data = tap.user_data
    ctx = llama_cpp.llama_init_from_model(model.ptr, p)
    assert ctx
    return ctx


def _decode(ctx, items):
    batch = llama_cpp.llama_batch_init(len(items), 0, 1)
    try:
        for i, (tok, pos, seq) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, pos, 1, 1
            batch.seq_id[i][0] = seq
        batch.n_tokens = len(items)
        assert llama_cpp.llama_decode(ctx, batch) == 0
    finally:
        llama_cpp.llama_batch_free(batch)


def _close(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def tiny(converted):
    path = converted("tiny-qwen2", "f32") / "tiny-qwen2-f32.gguf"
    model = Model(path)
    yield model
    model.close()


def test_rows_of_a_prompt_longer_than_one_micro_batch(tiny):
    ids = [(7 * i + 3) % 400 for i in range(53)]
    layer = tiny.n_layer - 2
    tap = Tap(layer, tiny.n_embd, capacity_rows=64)
    ctx = _ctx(tiny, tap, n_ctx=128, n_batch=64, n_ubatch=16, n_seq=1)
    try:
        tap.reset()
        _decode(ctx, [(t, i, 0) for i, t in enumerate(ids)])
        rows = tap.rows().copy()
        assert tap.n_calls == 4  # 53 tokens in micro-batches of 16
    finally:
        llama_cpp.llama_free(ctx)
    expected, _ = decode_and_tap(tiny.path, ids, layer)
    assert rows.shape == expected.shape == (53, tiny.n_embd)
    assert _close(rows, expected) < 1e-4


def test_rows_of_n_sequences_decoded_together(tiny):
    prompt = [(11 * i + 5) % 400 for i in range(20)]
    nexts = [17, 250, 3, 99]
    layer = tiny.n_layer - 2
    tap = Tap(layer, tiny.n_embd, capacity_rows=32)
    ctx = _ctx(tiny, tap, n_ctx=128, n_batch=32, n_ubatch=32, n_seq=len(nexts))
    try:
        _decode(ctx, [(t, i, 0) for i, t in enumerate(prompt)])
        mem = llama_cpp.llama_get_memory(ctx)
        for seq in range(1, len(nexts)):
            llama_cpp.llama_memory_seq_cp(mem, 0, seq, -1, -1)
        tap.reset()
        _decode(ctx, [(t, len(prompt), seq) for seq, t in enumerate(nexts)])
        rows = tap.rows().copy()
    finally:
        llama_cpp.llama_free(ctx)
    assert rows.shape == (len(nexts), tiny.n_embd)
    for seq, tok in enumerate(nexts):
        alone, _ = decode_and_tap(tiny.path, prompt + [tok], layer)
        assert _close(rows[seq], alone[-1]) < 1e-4, seq
    # The rows really differ by sequence (the tap is not returning one row four times).
    assert _close(rows[0], rows[1]) > 1e-2


def test_disabled_tap_reads_nothing(tiny):
    tap = Tap(tiny.n_layer - 2, tiny.n_embd, capacity_rows=8)
    ctx = _ctx(tiny, tap, n_ctx=64, n_batch=8, n_ubatch=8, n_seq=1)
    try:
        tap.enabled = False
        tap.reset()
        _decode(ctx, [(5, 0, 0), (6, 1, 0)])
        assert tap.rows().shape == (0, tiny.n_embd)
        assert tap.n_calls == 0
    finally:
        llama_cpp.llama_free(ctx)


def test_overflow_is_reported_not_written_past_the_buffer(tiny):
    tap = Tap(tiny.n_layer - 2, tiny.n_embd, capacity_rows=2)
    ctx = _ctx(tiny, tap, n_ctx=64, n_batch=8, n_ubatch=8, n_seq=1)
    try:
        tap.reset()
        _decode(ctx, [(5, 0, 0), (6, 1, 0), (7, 2, 0)])
        with pytest.raises(Exception, match="more rows than the tap buffer holds"):
            tap.rows()
    finally:
        llama_cpp.llama_free(ctx)


def test_several_layers_in_one_pass_equal_each_layer_alone(tiny):
    ids = [(5 * i + 2) % 400 for i in range(37)]
    layers = (tiny.n_layer - 2, 0, 1)
    tap = Tap(layers[0], tiny.n_embd, capacity_rows=64, extra_layers=layers[1:])
    ctx = _ctx(tiny, tap, n_ctx=128, n_batch=64, n_ubatch=16, n_seq=1)  # three micro-batches per layer
    try:
        tap.reset()
        _decode(ctx, [(t, i, 0) for i, t in enumerate(ids)])
        rows = tap.rows().copy()
        assert tap.n_calls == 3
    finally:
        llama_cpp.llama_free(ctx)
    c = tiny.n_embd
    assert rows.shape == (37, len(layers) * c)
    for k, layer in enumerate(layers):
        expected, _ = decode_and_tap(tiny.path, ids, layer)
        assert _close(rows[:, k * c : (k + 1) * c], expected) < 1e-4, layer


def test_bad_layer_sets_are_refused(tiny):
    with pytest.raises(ValueError, match="each once"):
        Tap(1, tiny.n_embd, capacity_rows=4, extra_layers=(1,))
    with pytest.raises(ValueError, match="at most 8"):
        Tap(0, tiny.n_embd, capacity_rows=4, extra_layers=tuple(range(1, 9)))
