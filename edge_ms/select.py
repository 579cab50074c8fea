"""Where a trajectory is chosen: best-of-N by SPRM score (the published method) and alternatives."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

# "prune" and "beam" search while the trajectories run (edge_ms.search), then pick best-of-N;
# "early-stop" ends the run once the SPRM-weighted vote is settled, then picks by that vote.
STRATEGIES = ("best", "majority", "weighted", "prune", "beam", "early-stop")


class Scored(Protocol):
    score: float
    answer_key: str | None
    finish_reason: str
    # Optional: the calibrated confidence of the trajectory (edge_ms.calibrate); None when uncalibrated.
    # confidence: float | None


# Trajectories cut short by a search policy or a cancel have no answer of their own to offer.
UNFINISHED = ("pruned", "early-stop", "cancelled")


def _eligible(cands: Sequence[Scored]) -> list[int]:
    done = [i for i, c in enumerate(cands) if c.finish_reason not in UNFINISHED]
    return done or list(range(len(cands)))


def best_of_n(cands: Sequence[Scored]) -> int:
    """Index of the highest trajectory score among finished trajectories (the first one on ties)."""
    if not cands:
        raise ValueError("no candidates to select from")
    return max(_eligible(cands), key=lambda i: (cands[i].score, -i))


def _vote(cands: Sequence[Scored], weight) -> int:
    totals: dict[str, float] = defaultdict(float)
    for i in _eligible(cands):
        c = cands[i]
        if c.answer_key is not None:
            totals[c.answer_key] += weight(c)
    if not totals:
        return best_of_n(cands)
    top = max(totals.values())
    winners = {k for k, v in totals.items() if v == top}
    # Among the candidates that gave the winning answer, return the best-scored one.
    members = [i for i in _eligible(cands) if cands[i].answer_key in winners]
    return max(members, key=lambda i: (cands[i].score, -i))


def majority_vote(cands: Sequence[Scored]) -> int:
    """Most frequent final answer (candidates without one abstain); ties go to the higher score."""
    return _vote(cands, lambda c: 1.0)


def weighted_vote(cands: Sequence[Scored]) -> int:
    """Final answer with the largest sum of trajectory scores."""
    return _vote(cands, lambda c: c.score)


@dataclass(frozen=True)
class AnswerMass:
    """One distinct final answer among N trajectories: how many gave it, and its calibrated mass."""

    answer: str
    count: int
    mass: float | None  # None when the trajectories carry no calibrated confidence


def answer_masses(cands: Sequence[Scored]) -> list[AnswerMass]:
    """Each distinct final answer of the finished trajectories, largest mass (else count) first.

    ``mass(a) = sum(confidence of the trajectories that answered a) / N``, N the number of
    finished trajectories (those without a final answer included). A trajectory's confidence
    estimates the probability that it is right, and a trajectory is right exactly when its
    answer is, so ``mass(a)`` is the expected share of the N trajectories that are right with
    answer ``a``: it is at most the best confidence among them and grows with their number.
    The masses sum to the expected share of right trajectories; the rest of 1 is the share
    expected wrong (or without an answer). None when a trajectory has no confidence.
    """
    idx = _eligible(cands)
    confs = [getattr(cands[i], "confidence", None) for i in idx]
    calibrated = bool(idx) and all(c is not None for c in confs)
    groups: dict[str, list[float]] = defaultdict(list)
    for i, conf in zip(idx, confs):
        if cands[i].answer_key is not None:
            groups[cands[i].answer_key].append(conf if calibrated else 0.0)
    out = [AnswerMass(k, len(v), sum(v) / len(idx) if calibrated else None) for k, v in groups.items()]
    return sorted(out, key=lambda a: (-(a.mass or 0.0), -a.count))


def select(cands: Sequence[Scored], strategy: str = "best") -> int:
    if strategy in ("best", "prune", "beam"):
        return best_of_n(cands)
    if strategy == "majority":
        return majority_vote(cands)
    if strategy in ("weighted", "early-stop"):
        return weighted_vote(cands)
    raise ValueError(f"unknown strategy {strategy!r} (choose from {', '.join(STRATEGIES)})")
