"""Calibrated confidence: a trajectory score read as the probability that its final answer is right.

Raw trajectory scores (geometric means of step scores) span many decades (the shipped head
gives a typical answer about 1e-8) and mean nothing to a person. A calibration, fitted on
labelled trajectories the head was not trained on, maps them to probabilities. It works on
``z = logit(score)``, the score clipped to [1e-10, 1 - 1e-10] (the floor step scores already
have), where the decades become an even spread of numbers:

- ``platt``: ``p = sigmoid(a * z + b)``, two numbers, ``a >= 0`` so that a higher score never
  means a lower confidence;
- ``isotonic``: a small non-decreasing table of ``(z, p)`` points, linear in between and flat
  beyond its ends.

:func:`fit` tries both and keeps the one with the lower out-of-fold log-loss (folds by
problem, so the trajectories of one problem never sit on both sides of a split). The
calibration travels in the head file (``edge_ms.head``), where it is checked as hostile input
on load: finite numbers in range, a bounded table, monotone.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_ms.atomic import atomic_write
from edge_ms.errors import EdgeMSError

__all__ = ["Calibration", "FitReport", "ece", "fit", "fit_isotonic", "fit_platt", "log_loss",
           "plot_reliability", "reliability", "to_logit"]

METHODS = ("platt", "isotonic")
SCORE_CLIP = 1e-10
MAX_POINTS = 256  # the most table points a head file may carry
TABLE_POINTS = 32  # the most points fit_isotonic keeps: a small table
MAX_JSON_CHARS = 64 * 1024
_MAX_PARAM = 1e4  # |a|, |b|: far beyond any useful slope or offset on logits within +-23
_MAX_Z = 50.0  # table knots: the clipped logits lie within +-23
ISOTONIC_MARGIN = 1e-3  # out-of-fold log-loss (nats per trajectory) a table must gain over platt
P_MIN = 1e-3  # isotonic tables stay within [P_MIN, 1 - P_MIN]: no absolute certainty from a few samples


def to_logit(scores) -> np.ndarray:
    """``logit(score)`` of trajectory scores in [0, 1], clipped to [1e-10, 1 - 1e-10]."""
    s = np.clip(np.asarray(scores, np.float64), SCORE_CLIP, 1.0 - SCORE_CLIP)
    return np.log(s) - np.log1p(-s)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -x))


@dataclass(frozen=True)
class Calibration:
    """A map from trajectory score to calibrated confidence (see the module docstring)."""

    method: str
    a: float = 0.0
    b: float = 0.0
    z: tuple[float, ...] = ()
    p: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        problem = _problem(self)
        if problem:
            raise ValueError(problem)

    def apply(self, scores) -> np.ndarray:
        """Confidences in [0, 1] for an array of trajectory scores."""
        return self.apply_logits(to_logit(scores))

    def apply_logits(self, z: np.ndarray) -> np.ndarray:
        """Confidences for scores already turned into :func:`to_logit`'s logits."""
        z = np.asarray(z, np.float64)
        if self.method == "platt":
            return _sigmoid(self.a * z + self.b)
        return np.interp(z, np.asarray(self.z), np.asarray(self.p))

    def __call__(self, score: float) -> float:
        """The confidence of one trajectory score."""
        return float(self.apply(np.array([score]))[0])

    def to_json(self) -> str:
        if self.method == "platt":
            return json.dumps({"method": "platt", "a": self.a, "b": self.b})
        return json.dumps({"method": "isotonic", "z": list(self.z), "p": list(self.p)})

    @classmethod
    def from_json(cls, text: str) -> Calibration:
        """Parse what :meth:`to_json` wrote; anything else raises ValueError with one line."""
        if not isinstance(text, str) or len(text) > MAX_JSON_CHARS:
            raise ValueError(f"more than {MAX_JSON_CHARS} characters")
        try:
            raw = json.loads(text)
        except (json.JSONDecodeError, RecursionError):
            raise ValueError("not JSON") from None
        if not isinstance(raw, dict) or raw.get("method") not in METHODS:
            raise ValueError(f"must be an object whose method is one of {', '.join(METHODS)}")
        keys = ("a", "b") if raw["method"] == "platt" else ("z", "p")
        missing = [k for k in keys if k not in raw]
        if missing:
            raise ValueError(f"{raw['method']} calibration without {', '.join(missing)}")
        if raw["method"] == "platt":
            a, b = (_number(raw[k], k) for k in keys)
            return cls("platt", a=a, b=b)
        z, p = raw["z"], raw["p"]
        for name, values in (("z", z), ("p", p)):
            if not isinstance(values, list) or len(values) > MAX_POINTS:
                raise ValueError(f"{name} must be a list of at most {MAX_POINTS} numbers")
        return cls("isotonic", z=tuple(_number(v, "z") for v in z), p=tuple(_number(v, "p") for v in p))


