"""`edge-ms train-sprm` end to end on a fixture model, and the evaluation arithmetic."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from edge_ms.errors import EdgeMSError
from edge_ms.head import load_head
from edge_ms.sprm import Sample, arrays, evaluate


def _s(problem, correct, score, answer="1", finish="stop", steps=1):
    return Sample(problem, "", finish, correct, answer, np.ones((steps, 4), np.float32), 10, score)


def test_evaluate_counts_each_way_of_picking():
    samples = [
        _s(0, True, 0.9, "5"), _s(0, False, 0.2, "6"), _s(0, False, 0.3, "6"), _s(0, False, 0.1, "6"),
        _s(1, False, 0.8, "2"), _s(1, True, 0.4, "3"), _s(1, True, 0.5, "3"), _s(1, False, 0.1, "4"),
    ]
    ev = evaluate(samples, 4)
    assert ev["pass@1"] == pytest.approx((1 / 4 + 2 / 4) / 2)
    assert ev["sprm_best"] == 0.5  # problem 0 right (0.9), problem 1 wrong (0.8)
    assert ev["majority"] == 0.5  # problem 0 votes "6" (wrong), problem 1 votes "3" (right)
    assert ev["sprm_weighted"] == 1.0  # "5": 0.9 > "6": 0.6; "3": 0.9 > "2": 0.8
    assert ev["oracle"] == 1.0
    assert 0.0 <= ev["auc"] <= 1.0


def test_arrays_leave_out_truncated_trajectories():
    x, y, t = arrays([_s(0, True, 0.5, steps=2), _s(0, False, 0.5, finish="length", steps=3), _s(1, False, 0.5)])
    assert x.shape == (3, 4) and list(y) == [1, 1, 0] and list(t) == [0, 0, 2]


def test_train_sprm_cli_writes_head_log_and_plot(converted, tmp_path):
    model_dir = converted("tiny-qwen2", "f32")
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"prompt": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n" for i in range(10)))
    out = tmp_path / "mine.sprm.onnx"
    cmd = [sys.executable, "-m", "edge_ms.cli", "train-sprm", "--model", str(model_dir / "tiny-qwen2-f32.gguf"),
           "--task", str(task), "-o", str(out), "--n", "3", "--max-new-tokens", "400", "--epochs", "3",
           "--workers", "2", "--cache", str(tmp_path / "cache"), "--train-problems", "6", "--calib-problems", "2",
           "--layers", "1,2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    head = load_head(out)
    fixture_head = load_head(model_dir / "tiny-qwen2.sprm.onnx")
    log = json.loads(out.with_name("mine.train.json").read_text())
    # A fresh head for a think model: ".\n\n" steps, the think markers, this backbone, and the
    # layer the validation problems chose: 2 layers x 3 losses, then the winner on less data.
    trials = log["selection"]["trials"]

    def key(t):  # validation AUC (null where it has one class only), then best-of-N
        return (t["validation"]["auc"] or -1.0, t["validation"]["sprm_best"])
    if all(t["validation"]["auc"] is None for t in trials):  # nothing ranks: the default recipe
        assert len(trials) == 6 and [t["loss"] for t in trials if t["chosen"]] == ["bce+spr"]
        assert log["recipe"] == {"layer": 2, "loss": "bce+spr", "problem_share": 1.0, "samples": None}
        chosen = {"loss": "bce+spr"}
    else:
        assert len(trials) == 8 and sum(t["chosen"] for t in trials) == 1
        chosen = next(t for t in trials if t["chosen"])
        assert log["recipe"] == {k: chosen[k] for k in ("layer", "loss", "problem_share", "samples")}
        assert chosen == max(trials, key=key)  # the first of equals
    assert replace(head.spec, calibration=None) == replace(fixture_head.spec, layer=log["recipe"]["layer"])
    assert log["tapped_layers"] == [1, 2] and f"recipe: layer {head.spec.layer}, loss {chosen['loss']}" in proc.stdout
    assert len(log["epochs"]) == 4 and log["train"]["problems"] == 6
    assert len(list((tmp_path / "cache").iterdir())) == 10  # 6 train, 2 validation, 2 held-out: kept for a rerun
    assert out.with_name("mine.train.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Calibrated on the 2 validation problems (the 2 the first 80% leaves after 6 train problems).
    assert head.spec.calibration is not None and log["calibration"]["trajectories"] == 6
    assert log["calibration"]["problems"] == 2 and "calibration: platt" in proc.stdout
    assert out.with_name("mine.calib.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # No clobbering without --force.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 1 and "already exists" in again.stderr


def test_calibrate_cli_stores_a_calibration_without_losing_the_head(converted, tmp_path):
    model_dir = converted("tiny-qwen2", "f32")
    mine = tmp_path / "mine.sprm.onnx"
    mine.write_bytes((model_dir / "tiny-qwen2.sprm.onnx").read_bytes())
    original = mine.read_bytes()
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"prompt": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n" for i in range(4)))
    base = [sys.executable, "-m", "edge_ms.cli", "calibrate", "--model", str(model_dir / "tiny-qwen2-f32.gguf"),
            "--head", str(mine), "--task", str(task), "--n", "3", "--max-new-tokens", "60", "--workers", "2",
            "--cache", str(tmp_path / "cache")]
    out = tmp_path / "calibrated.sprm.onnx"
    proc = subprocess.run([*base, "-o", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert mine.read_bytes() == original  # a new file: the head it started from is untouched
    head, before = load_head(out), load_head(mine)
    assert replace(head.spec, calibration=None) == before.spec
    for key, w in before.weights().items():
        np.testing.assert_array_equal(head.weights()[key], w)
    log = json.loads(out.with_name("calibrated.calib.json").read_text())
    assert (log["trajectories"], log["problems"], log["right"]) == (12, 4, 0)
    # The random fixture model never states an answer, so none of its 12 is right, and the
    # calibrated confidence says so: Platt's smoothed target for no right answer, 1 / (12 + 2).
    assert head.spec.calibration.method == "platt"
    assert head.confidence(0.9) == pytest.approx(1 / 14) and head.confidence(1e-9) == pytest.approx(1 / 14)
    assert out.with_name("calibrated.calib.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "calibration: platt" in proc.stdout and "12 trajectories of 4 problems" in proc.stdout
    assert json.loads(head.provenance()["calibrated_by"])["problems"] == 4

    # In place only with --force; the samples come from the cache the first run kept.
    refused = subprocess.run(base, capture_output=True, text=True, timeout=600)
    assert refused.returncode == 1 and refused.stderr.strip().splitlines() == [
        f"error: {mine}: already exists (use --force to replace it, or -o NEW.sprm.onnx)"]
    assert mine.read_bytes() == original
    forced = subprocess.run([*base, "--force"], capture_output=True, text=True, timeout=600)
    assert forced.returncode == 0, forced.stderr
    assert load_head(mine).spec == head.spec


def _engine(converted):
    from edge_ms.engine import Engine
    from edge_ms.model import Model

    model_dir = converted("tiny-qwen2", "f32")
    model = Model(model_dir / "tiny-qwen2-f32.gguf")
    return Engine(model, load_head(model_dir / "tiny-qwen2.sprm.onnx"))


def _problems(k):
    from edge_ms.tasks import Problem

    return [Problem(f"What is {i} + {i}?", str(2 * i)) for i in range(k)]


def test_workers_and_cache_give_the_same_samples(converted, tmp_path):
    from edge_ms.sprm import sample

    engine = _engine(converted)
    probs = _problems(4)
    try:
        one = sample(engine, probs, 3, seed=2, max_new_tokens=30)
        two = sample(engine, probs, 3, seed=2, max_new_tokens=30, workers=2, cache=tmp_path / "c")
        files = sorted((tmp_path / "c").iterdir())
        seen = []
        cached = sample(engine, probs, 3, seed=2, max_new_tokens=30, cache=tmp_path / "c",
                        on_problem=lambda i, got: seen.append(i))
    finally:
        engine.close()
        engine.model.close()
    assert len(files) == 4
    assert [s.problem for s in two] == [s.problem for s in one] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    # Two one-thread contexts decode in other micro-batches than one: compare what a user
    # sees (texts) and the step rows, with batch-composition tolerance.
    assert sum(a.text == b.text for a, b in zip(one, two)) >= 10
    for a, b in zip(two, cached):
        assert (a.text, a.correct, a.n_tokens) == (b.text, b.correct, b.n_tokens)
        np.testing.assert_array_equal(a.rows, b.rows)
    assert seen == [0, 1, 2, 3]


def test_unreadable_cache_file_is_resampled_not_fatal(converted, tmp_path):
    from edge_ms.sprm import sample

    engine = _engine(converted)
    try:
        first = sample(engine, _problems(1), 2, seed=1, max_new_tokens=20, cache=tmp_path)
        (path,) = tmp_path.iterdir()
        path.write_bytes(b"not an npz")
        again = sample(engine, _problems(1), 2, seed=1, max_new_tokens=20, cache=tmp_path)
    finally:
        engine.close()
        engine.model.close()
    assert [s.text for s in again] == [s.text for s in first]
    assert np.load(path)["rows_0"].shape == first[0].rows.shape  # rewritten whole


def test_train_sprm_shows_a_training_bar_after_the_sampling_bars(converted, tmp_path):
    model_dir = converted("tiny-qwen2", "f32")
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"prompt": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n" for i in range(5)))
    # As on a terminal: rich draws its bars only there (plain text, fixed width).
    env = {**os.environ, "TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1", "NO_COLOR": "1", "TERM": "xterm",
           "COLUMNS": "120"}
    cmd = [sys.executable, "-m", "edge_ms.cli", "train-sprm", "--model", str(model_dir / "tiny-qwen2-f32.gguf"),
           "--task", str(task), "-o", str(tmp_path / "bar.sprm.onnx"), "--n", "2", "--max-new-tokens", "400",
           "--epochs", "3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "\n", proc.stdout)
    rows = [line.strip() for line in re.split(r"[\r\n]", screen) if "━" in line]
    last = {r.split("━")[0].split(" (")[0].strip(): r for r in rows}  # each bar as last drawn
    assert set(last) == {"sampling train", "sampling held-out", "training"}, rows
    assert all(" 100% " in r for r in last.values()), last


def test_cached_samples_are_labelled_against_the_answers_asked_now(converted, tmp_path):
    """The cache is keyed by prompt; a task file whose answers changed must not reuse old labels."""
    from edge_ms.sprm import Sample, _cache_path, request, sample, save_samples
    from edge_ms.tasks import Problem

    engine = _engine(converted)
    try:
        prob = Problem("What is 2 + 2?", "4")
        ids, params = request(engine.model, prob, 0, seed=1, max_new_tokens=20, temperature=0.7)
        path = _cache_path(tmp_path, engine, ids, 1, params)
        # As if an earlier run (with answer "4") had sampled and labelled this trajectory.
        save_samples(path, [Sample(0, "2 + 2 = 4.\n\nThe answer is 4.", "stop", True, "4",
                                   np.zeros((1, engine.model.n_embd), np.float32), 12)])
        same = sample(engine, [prob], 1, seed=1, max_new_tokens=20, cache=tmp_path)
        fixed = sample(engine, [Problem("What is 2 + 2?", "5")], 1, seed=1, max_new_tokens=20, cache=tmp_path)
    finally:
        engine.close()
        engine.model.close()
    assert [s.text for s in same] == [s.text for s in fixed] == ["2 + 2 = 4.\n\nThe answer is 4."]  # from the cache
    assert same[0].correct and not fixed[0].correct


def test_sampling_several_layers_gives_each_layer_as_sampling_it_alone(converted):
    """One pass with extra layers tapped: same texts and scores, and each layer's rows as if tapped alone."""
    from edge_ms.engine import Engine
    from edge_ms.sprm import at_layer, sample

    engine = _engine(converted)
    model = engine.model
    wide = Engine(model, engine.head, keep_rows=True, extra_layers=(0,))
    head_layer = engine.head.spec.layer
    try:
        alone = sample(engine, _problems(2), 2, seed=3, max_new_tokens=40)
        both = sample(wide, _problems(2), 2, seed=3, max_new_tokens=40)
        swapped = Engine(model, engine.head, keep_rows=True, extra_layers=(0,))
        swapped.layer = 0  # the head on layer 0, layer `head_layer` as the extra one: rows keep sorted order
        swapped.extra_layers = (head_layer,)
        order = sample(swapped, _problems(1), 2, seed=3, max_new_tokens=40)
    finally:
        for e in (engine, wide):
            e.close()
        swapped.close()
        model.close()
    layers = sorted({0, head_layer})
    assert [s.text for s in both] == [s.text for s in alone]
    assert [s.score for s in both] == pytest.approx([s.score for s in alone], abs=1e-5)
    assert all(s.rows.shape[1] == 2 * model.n_embd for s in both)
    for a, b in zip(alone, at_layer(both, layers, head_layer)):
        np.testing.assert_allclose(b.rows, a.rows, atol=1e-4)
    other = at_layer(both, layers, 0)
    assert any(len(s.rows) for s in other) and not np.allclose(other[0].rows, alone[0].rows)
    # Whatever layer the engine's head reads, the rows come back in sorted layer order.
    for a, b in zip(at_layer(order, layers, 0), other[:2]):
        assert a.text == b.text
        np.testing.assert_allclose(a.rows, b.rows, atol=1e-4)
    with pytest.raises(EdgeMSError, match="was not tapped"):
        at_layer(both, layers, 3)


