"""Search while trajectories grow: pruning, beam search with forks, early stop.

The policies are checked on hand-made trajectories; the engine's forks against the published
second pass in PyTorch (tests/reference.py), as a linear trajectory is in tests/test_engine.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
import reference

from edge_ms.engine import Stats
from edge_ms.reasoner import Reasoner
from edge_ms.sampling import SamplingParams
from edge_ms.score import trajectory_score
from edge_ms.search import BeamSearch, Decision, EarlyStop, PruneRule
from edge_ms.select import best_of_n

FIXTURES = Path(__file__).parent / "fixtures"
SPEC_KEYS = ("step_delimiter_ids", "think_start_id", "think_end_id")


@dataclass
class T:
    """A trajectory as a policy sees it."""

    index: int
    scores: list[float]
    finish_reason: str | None = None
    parent: int | None = None
    answer: str | None = None
    boundary: bool = False
    positions: list[int] = field(default_factory=list)

    @property
    def live(self) -> bool:
        return self.finish_reason is None

    def steps(self):
        return (self.positions or [10 * (i + 1) for i in range(len(self.scores))]), self.scores

    def score(self) -> float:
        return trajectory_score(self.scores)

    def decoded(self) -> str:
        return f"The answer is {self.answer}." if self.answer is not None else "no answer"

    def ends_step(self) -> bool:
        return self.boundary


# -- the policies on hand-made trajectories ------------------------------------------


def test_prune_rule_stops_laggards_but_keeps_enough():
    rule = PruneRule(min_steps=2, margin=0.1, keep=2)
    ts = [T(0, [0.9, 0.9]), T(1, [0.2, 0.3]), T(2, [0.85, 0.8]), T(3, [0.1]), T(4, [0.3, 0.2])]
    assert sorted(rule(ts, 0).stop) == [1, 4]  # 3 has too few steps to judge
    assert rule(ts, 0).fork == ()  # pruning never refills
    # Never below `keep` trajectories in the race.
    ts = [T(0, [0.9, 0.9]), T(1, [0.2, 0.3])]
    assert rule(ts, 0) == Decision()


def test_prune_rule_keeps_the_leaders_and_waits_for_enough_scores():
    rule = PruneRule(min_steps=1, margin=0.0, keep=3)
    ts = [T(0, [0.5]), T(1, [0.9]), T(2, [0.3]), T(3, [0.7], "stop"), T(4, [0.6]), T(5, [])]
    # Leaders 0.9, 0.7 (finished: counts, is never pruned), 0.6; 5 has no step yet.
    assert sorted(rule(ts, 0).stop) == [0, 2]
    assert rule(ts[:2] + ts[5:], 0).stop == ()  # fewer than `keep` scored: no judgement yet


def test_beam_compares_trajectories_at_equal_depth_and_refills_from_the_best():
    beam = BeamSearch(width=2)
    ts = [
        T(0, [0.9], boundary=True),
        T(1, [0.8]),
        T(2, [0.3], boundary=True),
        # Two steps: 0.1 then 0.9, running score 0.3. PruneRule would cut it (0.3 < 0.8); at
        # depth 2 it is alone, and at depth 1 (0.1) it is judged no more: it moved on.
        T(3, [0.1, 0.9]),
        T(4, [], boundary=False),  # no step yet: not judged
    ]
    d = beam(ts, 0)
    assert d.stop == (2,) and d.reason == "pruned"
    assert d.fork == (0,)  # the best at the shallowest depth refills the freed slot
    assert PruneRule(min_steps=1, margin=0.0, keep=2)(ts, 0).stop == (2, 3)


def test_beam_spreads_forks_over_the_beam_and_counts_shared_prefixes_once():
    beam = BeamSearch(width=2)
    ts = [T(0, [0.9], boundary=True), T(1, [0.8], boundary=True), T(2, [0.2]), T(3, [0.1]), T(4, [0.05])]
    d = beam(ts, 0)
    assert sorted(d.stop) == [2, 3, 4]
    assert sorted(d.fork) == [0, 0, 1]  # fewest children first, then the better ranked
    # After the forks: children share their parent's step, so depth 1 holds 0.9, 0.8 and
    # the stopped 0.2 / 0.1 / 0.05 once each; nothing owed, nothing more to stop.
    after = [T(i, t.scores, "pruned") if i >= 2 else t for i, t in enumerate(ts)]
    after += [T(5, [0.9], parent=0), T(6, [0.9], parent=0), T(7, [0.8], parent=1)]
    for t in after[5:]:
        t.positions = [10]
    assert beam(after, 0) == Decision()


def test_beam_does_not_refill_slots_of_trajectories_that_finished_on_their_own():
    beam = BeamSearch(width=1)
    ts = [T(0, [0.9], "stop"), T(1, [0.8], "length"), T(2, [0.95], boundary=True)]
    assert beam(ts, 2) == Decision()


def test_early_stop_waits_until_the_weighted_vote_cannot_be_overturned():
    rule = EarlyStop(min_agree=2, reach=1.0)
    done = [T(0, [0.8], "stop", answer="7"), T(1, [0.7], "stop", answer="7"), T(2, [0.6], "stop", answer="5")]
    # Lead 1.5 over 0.6: one live trajectory may still bring at most the best finished score, 0.8.
    d = rule(done + [T(3, [0.1])], 1)
    assert d.stop == (3,) and d.reason == "early-stop"
    # Two live ones could bring 1.6 > 0.9: not settled yet.
    assert rule(done + [T(3, [0.1]), T(4, [])], 0) == Decision()
    # A live trajectory already scoring above the best finished one counts with its own score.
    assert rule(done + [T(3, [0.95, 0.99])], 1) == Decision()
    # One finished answer is not agreement, however strong.
    assert rule([T(0, [0.9], "stop", answer="7"), T(1, [0.01])], 1) == Decision()
    # Stopped trajectories do not vote.
    assert rule([T(0, [0.9], "pruned", answer="7"), T(1, [0.9], "pruned", answer="7"), T(2, [0.1])], 1) == Decision()
    assert EarlyStop(min_agree=2, reach=0.1)(done + [T(3, [0.1]), T(4, [])], 0).stop == (3, 4)


def test_early_stop_in_waves_starts_fresh_trajectories_while_the_vote_is_open():
    rule = EarlyStop(min_agree=2, reach=0.5, total=8)
    wave = [T(0, [0.8], "stop", answer="7"), T(1, [0.7], "stop", answer="7"), T(2, [0.1]), T(3, [0.2])]
    # Lead 1.5; the two live ones may bring 0.4 each: settled, unless 4 more are still to start.
    assert EarlyStop(min_agree=2, reach=0.5)(wave, 2) == Decision(stop=(2, 3), reason="early-stop")
    assert rule(wave, 2) == Decision()  # open, but the wave is still running: wait for it
    ended = wave[:2] + [T(2, [0.1], "stop", answer="5"), T(3, [0.2], "length")]
    assert rule(ended, 4) == Decision(spawn=4)  # the wave is over and the vote open: the next wave
    # Settled even counting the ones not started: none of them ever is.
    assert EarlyStop(min_agree=2, reach=0.1, total=8)(wave, 2) == Decision(stop=(2, 3), reason="early-stop")
    settled = EarlyStop(min_agree=2, reach=0.1, total=8)(ended, 4)
    assert settled.stop == () and settled.spawn == 0  # nothing live to stop, no next wave
    assert rule(ended + [T(i, [0.5]) for i in range(4, 8)], 0) == Decision()  # all 8 started


# -- forks in the engine ----------------------------------------------------------------


@pytest.fixture(scope="module")
def torch_side():
    return reference.load_model(FIXTURES / "tiny-qwen2")


@pytest.mark.parametrize("quant,tol", [("f32", 2e-3), ("f16", 2e-2)])
def test_forks_are_scored_as_the_second_pass_scores_them(converted, torch_side, quant, tol):
    model, _, head = torch_side
    r = Reasoner.load(converted("tiny-qwen2", quant))
    try:
        res = r.solve("Compute 12 * 7 step by step.", n=8, seed=11, max_new_tokens=80, strategy="beam")
    finally:
        r.close()
    forks = [c for c in res.candidates if c.parent is not None]
    assert len(forks) >= 3 and len(res.candidates) == res.n + len(forks)
    assert any(c.parent is not None for c in forks if res.candidates[c.parent].parent is not None), "forks of forks"
    spec = {k: getattr(r.head.spec, k) for k in SPEC_KEYS}
    ref_scores = []
    for cand in res.candidates:  # every trajectory, stopped ones and forks included
        if cand.parent is not None:
            parent = res.candidates[cand.parent]
            assert cand.token_ids[: cand.fork_at] == parent.token_ids[: cand.fork_at]
        ref = reference.score_sequence(model, head, res.prompt_token_ids + cand.token_ids, spec)
        assert cand.step_positions == ref["step_positions"]
        assert cand.step_scores == pytest.approx(ref["step_scores"], abs=tol)
        assert cand.score == pytest.approx(ref["score"], abs=tol)
        ref_scores.append(ref["score"])
    assert sum(len(c.token_ids) - (c.fork_at or 0) for c in res.candidates) == res.stats.generated_tokens

    @dataclass
    class Ref:
        score: float
        finish_reason: str
        answer_key: None = None

    assert res.best.finish_reason != "pruned"
    assert res.selected == best_of_n([Ref(s, c.finish_reason) for s, c in zip(ref_scores, res.candidates)])


class ForkOnce:
    """Stop trajectory 1 at its first step and fork trajectory 0 into its slot, once."""

    def __init__(self) -> None:
        self.trajectories = None

    def __call__(self, trajectories, free):
        self.trajectories = trajectories
        if len(trajectories) > 2 or not trajectories[1].live or not trajectories[1].steps()[1]:
            return Decision()
        return Decision(stop=(1,), fork=(0,))


def _greedy(engine, ids, n, policy=None, max_new_tokens=60):
    # A strong repetition penalty: a fork must carry its parent's penalty window to write the same.
    params = SamplingParams(seed=3, max_new_tokens=max_new_tokens, temperature=0.0, repetition_penalty=1.5)
    return next(ev for ev in engine.generate(ids, n, params, policy=policy) if ev.kind == "done").trajectories


def test_a_fork_continues_exactly_as_its_parent_would_have(converted):
    r = Reasoner.load(converted("tiny-qwen2", "f32"))
    try:
        ids = r.prompt_ids("Compute 12 * 7 step by step.")
        linear = _greedy(r.engine, ids, 1)[0]
        trajs = _greedy(r.engine, ids, 2, ForkOnce())
    finally:
        r.close()
    parent, stopped, child = trajs
    assert stopped.finish_reason == "pruned" and child.parent == 0 and child.seq == 1
    assert 0 < child.fork_at < len(child.tokens)
    # Greedy: from the same cells and logits, the fork writes what its parent wrote, and both
    # what a single trajectory writes alone; so do their step positions and scores.
    assert child.tokens == parent.tokens == linear.tokens
    for t in (child, parent):
        assert t.steps()[0] == linear.steps()[0]
        assert t.steps()[1] == pytest.approx(linear.steps()[1], abs=1e-4)


class Recorder:
    """BeamSearch, recording the logits every live trajectory samples from, at the start of each round."""

    def __init__(self, engine) -> None:
        self.engine, self.beam, self.trajectories, self.logits = engine, BeamSearch(width=2), None, {}

    def __call__(self, trajectories, free):
        self.trajectories = trajectories
        return self.beam(trajectories, free)

    def before_round(self) -> bool:
        n_vocab = self.engine.model.n_vocab
        for t in self.trajectories or []:
            if t.live:  # these logits give token number len(t.tokens) of t
                row = llama_cpp.llama_get_logits_ith(self.engine._ctx, t.i_batch)
                self.logits[(t.index, len(t.tokens))] = np.ctypeslib.as_array(row, shape=(n_vocab,)).copy()
        return False


def test_fork_logits_equal_a_fresh_decode_of_the_prefix(converted, torch_side):
    model, _, _ = torch_side
    r = Reasoner.load(converted("tiny-qwen2", "f32"))
    rec = Recorder(r.engine)
    try:
        ids = r.prompt_ids("Compute 12 * 7 step by step.")
        params = SamplingParams(seed=11, max_new_tokens=60)
        trajs = next(ev for ev in r.engine.generate(ids, 6, params, policy=rec, should_stop=rec.before_round)
                     if ev.kind == "done").trajectories
    finally:
        r.close()
    forks = [t for t in trajs if t.parent is not None]
    assert forks
    checked = 0
    for t in forks:
        _, logits = reference.hidden_and_logits(model, ids + t.tokens)
        mine = sorted(k for (i, k) in rec.logits if i == t.index)
        first = mine[0]
        # Its first token is drawn from its parent's logits for that same position...
        if (t.parent, first) in rec.logits:
            assert np.array_equal(rec.logits[(t.index, first)], rec.logits[(t.parent, first)])
        # ... and every one after from its own cells: what a fresh pass over the prefix computes.
        for k in mine:
            want = logits[len(ids) + k - 1]
            assert np.abs(rec.logits[(t.index, k)] - want).max() < 2e-3 * max(1.0, np.abs(want).max())
            checked += 1
    assert checked >= 20


def test_cancelling_mid_search_frees_every_cell(converted):
    r = Reasoner.load(converted("tiny-qwen2", "f32"))
    seen = []
    try:
        ids = r.prompt_ids("Compute 12 * 7 step by step.")
        params = SamplingParams(seed=11, max_new_tokens=200)
        stop_after_forks = lambda: sum(e.kind == "fork" for e in seen) >= 3  # noqa: E731
        for ev in r.engine.generate(ids, 6, params, policy=BeamSearch(width=2), should_stop=stop_after_forks):
            seen.append(ev)
        mem = llama_cpp.llama_get_memory(r.engine._ctx)
        held = [llama_cpp.llama_memory_seq_pos_max(mem, s) for s in range(6)]
        trajs = seen[-1].trajectories
        # The engine is usable again, from a fresh prompt decode.
        stats = Stats()
        again = [ev for ev in r.engine.generate(ids, 2, params, stats=stats)][-1].trajectories
    finally:
        r.close()
    assert held == [-1] * 6
    assert {t.finish_reason for t in trajs} >= {"cancelled"} and not any(t.live for t in trajs)
    assert all(t.sampler is None for t in trajs)
    assert len(trajs) > 6 and stats.reused_prompt_tokens == 0
    assert all(t.finish_reason in ("stop", "length") for t in again)


def test_early_stop_ends_the_live_trajectories_at_once_and_frees_their_cells(converted):
    r = Reasoner.load(converted("tiny-qwen2", "f32"))
    # The fixture writes no final answers: every finished trajectory votes for one, so the
    # run is settled once enough of them have finished with enough weight.
    rule = EarlyStop(min_agree=2, reach=0.5, answer_of=lambda t: "same")
    held, events = {}, []
    try:
        ids = r.prompt_ids("Compute 12 * 7 step by step.")
        params = SamplingParams(seed=10, max_new_tokens=120)
        plain = next(ev for ev in r.engine.generate(ids, 8, params) if ev.kind == "done").trajectories
        box = {}

        def policy(trajectories, free):
            box["t"] = trajectories
            return rule(trajectories, free)

        mem = llama_cpp.llama_get_memory(r.engine._ctx)
        for ev in r.engine.generate(ids, 8, params, policy=policy):
            events.append(ev)
            if ev.kind == "finish" and ev.finish_reason == "early-stop":
                held[ev.index] = llama_cpp.llama_memory_seq_pos_max(mem, box["t"][ev.index].seq)
    finally:
        r.close()
    trajs = events[-1].trajectories
    stopped = [i for i, t in enumerate(trajs) if t.finish_reason == "early-stop"]
    assert stopped and len(trajs) == 8
    assert held == {i: len(ids) - 1 for i in stopped}  # only the shared prompt is left
    first = next(k for k, ev in enumerate(events) if ev.finish_reason == "early-stop")
    assert not any(ev.kind == "token" for ev in events[first:])  # they stopped in the same round
    for t, p in zip(trajs, plain):  # the same run up to the stop: a prefix of the plain one
        assert t.tokens == p.tokens[: len(t.tokens)]
    assert sum(len(t.tokens) for t in trajs) < sum(len(t.tokens) for t in plain)


def test_a_fresh_start_in_a_freed_sequence_is_the_trajectory_a_plain_run_samples(converted, torch_side):
    model, _, head = torch_side
    r = Reasoner.load(converted("tiny-qwen2", "f32"))
    waves = EarlyStop(total=8, answer_of=lambda t: None)  # never settles: all 8 run, 3 at a time
    try:
        ids = r.prompt_ids("Compute 12 * 7 step by step.")
        # A seed whose tokens no batch-composition noise flips on the fixture (3 sequences decode
        # in other batches than 8, which moves logits by ~1e-5 and can flip a near tie).
        params = SamplingParams(seed=3, max_new_tokens=60)
        plain = next(ev for ev in r.engine.generate(ids, 8, params) if ev.kind == "done").trajectories
        events = list(r.engine.generate(ids, 3, params, policy=waves))
    finally:
        r.close()
    trajs = events[-1].trajectories
    assert [ev.index for ev in events if ev.kind == "start"] == list(range(3, 8))
    assert all(t.finish_reason in ("stop", "length") for t in trajs) and {t.seq for t in trajs} == {0, 1, 2}
    spec = {k: getattr(r.head.spec, k) for k in SPEC_KEYS}
    for t, p in zip(trajs, plain):  # same seed, same history, same prompt state
        assert t.tokens == p.tokens
        ref = reference.score_sequence(model, head, ids + t.tokens, spec)
        assert t.steps()[0] == ref["step_positions"]
        assert t.steps()[1] == pytest.approx(ref["step_scores"], abs=2e-3)


def test_pruning_generates_fewer_tokens(converted):
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


def test_strategy_options_are_checked(converted):
    from edge_ms.errors import EdgeMSError

    r = Reasoner.load(converted("tiny-qwen2", "f32"))
    try:
        with pytest.raises(EdgeMSError, match="--beam-width 9: must be from 1 to N = 8"):
            r.solve("Hi", n=8, strategy="beam", beam_width=9, max_new_tokens=4)
        with pytest.raises(EdgeMSError, match="only for --strategy beam"):
            r.solve("Hi", n=8, strategy="best", beam_width=2, max_new_tokens=4)
    finally:
        r.close()