def _number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r:.40}")
    return float(value)


def _problem(cal: Calibration) -> str | None:
    """What makes ``cal`` unusable, or None. Checked on every construction, so also on load."""
    if cal.method not in METHODS:
        return f"unknown method {cal.method!r} (expected one of {', '.join(METHODS)})"
    if cal.method == "platt":
        if not all(isinstance(v, float | int) and math.isfinite(v) and abs(v) <= _MAX_PARAM for v in (cal.a, cal.b)):
            return f"platt a and b must be finite numbers within +-{_MAX_PARAM:g}, got {cal.a!r}, {cal.b!r}"
        if cal.a < 0:
            return f"platt slope a = {cal.a:g} is negative: a higher score would mean a lower confidence"
        return None
    z, p = np.asarray(cal.z, np.float64), np.asarray(cal.p, np.float64)
    if not 1 <= len(z) <= MAX_POINTS or len(p) != len(z):
        return f"an isotonic table needs 1 to {MAX_POINTS} (z, p) points of equal count, got {len(z)} and {len(p)}"
    if not (np.isfinite(z).all() and np.isfinite(p).all()):
        return "the isotonic table holds NaN or infinite values"
    if np.abs(z).max() > _MAX_Z or p.min() < 0.0 or p.max() > 1.0:
        return f"isotonic z must lie within +-{_MAX_Z:g} and p within [0, 1]"
    if np.any(np.diff(z) <= 0) or np.any(np.diff(p) < 0):
        return "the isotonic table is not monotone (z must increase, p must not decrease)"
    return None


# -- fitting ------------------------------------------------------------------------


def fit_platt(z: np.ndarray, y: np.ndarray) -> Calibration:
    """Platt scaling on logits ``z`` with labels ``y`` in {0, 1}, by Newton's method.

    The targets are Platt's smoothed ones ((n+ + 1)/(n+ + 2) and 1/(n- + 2)), so one class
    alone, or separable data, still gives finite numbers. A fit with a negative slope (scores
    that rank backwards) falls back to the base rate: a = 0.
    """
    z, y = np.asarray(z, np.float64), np.asarray(y, np.float64)
    n_pos = float(y.sum())
    t = np.where(y > 0.5, (n_pos + 1) / (n_pos + 2), 1 / (len(y) - n_pos + 2))
    mu, sd = float(z.mean()), float(z.std())
    if sd < 1e-12:
        return Calibration("platt", a=0.0, b=_clip_param(_logit(float(t.mean()))))
    x = np.stack([(z - mu) / sd, np.ones_like(z)], axis=1)
    w = np.array([0.0, _logit(float(t.mean()))])

    def loss(w: np.ndarray) -> float:
        m = x @ w
        return float(np.sum(np.logaddexp(0.0, m) - t * m))

    current = loss(w)
    for _ in range(100):
        p = _sigmoid(x @ w)
        grad = x.T @ (p - t)
        hess = (x * (p * (1 - p))[:, None]).T @ x + 1e-9 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        scale = 1.0
        while scale > 1e-6 and loss(w - scale * step) > current:
            scale /= 2  # Newton can overshoot on nearly separable data
        w, previous = w - scale * step, current
        current = loss(w)
        if previous - current < 1e-12 * max(1.0, abs(current)):
            break
    a, b = w[0] / sd, w[1] - w[0] * mu / sd
    if a < 0:
        return Calibration("platt", a=0.0, b=_clip_param(_logit(float(t.mean()))))
    return Calibration("platt", a=_clip_param(a), b=_clip_param(b))


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


def _clip_param(v: float) -> float:
    return float(min(max(v, -_MAX_PARAM), _MAX_PARAM))