def test_choose_recipe_picks_what_ranks_validation_best():
    """A layer whose features carry the label beats one of pure noise, whatever the loss."""
    from edge_ms.sprm import Sample, TrainConfig, choose_recipe

    rng = np.random.default_rng(0)
    c = 8

    def samples(problems: int) -> list[Sample]:
        out = []
        for p in range(problems):
            for j in range(4):
                right = bool((p + j) % 3 == 0)
                signal = rng.normal(0.0, 1.0, (2, c)) + (1.5 if right else -1.5)
                noise = rng.normal(0.0, 1.0, (2, c))
                out.append(Sample(p, "x", "stop", right, str(int(right)), np.hstack([noise, signal]).astype(np.float32), 5))
        return out

    config = TrainConfig(n=4, epochs=8, lr=1e-3, losses=("bce", "bce+spr"))
    seen = []
    recipe, trials = choose_recipe(samples(40), samples(20), [3, 7], config, on_trial=seen.append)
    assert recipe.layer == 7
    assert len(trials) == 2 * 2 + 2 and seen == trials
    by = {(t["layer"], t["loss"], t["problem_share"], t["samples"]): t["validation"]["auc"] for t in trials}
    assert by[(7, "bce", 1.0, None)] > 0.9 > 0.7 > by[(3, "bce", 1.0, None)]


