"""Generation + on-the-fly scoring agree with the published way: a second full forward pass in PyTorch."""

from __future__ import annotations

from pathlib import Path

import pytest
import reference

from edge_ms.reasoner import Reasoner

FIXTURES = Path(__file__).parent / "fixtures"

SPEC_KEYS = ("step_delimiter_ids", "think_start_id", "think_end_id")


@pytest.fixture(scope="module")
def torch_side():
    return reference.load_model(FIXTURES / "tiny-qwen2")


LAYOUTS = ("unified", "streams")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("quant,tol", [("f32", 2e-3), ("f16", 2e-2)])
def test_runtime_scores_equal_second_pass_reference(converted, torch_side, quant, tol, layout):
    model, _, head = torch_side
    r = Reasoner.load(converted("tiny-qwen2", quant))
    try:
        res = r.solve("Compute 12 * 7 step by step.", n=4, seed=11, max_new_tokens=80, kv_layout=layout)
    finally:
        r.close()
    assert res.stats.kv_layout == layout
    spec = {k: getattr(r.head.spec, k) for k in SPEC_KEYS}
    ref_scores = []
    n_steps = 0
    for cand in res.candidates:
        ref = reference.score_sequence(model, head, res.prompt_token_ids + cand.token_ids, spec)
        assert cand.step_positions == ref["step_positions"]
        assert cand.step_scores == pytest.approx(ref["step_scores"], abs=tol)
        assert cand.score == pytest.approx(ref["score"], abs=tol)
        ref_scores.append(ref["score"])
        n_steps += len(ref["step_positions"])
    assert n_steps >= 4, "the fixture should produce trajectories with steps"
    assert res.selected == max(range(len(ref_scores)), key=lambda i: (ref_scores[i], -i))


def test_same_seed_same_text_and_sequences_differ(converted):
    r = Reasoner.load(converted("tiny-qwen2", "f32"))
    try:
        a = r.solve("Add 3 and 4.", n=3, seed=5, max_new_tokens=40)
        b = r.solve("Add 3 and 4.", n=3, seed=5, max_new_tokens=40)
        c = r.solve("Add 3 and 4.", n=3, seed=6, max_new_tokens=40)
    finally:
        r.close()
    assert [x.token_ids for x in a.candidates] == [x.token_ids for x in b.candidates]
    assert len({tuple(x.token_ids) for x in a.candidates}) == 3
    assert [x.token_ids for x in a.candidates] != [x.token_ids for x in c.candidates]


def test_events_report_tokens_steps_and_finish(converted):
    r = Reasoner.load(converted("tiny-qwen2", "f32"))
    events = []
    try:
        res = r.solve("Count to five.", n=2, seed=3, max_new_tokens=50, on_event=events.append)
    finally:
        r.close()
    for i, cand in enumerate(res.candidates):
        mine = [e for e in events if e.index == i]
        assert sum(e.kind == "token" for e in mine) == len(cand.token_ids)
        generated_steps = [p for p in cand.step_positions if p >= len(res.prompt_token_ids) - 1]
        assert sum(e.kind == "step" for e in mine) >= len(generated_steps)
        assert [e.finish_reason for e in mine if e.kind == "finish"] == [cand.finish_reason]


def test_stop_strings_and_length(converted):
    r = Reasoner.load(converted("tiny-qwen2", "f32"))
    try:
        res = r.solve("Go.", n=4, seed=2, max_new_tokens=30)
        free = [c.text for c in res.candidates]
        # Stop at a piece of text one candidate really produced.
        stop = next(t[5:8] for t in free if len(t) > 10 and "\ufffd" not in t[5:8])
        res2 = r.solve("Go.", n=4, seed=2, max_new_tokens=30, stop=[stop])
    finally:
        r.close()
    assert all(c.finish_reason in ("stop", "length") for c in res.candidates)
    assert all(len(c.token_ids) <= 30 for c in res.candidates)
    hit = [c for c in res2.candidates if c.finish_reason == "stop" and stop not in c.text]
    assert hit, "the stop string ends the candidate that produced it, and is cut from its text"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_finished_sequences_free_their_cells(converted, layout):
    import llama_cpp

    from edge_ms.sampling import SamplingParams

    r = Reasoner.load(converted("tiny-qwen2", "f32"))
    try:
        ids = r.prompt_ids("Free the cells.")
        seen = []
        for ev in r.engine.generate(ids, 3, SamplingParams(seed=9, max_new_tokens=12), kv_layout=layout):
            if ev.kind == "finish":
                mem = llama_cpp.llama_get_memory(r.engine._ctx)
                seen.append(llama_cpp.llama_memory_seq_pos_max(mem, ev.index))
    finally:
        r.close()
    # A finished trajectory keeps only the shared prompt (for the next call to reuse).
    assert seen == [len(ids) - 1] * 3


def _run(engine, ids, n=3, seed=4, layout="unified"):
    from edge_ms.engine import Stats
    from edge_ms.sampling import SamplingParams

    stats = Stats()
    # Greedy: reusing the prefix changes micro-batch composition, which moves logits by
    # ~1e-4 (as llama.cpp's cache_prompt does); enough to flip a sampled token now and then.
    params = SamplingParams(seed=seed, max_new_tokens=40, temperature=0.0)
    done = [ev for ev in engine.generate(ids, n, params, stats=stats, kv_layout=layout) if ev.kind == "done"][0]
    cands = [t.tracker.candidates for t in done.trajectories]
    return [(t.tokens, [q for q, _ in c], [x for _, x in c]) for t, c in zip(done.trajectories, cands)], stats