def fit_isotonic(z: np.ndarray, y: np.ndarray, max_points: int = TABLE_POINTS) -> Calibration:
    """Isotonic regression (pool adjacent violators) of ``y`` on ``z``, kept to ``max_points`` points.

    Each pooled block becomes one point: its mean z and its share of right answers with one
    right and one wrong added (Laplace), so that a block of twelve wrong answers reads 1/14,
    not certainty; a running maximum keeps the smoothed shares monotone. Beyond
    ``max_points`` neighbouring blocks are pooled again, which keeps the table monotone too.
    """
    z, y = np.asarray(z, np.float64), np.asarray(y, np.float64)
    _, inv = np.unique(np.clip(z, -_MAX_Z, _MAX_Z), return_inverse=True)
    counts = np.bincount(inv).astype(np.float64)
    zsum, ysum = np.bincount(inv, weights=z), np.bincount(inv, weights=y)
    blocks: list[list[float]] = []  # [count, sum z, sum y]
    for c, sz, sy in zip(counts, zsum, ysum):
        blocks.append([c, sz, sy])
        while len(blocks) > 1 and blocks[-2][2] / blocks[-2][0] >= blocks[-1][2] / blocks[-1][0]:
            c2, z2, y2 = blocks.pop()
            blocks[-1] = [blocks[-1][0] + c2, blocks[-1][1] + z2, blocks[-1][2] + y2]
    arr = np.array(blocks)
    if len(arr) > max_points:
        arr = np.array([g.sum(axis=0) for g in np.array_split(arr, max_points)])
    zs = np.clip(arr[:, 1] / arr[:, 0], -_MAX_Z, _MAX_Z)
    ps = np.maximum.accumulate(np.clip((arr[:, 2] + 1) / (arr[:, 0] + 2), P_MIN, 1 - P_MIN))
    return Calibration("isotonic", z=tuple(float(v) for v in zs), p=tuple(float(v) for v in ps))


def _fit_one(method: str, z: np.ndarray, y: np.ndarray) -> Calibration:
    return fit_platt(z, y) if method == "platt" else fit_isotonic(z, y)


