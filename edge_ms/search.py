"""Search while trajectories grow: which to stop, which to fork, and when the answer is settled.

A search policy is what ``Engine.generate`` consults after every round in which a step was
scored or a trajectory finished. It sees every trajectory of the run (live, finished, stopped,
forks included) and how many of the N sequence slots are free, and returns a :class:`Decision`:
live trajectories to stop now, live trajectories to fork into free slots, and how many fresh
trajectories to start there. A fork shares its parent's KV cells (``llama_memory_seq_cp``),
copies its tokens, step scores and sampler history, and draws its next token from the
parent's logits with its own seed, so its step positions and scores are exactly those of its
prefix plus its own. A fresh start is what a plain run's trajectory of that index would be.

Three policies; the choice of a final trajectory stays in :mod:`edge_ms.select`:

- :class:`PruneRule` (``--strategy prune``): stop trajectories that fall behind; no refill.
- :class:`BeamSearch` (``--strategy beam``): compare trajectories at equal depth (number of
  scored steps), stop those below the beam, refill their slots by forking the best.
- :class:`EarlyStop` (``--strategy early-stop``): end every live trajectory once the
  SPRM-weighted vote among the finished ones can no longer be overturned; optionally in
  waves, fewer sequences than trajectories, starting fresh ones only while the vote is open.

Finish reasons: a trajectory stopped by pruning or beam search ends ``"pruned"``, one ended
by early stop ``"early-stop"``; neither is ever selected (``select.UNFINISHED``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from edge_ms.answers import extract_answer
from edge_ms.score import trajectory_score
from edge_ms.select import UNFINISHED

PRUNED = "pruned"
EARLY_STOP = "early-stop"


class Partial(Protocol):
    """What a policy reads of a trajectory (``engine.Trajectory`` is one)."""

    index: int
    finish_reason: str | None
    parent: int | None

    @property
    def live(self) -> bool: ...

    def steps(self) -> tuple[list[int], list[float]]: ...

    def score(self) -> float: ...

    def decoded(self) -> str: ...

    def ends_step(self) -> bool: ...


@dataclass(frozen=True)
class Decision:
    """Live trajectories to stop (with ``reason``); parents to fork into free slots, in order; then
    how many fresh trajectories to start from the prompt in the slots left."""

    stop: tuple[int, ...] = ()
    fork: tuple[int, ...] = ()
    reason: str = PRUNED
    spawn: int = 0


# A search policy: (every trajectory so far, free sequence slots) -> Decision.
SearchPolicy = Callable[[Sequence[Partial], int], Decision]


@dataclass(frozen=True)
class PruneRule:
    """SPRM-guided pruning: stop trajectories whose running score has fallen behind the leaders.

    After every step, the trajectories with at least ``min_steps`` scored steps (and not
    pruned) are ranked by running score (the geometric mean so far, what best-of-N will
    compare at the end); a live one is stopped when it is more than ``margin`` below the
    ``keep``-th best. So the ``keep`` leaders always stay in the race, and a trajectory is cut
    as soon as its own steps say it is unlikely to be picked. Ranking against the leaders
    rather than a fixed threshold keeps the rule meaningful whatever the head's calibration;
    ``min_steps`` keeps one unlucky early step from deciding on long reasoning, and can be 1
    where a whole solution is a few steps (the arithmetic task). Freed slots stay empty.
    """

    min_steps: int = 2
    margin: float = 0.1
    keep: int = 2

    def __call__(self, trajectories: Sequence[Partial], free: int = 0) -> Decision:
        ranked = []
        for t in trajectories:
            positions, scores = t.steps()
            if len(scores) >= self.min_steps and t.finish_reason != PRUNED:
                ranked.append((t.score(), t))
        if len(ranked) < max(self.keep, 1):
            return Decision()
        bar = sorted((s for s, _ in ranked), reverse=True)[max(self.keep, 1) - 1] - self.margin
        return Decision(stop=tuple(t.index for s, t in ranked if t.live and s < bar))


def _depth_table(trajectories: Sequence[Partial]) -> dict[int, list[float]]:
    """For each depth d, the running scores after d steps of every distinct prefix that reached it, best first.

    A fork and its parent share their first steps; that prefix counts once.
    """
    seen: dict[int, dict[tuple, float]] = defaultdict(dict)
    for t in trajectories:
        positions, scores = t.steps()
        for d in range(1, len(scores) + 1):
            seen[d].setdefault(tuple(zip(positions[:d], scores[:d])), trajectory_score(scores[:d]))
    return {d: sorted(prefixes.values(), reverse=True) for d, prefixes in seen.items()}


@dataclass(frozen=True)
class BeamSearch:
    """Step-level beam search that keeps the N sequence slots busy.

    Sequences reach step boundaries at different times, so trajectories are compared at
    equal depth: one that has completed d scored steps is ranked by its running score after
    d steps against every distinct prefix that reached depth d (live, finished or stopped
    since). A live trajectory more than ``margin`` below the ``width``-th best at its depth is
    stopped (``"pruned"``), once at least ``width`` + 1 prefixes have reached that depth; the
    ``width`` best at each depth are never stopped. Each slot so freed is refilled by forking
    a live trajectory that is among the ``width`` best at its depth: the shallowest (most of
    its solution still to diversify), then the one with the fewest children (so the beam keeps
    several prefixes alive rather than N copies of one), then the better ranked, then one that
    has just ended a step (its fork starts a step of its own). Slots freed by trajectories that
    finish on their own are not refilled, so the search samples no more than its stops saved.
    ``min_steps``: the depth from which a trajectory is judged (1 where a solution is a few steps).
    """

    width: int = 2
    min_steps: int = 1
    margin: float = 0.0
    # It forks sequences: free in one unified KV pool, a whole-buffer copy between streams
    # (edge_ms.plan.auto_layout reads this).
    forks = True

    def __call__(self, trajectories: Sequence[Partial], free: int) -> Decision:
        table = _depth_table(trajectories)
        rank: dict[int, tuple[int, int]] = {}  # live trajectory -> (its depth, its rank there)
        stop, parents = [], []
        for t in trajectories:
            depth = len(t.steps()[1])
            if not t.live or depth < self.min_steps:
                continue
            peers, mine = table[depth], t.score()
            rank[t.index] = (depth, peers.index(mine))
            if len(peers) > self.width and mine < peers[self.width - 1] - self.margin:
                stop.append(t.index)
            elif rank[t.index][1] < self.width:
                parents.append(t)
        stopped = sum(t.finish_reason == PRUNED for t in trajectories) + len(stop)
        owed = min(stopped - sum(t.parent is not None for t in trajectories), free + len(stop))
        if owed <= 0 or not parents:
            return Decision(stop=tuple(stop))
        children = defaultdict(int)
        for t in trajectories:
            if t.parent is not None:
                children[t.parent] += 1
        fork = []
        for _ in range(owed):
            p = min(parents, key=lambda t: (rank[t.index][0], children[t.index], rank[t.index][1],
                                            not t.ends_step(), t.index))
            children[p.index] += 1
            fork.append(p.index)
        return Decision(stop=tuple(stop), fork=tuple(fork))


@dataclass(frozen=True)
class EarlyStop:
    """End the run once the SPRM-weighted vote is settled; the live trajectories stop at once.

    Finished trajectories vote for their final answer with their score (what
    ``select.weighted_vote`` sums). A live trajectory may still bring at most the larger of its
    running score and ``reach`` times the best score of a finished one: a bound, not a
    certainty, since a later step can lift a running score, but one that holds as long as no
    live trajectory ends better than the best finished one (``reach`` = 1). The run ends
    (``"early-stop"``) when at least ``min_agree`` finished trajectories give the leading
    answer and its weight exceeds the runner-up's by more than all the live ones could bring.

    With ``total``, the run has fewer sequences than ``total`` trajectories and goes in
    waves: once every trajectory of a wave has ended and the vote is still open, a new wave
    fills the free sequences with fresh trajectories, until ``total`` have started; the ones
    not started yet count as live ones without a step. All started at once, trajectories tend
    to finish together and an early stop saves only their tails; in waves, the later ones are
    never sampled when the first settle the vote (at the price of waiting for each wave).
    ``answer_of``: a finished trajectory's answer key (default: the last "The answer is N" or
    \\boxed{} of its text; the Reasoner passes its own, which reads past ``</think>``).
    """

    min_agree: int = 2
    reach: float = 1.0
    total: int | None = None
    answer_of: Callable[[Partial], str | None] | None = None

    def __call__(self, trajectories: Sequence[Partial], free: int = 0) -> Decision:
        live = [t for t in trajectories if t.live]
        done = [t for t in trajectories if not t.live and t.finish_reason not in UNFINISHED]
        unstarted = max(0, (self.total or 0) - len(trajectories))
        more = Decision(spawn=0 if live else min(free, unstarted))
        if not (live or unstarted) or not done:
            return more
        answer_of = self.answer_of or (lambda t: extract_answer(t.decoded()))
        weight: dict[str, float] = defaultdict(float)
        votes: dict[str, int] = defaultdict(int)
        for t in done:
            key = answer_of(t)
            if key is not None:
                weight[key] += t.score()
                votes[key] += 1
        if not weight:
            return more
        ranked = sorted(weight.items(), key=lambda kv: kv[1], reverse=True)
        lead_key, lead = ranked[0]
        runner_up = ranked[1][1] if len(ranked) > 1 else 0.0
        ceiling = self.reach * max(t.score() for t in done)
        at_stake = sum(max(t.score(), ceiling) for t in live) + unstarted * ceiling
        if votes[lead_key] >= self.min_agree and lead - runner_up > at_stake:
            return Decision(stop=tuple(t.index for t in live), reason=EARLY_STOP)
        return more
