"""Calibrated confidence: the fits, the error measure, and the calibration a head file carries."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest

from edge_ms.calibrate import (
    MAX_POINTS,
    Calibration,
    ece,
    fit,
    fit_isotonic,
    fit_platt,
    plot_reliability,
    reliability,
    to_logit,
)
from edge_ms.errors import EdgeMSError
from edge_ms.head import HeadSpec, load_head, write_head

C = 8


def _synthetic(a: float, b: float, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Trajectory scores spread over decades (logits around -18, as the shipped head gives) and
    labels drawn with P(right) = sigmoid(a * logit(score) + b)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(-18.0, 3.0, n)
    y = rng.random(n) < 1 / (1 + np.exp(-(a * z + b)))
    return 1 / (1 + np.exp(-z)), y


def test_platt_recovers_a_known_mapping():
    scores, y = _synthetic(0.5, 7.0, 40_000)
    cal = fit_platt(to_logit(scores), y)
    assert cal.method == "platt"
    assert cal.a == pytest.approx(0.5, abs=0.03) and cal.b == pytest.approx(7.0, abs=0.6)
    grid = 1 / (1 + np.exp(-np.linspace(-26, -10, 50)))
    truth = 1 / (1 + np.exp(-(0.5 * to_logit(grid) + 7.0)))
    assert np.abs(cal.apply(grid) - truth).max() < 0.02
    # A score of 1e-8, meaningless as such, reads as the probability the mapping gives it.
    assert cal(1e-8) == pytest.approx(1 / (1 + np.exp(-(0.5 * np.log(1e-8 / (1 - 1e-8)) + 7.0))), abs=0.01)


def test_fit_keeps_platt_for_a_sigmoid_and_isotonic_for_plateaus():
    scores, y = _synthetic(0.5, 7.0, 8000, seed=1)
    report = fit(scores, y, groups=np.arange(len(y)) // 8)
    assert report.calibration.method == "platt"
    assert report.oof_ece < 0.03 and report.problems == 1000 and report.right == int(y.sum())
    # Right 10% of the time below a score of e^-15, 60% above: no sigmoid has two plateaus.
    rng = np.random.default_rng(2)
    z = rng.uniform(-25, -5, 8000)
    y2 = rng.random(8000) < np.where(z < -15, 0.1, 0.6)
    report = fit(1 / (1 + np.exp(-z)), y2)
    assert report.calibration.method == "isotonic"
    assert report.cv["isotonic"]["log_loss"] < report.cv["platt"]["log_loss"]
    assert report.calibration(1e-9) == pytest.approx(0.1, abs=0.04)
    assert report.calibration(1e-3) == pytest.approx(0.6, abs=0.04)


def test_isotonic_table_is_small_monotone_and_round_trips():
    scores, y = _synthetic(0.8, 12.0, 5000, seed=3)
    cal = fit_isotonic(to_logit(scores), y)
    assert 1 <= len(cal.z) <= 32
    assert np.all(np.diff(cal.z) > 0) and np.all(np.diff(cal.p) >= 0)
    assert Calibration.from_json(cal.to_json()) == cal


def test_one_class_or_separable_data_still_gives_finite_numbers():
    z = np.linspace(-20, -5, 40)
    none_right = fit_platt(z, np.zeros(40))
    assert none_right.a == 0.0 and none_right(1e-8) == pytest.approx(1 / 42)  # Platt's smoothed target
    separable = fit_platt(z, z > -12)
    assert np.isfinite([separable.a, separable.b]).all() and separable(1e-3) > 0.9 > 0.1 > separable(1e-9)
    backwards = fit_platt(z, z < -12)  # a head that ranks wrong answers higher: no slope, the base rate
    assert backwards.a == 0.0 and backwards(0.5) == pytest.approx(backwards(1e-9))


def test_ece_by_hand():
    # Bin [0.1, 0.2): confidence 0.1, half right -> |0.5 - 0.1| = 0.4 on half the samples;
    # bin [0.9, 1.0]: confidence 0.9 and 1.0 (the last bin holds 1.0), all right -> |1 - 0.95| on the other half.
    conf, right = [0.1, 0.1, 0.9, 1.0], [0, 1, 1, 1]
    assert ece(conf, right) == pytest.approx(0.5 * 0.4 + 0.5 * 0.05)
    rows = reliability(conf, right)
    assert [r["count"] for r in rows] == [0, 2, 0, 0, 0, 0, 0, 0, 0, 2]
    assert ece([0.3, 0.7], [0, 1]) == pytest.approx(0.3)
    assert ece([0.5] * 4, [0, 1, 0, 1]) == 0.0


def test_reliability_diagram_is_a_png(tmp_path):
    scores, y = _synthetic(0.5, 7.0, 2000)
    cal = fit_platt(to_logit(scores), y)
    assert plot_reliability(cal.apply(scores), y, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["r.png"]  # no temp file left behind


# -- the calibration inside a head file --------------------------------------------


def _spec(**kw) -> HeadSpec:
    return HeadSpec(layer=2, hidden_size=C, step_delimiter_ids=(9,), think_start_id=None, think_end_id=None,
                    backbone_fingerprint="fp", **kw)


def _weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"0.weight": rng.standard_normal((2 * C, C)).astype(np.float32), "0.bias": np.zeros(2 * C, np.float32),
            "3.weight": rng.standard_normal((1, 2 * C)).astype(np.float32), "3.bias": np.zeros(1, np.float32)}


def test_head_without_calibration_loads_and_has_no_confidence(tmp_path):
    write_head(tmp_path / "old.sprm.onnx", _weights(), _spec())
    head = load_head(tmp_path / "old.sprm.onnx")
    assert head.spec.calibration is None and head.confidence(0.5) is None
    keys = {p.key for p in onnx.load(str(tmp_path / "old.sprm.onnx")).metadata_props}
    assert "edge_ms.calibration" not in keys  # the file is exactly what edge_ms wrote before calibrations


def test_head_calibration_and_provenance_round_trip(tmp_path):
    for cal in (Calibration("platt", a=0.5, b=7.0), Calibration("isotonic", z=(-20.0, -10.0), p=(0.05, 0.4))):
        path = tmp_path / f"{cal.method}.sprm.onnx"
        write_head(path, _weights(), _spec(calibration=cal), provenance={"source": "test"})
        head = load_head(path)
        assert head.spec == _spec(calibration=cal) and head.provenance() == {"source": "test"}
        assert head.confidence(1e-8) == pytest.approx(cal(1e-8))
    with pytest.raises(ValueError, match="overwrite the head spec"):
        write_head(tmp_path / "x.sprm.onnx", _weights(), _spec(), provenance={"calibration": "{}"})


def _with_calibration(tmp_path: Path, raw: str) -> Path:
    path = tmp_path / "hostile.sprm.onnx"
    write_head(path, _weights(), _spec())
    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, "edge_ms.calibration": raw})
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("raw,needle", [
    ('{"method": "platt", "a": NaN, "b": 0}', "finite"),
    ('{"method": "platt", "a": 1e400, "b": 0}', "finite"),
    ('{"method": "platt", "a": -1.0, "b": 0}', "negative"),
    ('{"method": "platt", "a": true, "b": 0}', "must be a number"),
    ('{"method": "platt", "a": 1}', "without b"),
    (json.dumps({"method": "isotonic", "z": list(range(-40, 40)) * 4, "p": [0.5] * 320}), f"at most {MAX_POINTS}"),
    ('{"method": "isotonic", "z": [-20, -10], "p": [0.6, 0.2]}', "not monotone"),
    ('{"method": "isotonic", "z": [-10, -20], "p": [0.2, 0.6]}', "not monotone"),
    ('{"method": "isotonic", "z": [-20, -10], "p": [0.2, 1.5]}', "within [0, 1]"),
    ('{"method": "isotonic", "z": [], "p": []}', "1 to"),
    ('{"method": "magic"}', "method"),
    ('[1, 2]', "method"),
    ("not json", "not JSON"),
    ("[" * 100_000, "characters"),
])
def test_hostile_calibration_is_refused_with_one_line(tmp_path, raw, needle):
    path = _with_calibration(tmp_path, raw)
    with pytest.raises(EdgeMSError) as err:
        load_head(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: metadata edge_ms.calibration: ") and needle in msg and "\n" not in msg


def test_a_calibration_that_cannot_be_stored_is_refused_before_writing(tmp_path):
    with pytest.raises(ValueError, match="negative"):
        Calibration("platt", a=-2.0, b=0.0)
    with pytest.raises(EdgeMSError, match="calibration must be"):
        write_head(tmp_path / "x.sprm.onnx", _weights(), replace(_spec(), calibration={"a": 1}))
    assert not list(tmp_path.iterdir())