def log_loss(conf, labels) -> float:
    """Mean negative log-likelihood of ``labels`` under ``conf`` (clipped to [1e-6, 1 - 1e-6])."""
    p = np.clip(np.asarray(conf, np.float64), 1e-6, 1 - 1e-6)
    y = np.asarray(labels, np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def reliability(conf, labels, bins: int = 10) -> list[dict]:
    """Per equal-width bin of confidence: its range, count, mean confidence and share right.

    Bin i holds confidences in [i/bins, (i+1)/bins); the last bin also holds 1.0.
    """
    p = np.asarray(conf, np.float64)
    y = np.asarray(labels, np.float64)
    idx = np.minimum((p * bins).astype(np.int64), bins - 1)
    out = []
    for i in range(bins):
        sel = idx == i
        n = int(sel.sum())
        out.append({"lo": i / bins, "hi": (i + 1) / bins, "count": n,
                    "confidence": float(p[sel].mean()) if n else None,
                    "accuracy": float(y[sel].mean()) if n else None})
    return out


def ece(conf, labels, bins: int = 10) -> float:
    """Expected calibration error: sum over bins of (share of samples) x |share right - mean confidence|."""
    total = len(np.asarray(conf))
    if total == 0:
        return float("nan")
    return float(sum(b["count"] / total * abs(b["accuracy"] - b["confidence"])
                     for b in reliability(conf, labels, bins) if b["count"]))


@dataclass
class FitReport:
    """A fitted calibration and how well each method did out of fold."""

    calibration: Calibration
    trajectories: int
    problems: int
    right: int
    cv: dict[str, dict] = field(default_factory=dict)  # method -> {"log_loss", "ece"} out of fold
    ece: float = float("nan")  # of the chosen calibration on the data it was fitted on
    oof_ece: float = float("nan")  # of the chosen method, each fold predicted by a fit without it
    confidences: np.ndarray = field(default_factory=lambda: np.empty(0), repr=False)
    oof_confidences: np.ndarray = field(default_factory=lambda: np.empty(0), repr=False)

    def summary(self) -> dict:
        return {"calibration": json.loads(self.calibration.to_json()), "trajectories": self.trajectories,
                "problems": self.problems, "right": self.right, "ece_10_bins": self.ece,
                "out_of_fold": {"ece_10_bins": self.oof_ece, **{m: v for m, v in self.cv.items()}}}


def _folds(groups: np.ndarray, k: int) -> np.ndarray:
    uniq = np.unique(groups)
    order = np.random.default_rng(0).permutation(len(uniq))
    fold_of = {g: int(i % k) for g, i in zip(uniq[order], range(len(uniq)))}
    return np.array([fold_of[g] for g in groups])


def fit(scores: Sequence[float], labels: Sequence[bool], groups: Sequence[int] | None = None,
        method: str = "auto", folds: int = 5) -> FitReport:
    """Fit a calibration of trajectory ``scores`` to ``labels`` (right or not).

    ``groups``: the problem of each trajectory (default: each its own). ``method`` "auto"
    keeps platt unless isotonic's out-of-fold log-loss is lower by more than ``ISOTONIC_MARGIN``
    (a table must earn its extra numbers); with fewer than 2 problems it keeps platt.
    """
    if method not in ("auto", *METHODS):
        raise EdgeMSError(f"--method {method}: unknown (choose from auto, {', '.join(METHODS)})")
    z = to_logit(scores)
    y = np.asarray(labels, np.float64)
    if len(z) < 2:
        raise EdgeMSError(f"calibration needs at least 2 labelled trajectories, got {len(z)}")
    g = np.arange(len(z)) if groups is None else np.asarray(groups)
    k = min(folds, len(np.unique(g)))
    cv, oof = {}, {}
    for m in (METHODS if method == "auto" else (method,)):
        pred = np.full(len(z), np.nan)
        if k >= 2:
            fold = _folds(g, k)
            for f in range(k):
                held = fold == f
                pred[held] = _fit_one(m, z[~held], y[~held]).apply_logits(z[held])
            cv[m] = {"log_loss": log_loss(pred, y), "ece_10_bins": ece(pred, y)}
        oof[m] = pred
    chosen = method
    if method == "auto":
        better = cv and cv["isotonic"]["log_loss"] < cv["platt"]["log_loss"] - ISOTONIC_MARGIN
        chosen = "isotonic" if better else "platt"
    cal = _fit_one(chosen, z, y)
    conf = cal.apply_logits(z)
    return FitReport(cal, len(z), len(np.unique(g)), int(y.sum()), cv, ece(conf, y),
                     ece(oof[chosen], y) if k >= 2 else float("nan"), conf, oof[chosen])


def plot_reliability(conf, labels, path: str | os.PathLike, title: str = "", bins: int = 10) -> bool:
    """A reliability diagram PNG: share right against mean confidence per bin, with the counts.

    Returns False (writing nothing) without matplotlib (``pip install edge-ms[train]``). The
    file appears whole or not at all.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed; must precede pyplot
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = reliability(conf, labels, bins)
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5.2, 6.0), dpi=100, sharex=True,
                                   gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], "--", color="0.6", label="perfect calibration")
    used = [r for r in rows if r["count"]]
    ax.bar([(r["lo"] + r["hi"]) / 2 for r in used], [r["accuracy"] for r in used], width=1 / bins * 0.9,
           color="tab:blue", alpha=0.35, label="share right per bin")
    ax.plot([r["confidence"] for r in used], [r["accuracy"] for r in used], "o-", color="tab:blue",
            label="share right vs mean confidence")
    for r in used:
        ax.annotate(f"n={r['count']}", ((r["lo"] + r["hi"]) / 2, r["accuracy"]), textcoords="offset points",
                    xytext=(0, 6), ha="center", fontsize="x-small")
    ax.set_ylabel("share of answers right")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    ax.set_title(title or f"reliability, ECE {ece(conf, labels, bins):.3f}", fontsize="medium")
    hist.bar([(r["lo"] + r["hi"]) / 2 for r in rows], [r["count"] for r in rows], width=1 / bins * 0.9,
             color="0.5")
    hist.set_xlabel(f"calibrated confidence ({bins} bins)")
    hist.set_ylabel("trajectories")
    fig.tight_layout()
    try:
        with atomic_write(Path(path), binary=True) as f:
            fig.savefig(f, format="png")
    finally:
        plt.close(fig)
    return True
