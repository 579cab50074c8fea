"""Choosing a trajectory: best-of-N, votes, and pruning."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from edge_ms.select import (
    AnswerMass,
    PruneRule,
    answer_masses,
    best_of_n,
    majority_vote,
    select,
    weighted_vote,
)


@dataclass
class C:
    score: float
    answer_key: str | None
    finish_reason: str = "stop"
    confidence: float | None = None


def test_best_of_n_takes_highest_score_first_on_ties():
    assert best_of_n([C(0.2, "1"), C(0.9, "2"), C(0.9, "3")]) == 1


def test_best_of_n_skips_pruned_unless_nothing_else():
    assert best_of_n([C(0.9, "1", "pruned"), C(0.3, "2", "length")]) == 1
    assert best_of_n([C(0.9, "1", "pruned"), C(0.3, "2", "cancelled")]) == 0


def test_majority_and_weighted_vote_differ():
    cands = [C(0.1, "7"), C(0.1, "7"), C(0.1, "7"), C(0.9, "8"), C(0.8, "8"), C(0.5, None)]
    assert cands[majority_vote(cands)].answer_key == "7"
    assert cands[weighted_vote(cands)].answer_key == "8"
    assert weighted_vote(cands) == 3  # the best-scored member of the winning answer


def test_answer_masses_are_shares_of_the_n_trajectories():
    cands = [C(0.1, "7", confidence=0.2), C(0.1, "7", confidence=0.2), C(0.1, "7", confidence=0.2),
             C(0.9, "8", confidence=0.6), C(0.8, "8", confidence=0.5), C(0.5, None, confidence=0.1),
             C(0.99, "9", "pruned", confidence=0.9)]  # a pruned trajectory has no answer to offer
    # N = 6 finished trajectories, the one without an answer included.
    assert answer_masses(cands) == [AnswerMass("8", 2, pytest.approx(1.1 / 6)), AnswerMass("7", 3, pytest.approx(0.1))]
    # Without calibrated confidences: the counts alone, most frequent first.
    plain = [C(c.score, c.answer_key, c.finish_reason) for c in cands]
    assert answer_masses(plain) == [AnswerMass("7", 3, None), AnswerMass("8", 2, None)]


def test_vote_without_answers_falls_back_to_best():
    assert majority_vote([C(0.2, None), C(0.7, None)]) == 1


def test_unknown_strategy():
    with pytest.raises(ValueError, match="unknown strategy"):
        select([C(0.5, "1")], "random")


@dataclass
class T:
    index: int
    scores: list[float]
    finish_reason: str | None = None
    positions: list[int] = field(default_factory=list)

    @property
    def live(self) -> bool:
        return self.finish_reason is None

    def steps(self):
        return list(range(len(self.scores))), self.scores

    def score(self) -> float:
        from edge_ms.score import trajectory_score

        return trajectory_score(self.scores)


def test_prune_rule_stops_laggards_but_keeps_enough():
    rule = PruneRule(min_steps=2, margin=0.1, keep=2)
    ts = [T(0, [0.9, 0.9]), T(1, [0.2, 0.3]), T(2, [0.85, 0.8]), T(3, [0.1]), T(4, [0.3, 0.2])]
    assert sorted(rule(ts)) == [1, 4]  # 3 has too few steps to judge
    # Never below `keep` trajectories in the race.
    ts = [T(0, [0.9, 0.9]), T(1, [0.2, 0.3])]
    assert rule(ts) == []


def test_pruning_generates_fewer_tokens(converted):
    from edge_ms.reasoner import Reasoner

    r = Reasoner.load(converted("tiny-qwen2", "f32"))
    try:
        plain = r.solve("Sum the numbers.", n=8, seed=1, max_new_tokens=80)
        pruned = r.solve("Sum the numbers.", n=8, seed=1, max_new_tokens=80, strategy="prune")
    finally:
        r.close()
    assert any(c.finish_reason == "pruned" for c in pruned.candidates)
    total = lambda res: sum(len(c.token_ids) for c in res.candidates)  # noqa: E731
    assert total(pruned) < total(plain)
    assert pruned.best.finish_reason != "pruned"


def test_prune_rule_keeps_the_leaders_and_waits_for_enough_scores():
    rule = PruneRule(min_steps=1, margin=0.0, keep=3)
    ts = [T(0, [0.5]), T(1, [0.9]), T(2, [0.3]), T(3, [0.7], "stop"), T(4, [0.6]), T(5, [])]
    # Leaders 0.9, 0.7 (finished: counts, is never pruned), 0.6; 5 has no step yet.
    assert sorted(rule(ts)) == [0, 2]
    assert rule(ts[:2] + ts[5:]) == []  # fewer than `keep` scored: no judgement yet
