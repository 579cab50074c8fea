"""The step rules (docs/method.md, section 3) against the reference outputs made with PyTorch."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from edge_ms.score import StepTracker, candidate_positions, step_positions, trajectory_score


@dataclass(frozen=True)
class Rules:
    step_delimiter_ids: tuple[int, ...] = (9,)
    think_start_id: int | None = 1
    think_end_id: int | None = 2


R = Rules()


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-qwen2-sharded"])
def test_positions_match_reference_texts(reference_json, name):
    ref = reference_json(name)
    spec = ref["spec"]
    rules = Rules(tuple(spec["step_delimiter_ids"]), spec["think_start_id"], spec["think_end_id"])
    for text_name, ids, expected in zip(ref["names"], ref["ids"], ref["step_positions"]):
        assert step_positions(ids, rules) == expected, text_name


def test_first_of_run_and_shift():
    # x: 0 1(<think>) 5 9 9 5 9 2(</think>) 5 9
    ids = [0, 1, 5, 9, 9, 5, 9, 2, 5, 9]
    assert candidate_positions(ids, R) == [2, 5, 8]
    assert step_positions(ids, R) == [2, 5]  # 8 is after </think>


def test_delimiter_right_after_think_is_dropped():
    assert step_positions([0, 1, 9, 5, 9, 2], R) == [3]


def test_second_think_end_reopens_scoring():
    ids = [0, 1, 5, 9, 2, 5, 9]
    assert step_positions(ids, R) == [2]
    assert step_positions(ids + [2, 5, 9], R) == [2, 5, 8]


def test_two_think_starts_open_from_position_one():
    ids = [0, 5, 9, 1, 5, 9, 1, 5, 9]
    assert step_positions(ids, R) == [1, 4, 7]


def test_tracker_equals_full_rules_at_every_length():
    ids = [0, 5, 9, 1, 9, 5, 9, 9, 2, 5, 9, 2, 5, 9, 1]
    tracker = StepTracker(R, n_prompt=3)
    for p, tok in enumerate(ids):
        if p and tok in R.step_delimiter_ids and ids[p - 1] not in R.step_delimiter_ids and ids[p - 1] != 1:
            tracker.add_candidate(p - 1, 0.5)
        tracker.add_token(tok)
        assert tracker.steps()[0] == step_positions(ids[: p + 1], R)


def test_response_region_without_think_markers():
    rules = Rules((9,), None, None)
    ids = [5, 9, 5, 5, 9, 5, 9]  # prompt = first 4 tokens
    assert step_positions(ids, rules, n_prompt=4) == [3, 5]


def test_trajectory_score_is_clamped_geometric_mean():
    assert trajectory_score([]) == 0.0
    assert trajectory_score([0.25, 1.0]) == pytest.approx(0.5)
    assert trajectory_score([0.0, 1.0]) == pytest.approx(1e-5)


def test_reference_trajectory_scores(reference_json):
    ref = reference_json()
    for scores, expected in zip(ref["step_scores"], ref["trajectory_score"]):
        assert trajectory_score(scores) == pytest.approx(expected, rel=1e-6)


def test_hand_worked_rule_cases():
    import json
    from pathlib import Path

    data = json.loads((Path(__file__).parent / "fixtures" / "reference" / "step_rules.json").read_text())
    rules = Rules(tuple(data["step_delimiter_ids"]), data["think_start_id"], data["think_end_id"])
    for case in data["cases"]:
        assert step_positions(case["ids"], rules) == case["step_positions"], case.get("name")
