"""Where a trajectory is chosen: best-of-N by SPRM score (the published method) and alternatives."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

# "prune" stops trajectories that fall behind while they run (PruneRule), then picks best-of-N.
STRATEGIES = ("best", "majority", "weighted", "prune")


class Scored(Protocol):
    score: float
    answer_key: str | None
    finish_reason: str


# Trajectories cut short by pruning or cancellation have no answer of their own to offer.
UNFINISHED = ("pruned", "cancelled")


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


def select(cands: Sequence[Scored], strategy: str = "best") -> int:
    if strategy in ("best", "prune"):
        return best_of_n(cands)
    if strategy == "majority":
        return majority_vote(cands)
    if strategy == "weighted":
        return weighted_vote(cands)
    raise ValueError(f"unknown strategy {strategy!r} (choose from {', '.join(STRATEGIES)})")


@dataclass(frozen=True)
class PruneRule:
    """SPRM-guided pruning: stop trajectories whose running score has fallen behind the leaders.

    After every step, a live trajectory with at least ``min_steps`` scored steps is stopped
    when its running score (geometric mean so far) is more than ``margin`` below the best
    running score among trajectories with at least ``min_steps`` steps, as long as ``keep``
    trajectories stay in the race (live or finished). Requiring a few steps first keeps one
    unlucky early step from deciding; comparing with the leader rather than with a fixed
    threshold keeps the rule meaningful whatever the head's calibration.
    """

    min_steps: int = 2
    margin: float = 0.1
    keep: int = 2

    def __call__(self, trajectories: Sequence) -> list[int]:
        ranked = []
        for t in trajectories:
            positions, scores = t.steps()
            if len(scores) >= self.min_steps and t.finish_reason != "pruned":
                ranked.append((t.score(), t))
        if not ranked:
            return []
        leader = max(s for s, _ in ranked)
        in_race = sum(1 for t in trajectories if t.finish_reason != "pruned")
        out = []
        for s, t in sorted(ranked, key=lambda x: x[0]):
            if in_race <= self.keep:
                break
            if t.live and s < leader - self.margin:
                out.append(t.index)
                in_race -= 1
        return out