@pytest.mark.parametrize("flags, message", [
    (["--losses", "focal"], "error: --losses focal: choose from spr, bce, bce+spr"),
    (["--layers", "2,x"], "error: --layers 2,x: expected whole numbers separated by commas, e.g. 15,22,28"),
    (["--layers", "1,3"], "error: --layers 3: tiny-qwen2-f32.gguf has 4 layers (choose 0 to 2)"),
])
def test_train_sprm_refuses_bad_recipe_options_in_one_line(converted, tmp_path, flags, message):
    model_dir = converted("tiny-qwen2", "f32")
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"prompt": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n" for i in range(10)))
    cmd = [sys.executable, "-m", "edge_ms.cli", "train-sprm", "--model", str(model_dir / "tiny-qwen2-f32.gguf"),
           "--task", str(task), "-o", str(tmp_path / "h.sprm.onnx"), "--n", "2", "--max-new-tokens", "8", *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and proc.stderr.strip() == message
    assert not (tmp_path / "h.sprm.onnx").exists()


def test_choose_recipe_falls_back_to_the_default_when_validation_cannot_rank():
    """Every validation answer wrong: no AUC, no best-of-N difference; the default recipe, not the first tried."""
    from edge_ms.sprm import Sample, TrainConfig, choose_recipe

    rng = np.random.default_rng(1)

    def samples(problems: int, right) -> list[Sample]:
        return [Sample(p, "x", "stop", right(p, j), "1", rng.normal(0.0, 1.0, (2, 8)).astype(np.float32), 5)
                for p in range(problems) for j in range(2)]

    config = TrainConfig(n=2, epochs=2, losses=("spr", "bce", "bce+spr"))
    recipe, trials = choose_recipe(samples(10, lambda p, j: j == 0), samples(5, lambda p, j: False), [3, 7], config)
    assert (recipe.layer, recipe.loss) == (7, "bce+spr") and len(trials) == 6


def test_engine_refuses_to_tap_the_last_layer(converted):
    from edge_ms.engine import Engine

    engine = _engine(converted)
    try:
        with pytest.raises(EdgeMSError, match="cannot tap layer 3 \\(choose 0 to 2\\)"):
            Engine(engine.model, engine.head, extra_layers=(engine.model.n_layer - 1,))
    finally:
        engine.close()
        engine.model.close()