@pytest.mark.parametrize("layout", LAYOUTS)
def test_shared_prompt_prefix_is_decoded_once_and_changes_nothing(converted, layout):
    # A few-shot prefix with step delimiters in it, so the reused part holds scored rows too.
    shots = "Step one.\n\nStep two.\n\nStep three.\n\n" * 3
    r = Reasoner.load(converted("tiny-qwen2", "f32"))
    fresh = Reasoner.load(converted("tiny-qwen2", "f32"))
    try:
        a_ids, b_ids = r.prompt_ids(shots + "Add 3 and 4."), r.prompt_ids(shots + "Add 5 and 9.")
        _, first = _run(r.engine, a_ids, layout=layout)
        got, second = _run(r.engine, b_ids, layout=layout)
        want, _ = _run(fresh.engine, b_ids, layout=layout)
        again, third = _run(r.engine, b_ids, n=2, layout=layout)
        fresh.engine.close_context()
        want_again, _ = _run(fresh.engine, b_ids, n=2, layout=layout)
    finally:
        r.close()
        fresh.close()
    assert first.reused_prompt_tokens == 0
    common = next(i for i, (x, y) in enumerate(zip(a_ids, b_ids)) if x != y)
    assert second.reused_prompt_tokens == common > 30
    assert third.reused_prompt_tokens == len(b_ids) - 1
    for mine, theirs in ((got, want), (again, want_again)):
        assert [t[0] for t in mine] == [t[0] for t in theirs]
        assert [t[1] for t in mine] == [t[1] for t in theirs]
        assert any(q < len(b_ids) - 1 for t in mine for q in t[1]), "prompt candidates were scored"
        for (_, _, s1), (_, _, s2) in zip(mine, theirs):
            assert s1 == pytest.approx(s2, abs=1e-3)


def test_q8_0_kv_cache_runs_and_stays_close(converted):
    from edge_ms.model import DeviceSettings

    results = {}
    for kv in ("f16", "q8_0"):
        r = Reasoner.load(converted("tiny-qwen2", "f32"), settings=DeviceSettings(kv_type=kv))
        try:
            results[kv] = r.solve("Check the cache.", n=2, seed=1, max_new_tokens=20, temperature=0)
        finally:
            r.close()
    a, b = results["f16"].candidates[0], results["q8_0"].candidates[0]
    # Greedy decoding: a quantized KV cache may flip a late token, not the opening ones.
    assert a.token_ids[:5] == b.token_ids[:5]


def test_onnx_is_loaded_before_llama_cpp():
    import subprocess
    import sys

    # Importing onnx / onnxruntime after a CUDA build of llama.cpp segfaulted (edge_ms/__init__.py).
    code = ("import sys, edge_ms.engine; m = list(sys.modules); "
            "print(m.index('onnxruntime') < m.index('llama_cpp') and m.index('onnx') < m.index('llama_cpp'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "True", out.stderr


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cancelling_frees_every_cell_and_the_next_run_is_unaffected(converted, layout):
    import llama_cpp

    from edge_ms.sampling import SamplingParams

    r = Reasoner.load(converted("tiny-qwen2", "f32"))
    try:
        ids = r.prompt_ids("Cancel me.")
        params = SamplingParams(seed=3, max_new_tokens=40, temperature=0.0)
        tokens = 0

        def stop() -> bool:
            return tokens >= 12

        for ev in r.engine.generate(ids, 4, params, should_stop=stop, kv_layout=layout):
            tokens += ev.kind == "token"
        done = ev
        mem = llama_cpp.llama_get_memory(r.engine._ctx)
        cells = [llama_cpp.llama_memory_seq_pos_max(mem, s) for s in range(4)]
        again = [ev for ev in r.engine.generate(ids, 2, params, kv_layout=layout)][-1]
        r.engine.close_context()
        fresh = [ev for ev in r.engine.generate(ids, 2, params, kv_layout=layout)][-1]
    finally:
        r.close()
    assert {t.finish_reason for t in done.trajectories} == {"cancelled"}
    assert cells == [-1] * 4
    assert [t.tokens for t in again.trajectories] == [t.tokens for t in fresh.trajectories]


def test_ignore_eos_runs_every_trajectory_to_its_length(converted):
    from edge_ms.sampling import SamplingParams

    r = Reasoner.load(converted("tiny-qwen2", "f32"))
    try:
        eog = set(r.model.eog_ids)
        plain = r.solve("Stop early.", n=4, seed=2, max_new_tokens=60, temperature=1.0)
        params = SamplingParams(seed=2, max_new_tokens=60, temperature=1.0, ignore_eos=True)
        done = list(r.engine.generate(r.prompt_ids("Stop early."), 4, params))[-1]
    finally:
        r.close()
    assert eog and any(c.finish_reason == "stop" for c in plain.candidates), "the fixture should stop sometimes"
    assert all(len(t.tokens) == 60 and t.finish_reason == "length" for t in done.trajectories)
    assert not eog & {tok for t in done.trajectories for tok in t.tokens}


def test_ignore_eos_holds_for_forks_too(converted):
    from edge_ms.sampling import SamplingParams
    from edge_ms.search import BeamSearch

    r = Reasoner.load(converted("tiny-qwen2", "f32"))
    try:
        eog = set(r.model.eog_ids)
        params = SamplingParams(seed=5, max_new_tokens=60, temperature=1.0, ignore_eos=True)
        done = list(r.engine.generate(r.prompt_ids("Fork and go on."), 4, params, policy=BeamSearch(width=1)))[-1]
    finally:
        r.close()
    forks = [t for t in done.trajectories if t.parent is not None]
    assert forks, "the beam should fork on the fixture"
    assert not eog & {tok for t in done.trajectories for tok in t.tokens}
    assert {t.finish_reason for t in done.trajectories} <= {"length", "pruned"}
