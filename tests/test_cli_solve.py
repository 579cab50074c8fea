"""`edge-ms solve` as a user runs it: JSON output, and one clear line for what cannot run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edge_ms.head import HeadSpec, load_head, write_head


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_ms.cli", *args], capture_output=True, text=True, timeout=300)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_json_output(converted):
    proc = run("solve", "What is 6 times 7?", "--model", str(converted("tiny-qwen2", "f32")), "--n", "3",
               "--seed", "4", "--max-new-tokens", "40", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert {"mode", "n", "selected", "answer", "prompt_token_ids", "candidates"} <= out.keys()
    assert out["n"] == len(out["candidates"]) == 3
    scores = [c["score"] for c in out["candidates"]]
    assert out["selected"] == scores.index(max(scores))
    n_prompt = len(out["prompt_token_ids"])
    for c in out["candidates"]:
        assert {"text", "token_ids", "step_positions", "step_scores", "score", "finish_reason"} <= c.keys()
        assert 0 < len(c["token_ids"]) <= 40
        assert len(c["step_positions"]) == len(c["step_scores"])
        assert all(0 <= p < n_prompt + len(c["token_ids"]) for p in c["step_positions"])
    # The chat template was applied: the prompt opens the think block.
    assert out["prompt_token_ids"][-1] != out["prompt_token_ids"][0]


def test_mode_sets_n(converted):
    proc = run("solve", "Hi", "--model", str(converted("tiny-qwen2", "f32")), "--mode", "low",
               "--max-new-tokens", "5", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["n"] == 2


def test_prompt_that_does_not_fit(converted):
    prompt = " ".join(f"w{i}" for i in range(4000))
    line = one_line_error(run("solve", prompt, "--raw", "--model", str(converted("tiny-qwen2", "f32")),
                              "--n", "2", "--max-new-tokens", "16"))
    assert "exceeds the model's context" in line


def test_n_that_does_not_fit(converted):
    line = one_line_error(run("solve", "Hi", "--model", str(converted("tiny-qwen2", "f32")), "--n", "8",
                              "--max-new-tokens", "3000", "--memory", "40MiB"))
    assert "KV cache" in line and "budget" in line


def test_head_of_another_backbone_is_refused(converted, tmp_path):
    model_dir = converted("tiny-qwen2", "f32")
    head = load_head(model_dir / "tiny-qwen2.sprm.onnx")
    spec = head.spec
    foreign = HeadSpec(spec.layer, spec.hidden_size, spec.step_delimiter_ids, spec.think_start_id,
                       spec.think_end_id, "0123456789abcdef")
    write_head(tmp_path / "foreign.sprm.onnx", head.weights(), foreign)
    line = one_line_error(run("solve", "Hi", "--model", str(model_dir / "tiny-qwen2-f32.gguf"),
                              "--head", str(tmp_path / "foreign.sprm.onnx"), "--n", "2"))
    assert "foreign.sprm.onnx" in line and "belongs to backbone 0123456789abcdef" in line


def test_head_of_another_width_is_refused(converted):
    other = converted("tiny-qwen2-sharded", "f32") / "tiny-qwen2-sharded.sprm.onnx"
    line = one_line_error(run("solve", "Hi", "--model", str(converted("tiny-qwen2", "f32") / "tiny-qwen2-f32.gguf"),
                              "--head", str(other), "--n", "2"))
    assert "head width 64 does not match" in line


@pytest.mark.parametrize("args,needle", [(["--mode", "extreme"], "unknown mode"), (["--n", "0"], "at least one"),
                                          (["--kv-type", "q3"], "unknown KV-cache type")])
def test_bad_options(converted, args, needle):
    line = one_line_error(run("solve", "Hi", "--model", str(converted("tiny-qwen2", "f32")), *args))
    assert needle in line


def test_beam_search_shows_its_forks(converted):
    proc = run("solve", "Compute 12 * 7 step by step.", "--model", str(converted("tiny-qwen2", "f32")), "--n", "8",
               "--seed", "11", "--max-new-tokens", "80", "--strategy", "beam", "--beam-width", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    cands = out["candidates"]
    assert out["strategy"] == "beam" and out["n"] == 8 and len(cands) > 8
    forks = [c for c in cands if c["parent"] is not None]
    assert len(forks) == len(cands) - 8 and all(c["parent"] is None and c["fork_at"] is None for c in cands[:8])
    for c in forks:  # a fork starts with its parent's first fork_at tokens
        assert c["token_ids"][: c["fork_at"]] == cands[c["parent"]]["token_ids"][: c["fork_at"]]
    assert {"pruned"} <= {c["finish_reason"] for c in cands}
    assert cands[out["selected"]]["finish_reason"] in ("stop", "length")
    sampled = sum(len(c["token_ids"]) - (c["fork_at"] or 0) for c in cands)
    assert out["stats"]["generated_tokens"] == sampled <= 8 * 80


@pytest.mark.parametrize("args,needle", [(["--strategy", "beam", "--beam-width", "9"], "--beam-width 9: must be from 1"),
                                          (["--beam-width", "2"], "only for --strategy beam"),
                                          (["--strategy", "dfs"], "--strategy dfs: unknown")])
def test_bad_search_options(converted, args, needle):
    line = one_line_error(run("solve", "Hi", "--model", str(converted("tiny-qwen2", "f32")), "--n", "8", *args))
    assert needle in line


def test_embedded_default_model_solves_offline():
    """The README's first command: no --model, the embedded SmolLM2 + its shipped head."""
    proc = run("solve", "Tom has 23 apples, buys 45 more and gives away 17. How many are left?",
               "--mode", "low", "--seed", "0", "--max-new-tokens", "64", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["n"] == 2 and out["answer"]
    assert any(c["step_scores"] for c in out["candidates"])  # one step per line, scored by the head
    assert all(0.0 <= s <= 1.0 for c in out["candidates"] for s in c["step_scores"])
