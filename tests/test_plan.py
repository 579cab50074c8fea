"""edge_ms.plan: the memory arithmetic, the shapes it reads, its agreement with the engine's refusal, and `edge-ms plan`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from gguf import GGUFReader

from edge_ms.errors import EdgeMSError
from edge_ms.plan import (
    CTX_PAD,
    ENGINE_BATCH,
    ModelShape,
    context_cells,
    max_new_tokens_that_fit,
    memory_breakdown,
    plan,
    preset_shape,
    qwen2_tensors,
    shape_estimate,
    shape_from_gguf,
    shape_from_model,
    tensor_bytes,
)

GIB = 2**30
# MetaStone-S1-1.5B's shape (docs/method.md, section 2) with a made-up file size.
S15 = ModelShape("s1-1.5b", 1_000_000_000, 28, 1536, 12, 2, 8960, 151936, 131072)


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edge_ms.cli", *args], capture_output=True, text=True, timeout=300
    )


def gguf_of(model_dir):
    return next(model_dir.glob("*.gguf"))


# -- arithmetic ------------------------------------------------------------------


def test_kv_cache_is_padded_cells_times_layers_heads_and_type():
    n_ctx = context_cells(200, 8, 1000)
    assert n_ctx == 200 + 8 * 1000 + 1
    cells = -(-n_ctx // CTX_PAD) * CTX_PAD
    f16 = memory_breakdown(S15.file_bytes, 28, 1536, 12, 2, 151936, n_ctx, 8, "f16", 200, n_ff=8960)
    q8 = memory_breakdown(S15.file_bytes, 28, 1536, 12, 2, 151936, n_ctx, 8, "q8_0", 200, n_ff=8960)
    # 28 layers x (K and V) x 2 KV heads x 128 dims: 28,672 bytes a cell in f16, 34/64 of that in q8_0.
    assert f16.kv_cache == cells * 28 * 2 * 2 * 128 * 2 == cells * 28672
    assert q8.kv_cache == cells * 28672 * 34 // 64
    assert f16.weights == S15.file_bytes
    assert f16.compute == q8.compute and f16.outputs == q8.outputs


def test_total_is_the_sum_of_the_parts():
    est = memory_breakdown(123_456_789, 4, 256, 4, 2, 512, 3000, 3, "f16", 64, n_ff=256)
    parts = [est.weights, est.kv_cache, est.compute, est.outputs, est.tap, est.head, est.runtime]
    assert all(p > 0 for p in parts)
    assert est.total == sum(parts)


def test_logits_and_samplers_grow_with_n_and_the_vocabulary():
    # A short prompt (16 tokens), so the graph of one token per trajectory is the larger one.
    one = memory_breakdown(0, 28, 1536, 12, 2, 151936, 40000, 1, "f16", 16, n_ff=8960)
    many = memory_breakdown(0, 28, 1536, 12, 2, 151936, 40000, 32, "f16", 16, n_ff=8960)
    # 32 rows of logits, each 4 bytes a token, plus 12 bytes a token of sampler candidates per trajectory.
    assert many.outputs - one.outputs == 31 * 151936 * (4 + 12)
    assert many.kv_cache == one.kv_cache and many.compute > one.compute


def test_longer_prompt_chunks_need_more_compute_up_to_the_engine_batch():
    def compute(n_prompt):
        return shape_estimate(S15, 5000, 2, "f16", n_prompt).compute

    assert compute(16) < compute(256) < compute(ENGINE_BATCH)
    assert compute(ENGINE_BATCH) == compute(4 * ENGINE_BATCH)  # the prompt is decoded 512 tokens at a time


def test_unknown_kv_type_is_refused():
    with pytest.raises(EdgeMSError, match="unknown KV-cache type"):
        memory_breakdown(0, 4, 256, 4, 2, 512, 1000, 1, "q4_0")


# -- shapes ----------------------------------------------------------------------


def test_shape_from_gguf_reads_the_fixture(converted):
    path = gguf_of(converted("tiny-qwen2", "f32"))
    shape = shape_from_gguf(path)
    # tests/fixtures/tiny-qwen2/config.json
    assert (shape.n_layer, shape.n_embd, shape.n_head, shape.n_head_kv, shape.n_ff, shape.n_vocab) == (
        4,
        256,
        4,
        2,
        256,
        512,
    )
    assert shape.n_ctx_train == 4096
    assert shape.file_bytes == path.stat().st_size


def test_shape_from_model_agrees_with_the_header(converted):
    from edge_ms.model import Model

    path = gguf_of(converted("tiny-qwen2", "f32"))
    model = Model(path)
    try:
        assert shape_from_model(model) == shape_from_gguf(path)
    finally:
        model.close()


def test_a_file_that_is_not_gguf_is_one_error_naming_it(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 60)
    with pytest.raises(EdgeMSError, match=r"broken\.gguf: llama\.cpp could not read"):
        shape_from_gguf(bad)
    with pytest.raises(EdgeMSError, match="not found"):
        shape_from_gguf(tmp_path / "missing.gguf")


def test_q4_k_m_tensor_types_match_llama_cpp_quantizer(converted):
    """The size rule used for the published shapes, checked against a real llama.cpp Q4_K_M file."""
    path = gguf_of(converted("tiny-qwen2", "q4_k_m"))
    actual = {
        t.name: (t.tensor_type.name, tuple(int(d) for d in reversed(t.shape)), int(t.n_bytes))
        for t in GGUFReader(path).tensors
    }
    predicted = qwen2_tensors(shape_from_gguf(path), "q4_k_m")
    assert {name: (kind, dims) for name, dims, kind in predicted} == {k: v[:2] for k, v in actual.items()}
    assert "Q6_K" in {kind for _, _, kind in predicted}  # the rule's upgrades are exercised
    assert sum(tensor_bytes(dims, kind) for _, dims, kind in predicted) == sum(v[2] for v in actual.values())


@pytest.mark.parametrize(
    "size,quant,published",
    [("1.5b", "q4_k_m", 1.12e9), ("7b", "q4_k_m", 4.68e9), ("7b", "q8_0", 8.10e9), ("1.5b", "f16", 3.56e9)],
)
def test_published_sizes(size, quant, published):
    # The sizes of the public DeepSeek-R1-Distill-Qwen GGUF files these backbones share their shapes with.
    assert preset_shape(size, quant).file_bytes == pytest.approx(published, rel=0.01)


def test_unknown_preset_is_refused():
    with pytest.raises(EdgeMSError, match="unknown size"):
        preset_shape("3b")


# -- planning --------------------------------------------------------------------


def test_max_new_tokens_that_fit_is_the_boundary():
    budget = 3 * GIB
    for n in (2, 8, 32):
        for kv in ("f16", "q8_0"):
            k = max_new_tokens_that_fit(S15, n, kv, 256, budget)
            assert k > 0
            assert shape_estimate(S15, context_cells(256, n, k), n, kv, 256).total <= budget
            assert shape_estimate(S15, context_cells(256, n, k + 1), n, kv, 256).total > budget


def test_plan_rows_cover_every_mode_and_kv_type():
    p = plan(S15, 4 * GIB, n=32, label="high", max_new_tokens=4096)
    assert [(r.label, r.n, r.kv_type) for r in p.rows] == [
        ("low", 2, "f16"),
        ("low", 2, "q8_0"),
        ("medium", 8, "f16"),
        ("medium", 8, "q8_0"),
        ("high", 32, "f16"),
        ("high", 32, "q8_0"),
    ]
    assert p.requested.n == 32 and p.budget_bytes == 4 * GIB and p.budget_source == "--memory"
    by = {(r.n, r.kv_type): r for r in p.rows}
    assert by[(2, "f16")].fits and not by[(32, "f16")].fits
    # q8_0 holds nearly twice the tokens in the same memory.
    assert by[(32, "q8_0")].max_fit_tokens > 1.7 * by[(32, "f16")].max_fit_tokens
    assert p.fits == by[(32, "f16")].fits


def test_plan_adds_a_row_for_a_custom_n_and_marks_the_context_limit():
    p = plan(S15, 64 * GIB, n=5, max_new_tokens=131000, prompt_tokens=256)
    assert [r.n for r in p.rows] == [2, 2, 5, 5, 8, 8, 32, 32]
    assert p.requested.label == "n=5" and p.requested.over_context and not p.fits


def test_default_budget_is_a_fraction_of_available_memory():
    p = plan(S15, None, available_bytes=10 * GIB)
    assert p.budget_bytes == 8 * GIB and "available" in p.budget_source


def test_the_engine_refuses_exactly_what_the_plan_says_does_not_fit(converted):
    """Reasoner.load(memory_bytes=...) and the plan share one estimate: the boundary is the same."""
    from edge_ms.reasoner import Reasoner

    model_dir = converted("tiny-qwen2", "f32")
    shape = shape_from_gguf(gguf_of(model_dir))
    n, n_prompt = 8, 20
    budget = shape_estimate(shape, context_cells(n_prompt, n, 600), n, "f16", n_prompt).total
    k = max_new_tokens_that_fit(shape, n, "f16", n_prompt, budget)
    assert k >= 600
    r = Reasoner.load(model_dir, memory_bytes=budget)
    try:
        assert r.engine.plan_context(n_prompt, n, k).n_ctx == context_cells(n_prompt, n, k)
        with pytest.raises(EdgeMSError, match=r"KV cache.*over the budget"):
            r.engine.plan_context(n_prompt, n, k + 1)
    finally:
        r.close()


def test_weights_over_the_budget_are_refused_at_load(converted):
    from edge_ms.reasoner import Reasoner

    with pytest.raises(EdgeMSError, match=r"tiny-qwen2-f32\.gguf: the weights alone \(\d\.\d\d MiB\) exceed --memory 977 KiB$"):
        Reasoner.load(converted("tiny-qwen2", "f32"), memory_bytes=1_000_000)


# -- the command -----------------------------------------------------------------


def test_cli_table(converted):
    proc = run(
        "plan",
        "--model",
        str(converted("tiny-qwen2", "f32")),
        "--memory",
        "1GiB",
        "--mode",
        "low",
        "--max-new-tokens",
        "512",
        "--threads",
        "3",
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "tiny-qwen2-f32.gguf" in out and "budget 1.00 GiB (--memory)" in out and "3 threads" in out
    assert "most new tokens that fit" in out and "memory at 512 new tokens" in out
    for label in ("low", "medium", "high"):
        assert label in out
    assert (
        "q8_0" in out
        and "requested: low (N=2), 512 new tokens, KV f16" in out
        and "fits (" in out
        and "MiB" in out
    )


def test_cli_json_agrees_with_the_library(converted):
    model_dir = converted("tiny-qwen2", "f32")
    proc = run(
        "plan",
        "--model",
        str(model_dir),
        "--memory",
        "200MiB",
        "--n",
        "4",
        "--max-new-tokens",
        "300",
        "--kv-type",
        "q8_0",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    p = plan(shape_from_gguf(gguf_of(model_dir)), 200 * 2**20, n=4, max_new_tokens=300, kv_type="q8_0")
    assert out["requested"]["estimate"]["total"] == p.requested.estimate.total
    assert out["requested"]["max_fit_tokens"] == p.requested.max_fit_tokens
    assert out["shape"]["n_vocab"] == 512 and len(out["rows"]) == 8

    proc = run("plan", "--model", str(model_dir), "--memory", "200MiB", "--n", "4")
    assert proc.returncode == 0, proc.stderr
    assert "budget 200 MiB (--memory)" in proc.stdout  # was "0.20 GiB"


def test_cli_says_what_does_not_fit():
    proc = run("plan", "--shape", "7b", "--memory", "4GiB")
    assert proc.returncode == 0, proc.stderr
    assert "MetaStone-S1-7B q4_k_m" in proc.stdout and "does not fit" in proc.stdout
    assert "fits" not in proc.stdout.replace("does not fit", "").replace("most new tokens that fit", "")


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--kv-type", "q3"], "unknown KV-cache type"),
        (["--memory", "lots"], "not a size"),
        (["--shape", "3b"], "unknown size"),
        (["--mode", "extreme"], "unknown mode"),
        (["--n", "300"], "llama.cpp runs at most 256 sequences in parallel"),
    ],
)
def test_cli_bad_options_are_one_line(args, needle):
    proc = run("plan", "--shape", "1.5b", *args) if "--shape" not in args else run("plan", *args)
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr


def test_auto_layout_gives_long_generations_a_stream_each_and_shared_prompts_one_pool():
    from edge_ms.plan import auto_layout

    assert auto_layout(64, 32, 1024) == "streams"  # high effort, long reasoning
    assert auto_layout(30, 8, 2048) == "streams"  # a chat question
    assert auto_layout(850, 8, 96) == "unified"  # a few-shot prefix dominates
    assert auto_layout(850, 8, 1024) == "unified"  # ... unless the answers may be twice as long
    assert auto_layout(64, 1, 4096) == "unified"  # one sequence: nothing to separate
    assert auto_layout(64, 32, 1024, forks=True) == "unified"  # forks are free in one pool only
    assert auto_layout(5, 32, 10) == "unified"  # padding every stream to 256 cells would waste 25x


def test_streams_count_each_prompt_copy_and_fall_back_to_one_pool_when_over_budget():
    from edge_ms.plan import layout_estimate

    streams = context_cells(64, 32, 1024, "streams")
    assert streams == 32 * 1280 and context_cells(64, 32, 1024) == 64 + 32 * 1024 + 1
    layout, cells, est = layout_estimate(S15, 64, 32, 1024, "f16", None)
    assert (layout, cells) == ("streams", streams)
    unified = layout_estimate(S15, 64, 32, 1024, "f16", None, layout="unified")[2]
    assert est.kv_cache > unified.kv_cache
    # A budget between the two: auto takes the pool; an explicit streams request is estimated as asked.
    budget = (est.total + unified.total) // 2
    assert layout_estimate(S15, 64, 32, 1024, "f16", budget)[:2] == ("unified", context_cells(64, 32, 1024))
    assert layout_estimate(S15, 64, 32, 1024, "f16", budget, layout="streams")[0] == "streams"
    with pytest.raises(EdgeMSError, match="--kv-layout sideways: unknown"):
        layout_estimate(S15, 64, 32, 1024, "f16", None, layout="sideways")


def test_plan_rows_name_the_layout_auto_would_use():
    p = plan(S15, 64 * GIB, n=32, label="high", max_new_tokens=4096, prompt_tokens=256)
    assert p.requested.kv_layout == "streams"
    assert p.requested.n_ctx == context_cells(256, 32, 4096, "streams")
    short = plan(S15, 64 * GIB, n=8, max_new_tokens=128, prompt_tokens=256)
    assert {r.kv_layout for r in short.rows} == {"unified"}
