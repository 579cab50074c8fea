"""Choosing a trajectory: best-of-N and votes, and what the search strategies pick with."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from edge_ms.select import (
    AnswerMass,
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


def test_stopped_trajectories_are_never_chosen_by_a_search_strategy():
    cands = [C(0.9, "1", "early-stop"), C(0.95, "1", "pruned"), C(0.2, "2"), C(0.1, "3")]
    assert select(cands, "beam") == 2
    assert select(cands, "early-stop") == 2  # the weighted vote of the finished ones only
    assert select([C(0.2, "4"), C(0.3, "5"), C(0.25, "5")], "early-stop") == 1


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
