"""Where a step is scored: which positions count as reasoning steps, and a trajectory's score.

The rules follow the published MetaStone-S1 evaluation (docs/method.md, section 3):

1. delimiter positions are those holding a step-delimiter token;
2. only the first delimiter of a run counts;
3. a delimiter directly after ``<think>`` does not count;
4. the scored position is the token just before the delimiter;
5. only positions strictly inside the think region are kept, where ``<think>``
   bounds it only if it occurs exactly once (else position 0) and ``</think>``
   only if it occurs exactly once (else the end). A second ``</think>`` therefore
   reopens everything after the first one, retroactively.

Rules 1-4 are local (a token and its predecessor), so the runtime scores every
candidate as soon as its delimiter is sampled; rule 5 is global and is applied
whenever the scores are read. A head whose spec has no think markers (a model
without a think block, such as the embedded default) scores the generated
response instead: positions from the last prompt token on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol


class StepRules(Protocol):
    step_delimiter_ids: tuple[int, ...]
    think_start_id: int | None
    think_end_id: int | None


def starts_step(prev: int | None, token: int, delimiters: frozenset[int], think_start: int | None) -> bool:
    """True when ``token`` is a first-of-run delimiter that does not directly follow ``<think>`` (rules 1-3)."""
    return token in delimiters and prev is not None and prev not in delimiters and prev != think_start


def candidate_positions(ids: Sequence[int], rules: StepRules) -> list[int]:
    """Positions scored by rules 1-4, before the think region is applied."""
    delimiters = frozenset(rules.step_delimiter_ids)
    return [
        p - 1
        for p in range(1, len(ids))
        if starts_step(ids[p - 1], ids[p], delimiters, rules.think_start_id)
    ]


def scoring_region(
    think_starts: Sequence[int], think_ends: Sequence[int], length: int, rules: StepRules, n_prompt: int
) -> tuple[int, int]:
    """The half-open range ``[lo, hi)`` of positions that may be scored (rule 5)."""
    if rules.think_start_id is None and rules.think_end_id is None:
        return max(n_prompt - 1, 0), length
    lo = think_starts[0] + 1 if len(think_starts) == 1 else 1
    hi = think_ends[0] if len(think_ends) == 1 else length
    return lo, hi


def step_positions(ids: Sequence[int], rules: StepRules, n_prompt: int = 0) -> list[int]:
    """All scored positions of a full token sequence (prompt + response), rules 1-5."""
    starts = [i for i, t in enumerate(ids) if t == rules.think_start_id]
    ends = [i for i, t in enumerate(ids) if t == rules.think_end_id]
    lo, hi = scoring_region(starts, ends, len(ids), rules, n_prompt)
    return [q for q in candidate_positions(ids, rules) if lo <= q < hi]


def trajectory_score(step_scores: Sequence[float]) -> float:
    """Geometric mean of the step scores, each clamped to >= 1e-10; 0 when there is no step."""
    if not step_scores:
        return 0.0
    return math.exp(sum(math.log(max(s, 1e-10)) for s in step_scores) / len(step_scores))


@dataclass
class StepTracker:
    """Incremental rules 1-5 for one growing sequence.

    Candidates (rules 1-4) are recorded with their score when their delimiter
    appears; the think region (rule 5) is re-applied on every read, which is
    what makes a late second ``</think>`` reopen earlier steps.
    """

    rules: StepRules
    n_prompt: int
    length: int = 0
    candidates: list[tuple[int, float]] = field(default_factory=list)
    think_starts: list[int] = field(default_factory=list)
    think_ends: list[int] = field(default_factory=list)
    last_token: int | None = None  # the token at position length - 1

    def add_token(self, token: int) -> None:
        """Record the token at position ``self.length``."""
        self.last_token = token
        if token == self.rules.think_start_id:
            self.think_starts.append(self.length)
        if token == self.rules.think_end_id:
            self.think_ends.append(self.length)
        self.length += 1

    def copy(self) -> StepTracker:
        """An independent tracker with the same history (a fork of the sequence)."""
        return replace(self, candidates=list(self.candidates), think_starts=list(self.think_starts),
                       think_ends=list(self.think_ends))

    def add_candidate(self, position: int, score: float) -> None:
        self.candidates.append((position, score))

    def steps(self) -> tuple[list[int], list[float]]:
        """Scored positions and their scores under rule 5, as the sequence stands now."""
        lo, hi = scoring_region(self.think_starts, self.think_ends, self.length, self.rules, self.n_prompt)
        kept = [(q, s) for q, s in self.candidates if lo <= q < hi]
        return [q for q, _ in kept], [s for _, s in kept]

    def score(self) -> float:
        return trajectory_score(self.steps()[1])
