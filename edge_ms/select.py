"""Where a trajectory is chosen: best-of-N by SPRM score (the published method) and alternatives."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Protocol

STRATEGIES = ("best", "majority", "weighted")


class Scored(Protocol):
    score: float
    answer_key: str | None


def best_of_n(cands: Sequence[Scored]) -> int:
    """Index of the highest trajectory score (the first one on ties)."""
    if not cands:
        raise ValueError("no candidates to select from")
    return max(range(len(cands)), key=lambda i: (cands[i].score, -i))


def _vote(cands: Sequence[Scored], weight) -> int:
    totals: dict[str, float] = defaultdict(float)
    for c in cands:
        if c.answer_key is not None:
            totals[c.answer_key] += weight(c)
    if not totals:
        return best_of_n(cands)
    top = max(totals.values())
    winners = {k for k, v in totals.items() if v == top}
    # Among the candidates that gave the winning answer, return the best-scored one.
    members = [i for i, c in enumerate(cands) if c.answer_key in winners]
    return max(members, key=lambda i: (cands[i].score, -i))


def majority_vote(cands: Sequence[Scored]) -> int:
    """Most frequent final answer (candidates without one abstain); ties go to the higher score."""
    return _vote(cands, lambda c: 1.0)


def weighted_vote(cands: Sequence[Scored]) -> int:
    """Final answer with the largest sum of trajectory scores."""
    return _vote(cands, lambda c: c.score)


def select(cands: Sequence[Scored], strategy: str = "best") -> int:
    if strategy == "best":
        return best_of_n(cands)
    if strategy == "majority":
        return majority_vote(cands)
    if strategy == "weighted":
        return weighted_vote(cands)
    raise ValueError(f"unknown strategy {strategy!r} (choose from {', '.join(STRATEGIES)})")
