"""`edge-ms solve` as a user runs it: JSON output, and one clear line for what cannot run."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import pytest

from edge_ms.calibrate import Calibration
from edge_ms.head import load_head, write_head


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
        assert c["confidence"] is None  # the converted head carries no calibration
    assert out["confidence"] is None and out["not_sure"] is False and out["min_confidence"] is None
    assert sum(a["count"] for a in out["answers"]) <= 3 and all(a["mass"] is None for a in out["answers"])
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
    foreign = dataclasses.replace(spec, backbone_fingerprint="0123456789abcdef")
    write_head(tmp_path / "foreign.sprm.onnx", head.weights(), foreign)
    line = one_line_error(run("solve", "Hi", "--model", str(model_dir / "tiny-qwen2-f32.gguf"),
                              "--head", str(tmp_path / "foreign.sprm.onnx"), "--n", "2"))
    assert "foreign.sprm.onnx" in line and "belongs to backbone 0123456789abcdef" in line


def test_head_of_another_width_is_refused(converted):
    other = converted("tiny-qwen2-sharded", "f32") / "tiny-qwen2-sharded.sprm.onnx"
    line = one_line_error(run("solve", "Hi", "--model", str(converted("tiny-qwen2", "f32") / "tiny-qwen2-f32.gguf"),
                              "--head", str(other), "--n", "2"))
    assert "head width 64 does not match" in line


def test_head_with_a_token_id_past_the_vocabulary_is_refused(converted, tmp_path):
    # llama.cpp aborts the process (std::out_of_range) when asked about such an id, and gdb's
    # backtrace lands on stdout: the id must be refused before, with --json output left empty.
    model_dir = converted("tiny-qwen2", "f32")
    head = load_head(model_dir / "tiny-qwen2.sprm.onnx")
    write_head(tmp_path / "ids.sprm.onnx", head.weights(), dataclasses.replace(head.spec, think_end_id=600))
    proc = run("solve", "Hi", "--model", str(model_dir / "tiny-qwen2-f32.gguf"),
               "--head", str(tmp_path / "ids.sprm.onnx"), "--n", "2", "--json")
    line = one_line_error(proc)
    assert proc.stdout == ""
    assert "ids.sprm.onnx: think_end_id 600 is not a token of tiny-qwen2-f32.gguf" in line


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_min_confidence_says_not_sure(converted, calibrated_head):
    gguf = str(converted("tiny-qwen2", "f32") / "tiny-qwen2-f32.gguf")
    # Whatever the score, this head says: right one time in ten.
    head = str(calibrated_head(Calibration("platt", a=0.0, b=_logit(0.1))))
    base = ["solve", "What is 6 times 7?", "--model", gguf, "--head", head, "--n", "2", "--seed", "4",
            "--max-new-tokens", "24"]
    proc = run(*base, "--min-confidence", "0.5")
    assert proc.returncode == 0, proc.stderr
    first, *rest = proc.stdout.splitlines()
    assert first == "not sure: the answer below has a calibrated confidence of 0.10, under --min-confidence 0.50"
    assert "confidence 0.10 (score " in proc.stderr
    out = json.loads(run(*base, "--min-confidence", "0.5", "--json").stdout)
    assert out["not_sure"] is True and out["min_confidence"] == 0.5
    assert out["confidence"] == pytest.approx(0.1)
    assert all(c["confidence"] == pytest.approx(0.1) for c in out["candidates"])
    assert all(a["mass"] == pytest.approx(0.1 * a["count"] / 2) for a in out["answers"])
    sure = run(*base, "--min-confidence", "0.05")
    assert sure.returncode == 0 and "not sure" not in sure.stdout


def test_min_confidence_needs_a_calibrated_head(converted):
    line = one_line_error(run("solve", "Hi", "--model", str(converted("tiny-qwen2", "f32")), "--n", "2",
                              "--min-confidence", "0.5"))
    assert "needs a calibrated head" in line and "tiny-qwen2.sprm.onnx" in line
    line = one_line_error(run("solve", "Hi", "--model", str(converted("tiny-qwen2", "f32")), "--min-confidence", "2"))
    assert "must be a probability" in line


@pytest.mark.parametrize("args,needle", [(["--mode", "extreme"], "unknown mode"), (["--n", "0"], "at least one"),
                                          (["--kv-type", "q3"], "unknown KV-cache type")])
def test_bad_options(converted, args, needle):
    line = one_line_error(run("solve", "Hi", "--model", str(converted("tiny-qwen2", "f32")), *args))
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
