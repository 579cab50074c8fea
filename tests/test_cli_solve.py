"""`edge-ms solve` as a user runs it: JSON output, and one clear line for what cannot run."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time

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
    assert "KV cache" in line and "over the budget of 40.0 MiB" in line  # not "0.04 GiB"


def test_weights_over_a_small_budget_say_it_in_a_unit_that_fits(converted):
    model_dir = converted("tiny-qwen2", "f32")
    weights = (model_dir / "tiny-qwen2-f32.gguf").stat().st_size
    line = one_line_error(run("solve", "Hi", "--model", str(model_dir), "--n", "2", "--memory", "1MiB"))
    # Was "the weights alone (0.00 GiB) exceed --memory 0.00 GiB".
    assert line.endswith(f"the weights alone ({weights / 2**20:.2f} MiB) exceed --memory 1.00 MiB"), line


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
                                          (["--n", "300"], "llama.cpp runs at most 256 sequences in parallel"),
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


# -- Ctrl-C ----------------------------------------------------------------------------------


def _interrupt_in_log_callback(model_dir, marker: str) -> subprocess.CompletedProcess:
    """The real CLI, sent SIGINT from inside llama.cpp's log callback at the first line holding ``marker``.

    A logging handler on edge_ms.model sends it, so the interrupt lands exactly where ctypes
    used to swallow it; nothing of edge_ms is replaced.
    """
    script = f"""
import logging, os, signal, sys

class SigintOnce(logging.Handler):
    sent = False

    def emit(self, record):
        if not SigintOnce.sent and {marker!r} in record.getMessage():
            SigintOnce.sent = True
            os.kill(os.getpid(), signal.SIGINT)

logger = logging.getLogger("edge_ms.model")
logger.addHandler(SigintOnce())
logger.setLevel(logging.DEBUG)
os.environ["EDGE_MS_LLAMA_LOG"] = "1"  # route every llama.cpp line through the callback
sys.argv = ["edge-ms", "solve", "Hi", "--model", {str(model_dir)!r}, "--n", "2", "--max-new-tokens", "50",
            "--json"]
from edge_ms.__main__ import main
main()
"""
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          preexec_fn=_default_sigint)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a shell's background job may have it ignored


@pytest.mark.parametrize("marker", ["", "llama_model_loader", "llama_context"],
                         ids=["backend-init", "model-load", "context"])
def test_ctrl_c_inside_llama_cpp_callbacks_stops_the_run(converted, marker):
    proc = _interrupt_in_log_callback(converted("tiny-qwen2", "f32"), marker)
    # Was: "Exception ignored on calling ctypes callback function", the run went on, exit 0.
    assert (proc.returncode, proc.stderr, proc.stdout) == (130, "interrupted\n", "")


def _mapped(pid: int, needle: str) -> bool:
    try:
        with open(f"/proc/{pid}/maps") as f:
            return needle in f.read()
    except OSError:
        return False


SOLVE = ["solve", "Count to a million.", "--n", "8", "--max-new-tokens", "3000", "--json"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="watches /proc/PID/maps")
@pytest.mark.parametrize(
    "command, loaded",
    [
        (SOLVE, "onnxruntime_pybind11_state"),
        (SOLVE, "libllama"),
        (SOLVE, "tiny-qwen2-f32.gguf"),
        (["list"], "onnxruntime_pybind11_state"),
    ],
    ids=["solve-importing", "solve-llama-cpp-imported", "solve-model-mapped", "list-importing"],
)
def test_ctrl_c_at_any_stage_is_interrupted_and_130(converted, tmp_path, command, loaded):
    """SIGINT once the process has mapped ``loaded``: while importing, loading, or generating."""
    model = ["--model", str(converted("tiny-qwen2", "f32"))] if command[0] == "solve" else []
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_ms", *command, *model],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint,
        env={**os.environ, "EDGE_MS_HOME": str(tmp_path)},
    )
    try:
        while not _mapped(proc.pid, loaded):
            assert proc.poll() is None, f"exited before mapping {loaded}: {proc.stderr.read()}"
            time.sleep(0.002)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    # Was: a traceback out of `import edge_ms`, "ImportError: initialization failed" out of
    # onnxruntime, or the interrupt lost in a llama.cpp callback and exit 0.
    assert (proc.returncode, err, out) == (130, "interrupted\n", "")
