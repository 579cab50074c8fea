"""The Python API: ``Reasoner.load(model).solve(prompt, mode="medium")``."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edge_ms.answers import extract_answer
from edge_ms.engine import Engine, Event, Stats, Trajectory
from edge_ms.errors import EdgeMSError, fail
from edge_ms.head import Head, check_backbone, load_head
from edge_ms.model import DeviceSettings, Model
from edge_ms.modes import resolve_n
from edge_ms.plan import DEFAULT_BUDGET_FRACTION, ENGINE_BATCH, available_memory
from edge_ms.sampling import SamplingParams
from edge_ms.search import BeamSearch, EarlyStop, PruneRule, SearchPolicy
from edge_ms.select import STRATEGIES, AnswerMass, answer_masses, select
from edge_ms.sizes import human_size
from edge_ms.store import locate
from edge_ms.tasks import check_prompt_style, styled_messages

# The embedded default is a 135M demo model: its head was trained and calibrated on questions
# posed in the few-shot arithmetic chat, so plain questions are posed that way too.
DEFAULT_MODEL_PROMPT_STYLE = "arith"

# Early stop's setting, chosen on the validation split of benchmarks/bench_search.py (20 problems:
# all N at once; in waves of N / 2 it sampled 10-22% fewer tokens there but lost one answer in 20).
EARLY_STOP_DEFAULTS = {"min_agree": 2, "reach": 0.25}


@dataclass
class Candidate:
    """One finished trajectory."""

    index: int
    text: str
    token_ids: list[int]
    step_positions: list[int]
    step_scores: list[float]
    score: float
    finish_reason: str
    reasoning: str = ""
    answer: str = ""
    answer_key: str | None = None  # normalised final answer, for voting
    confidence: float | None = None  # calibrated P(answer right); None when the head has no calibration
    # A fork (edge_ms.search): the candidate it was forked from, and how many of its first
    # tokens it shares with that parent (generated once, by the parent).
    parent: int | None = None
    fork_at: int | None = None

    def to_json(self) -> dict:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "step_positions": self.step_positions,
            "step_scores": self.step_scores,
            "score": self.score,  # the raw geometric mean of the step scores
            "confidence": self.confidence,
            "finish_reason": self.finish_reason,
            "parent": self.parent,
            "fork_at": self.fork_at,
        }


@dataclass
class Done:
    """The last item :meth:`Reasoner.stream` yields: the chosen trajectory and all the others."""

    result: Result
    kind: str = "done"


@dataclass
class Result:
    mode: str
    n: int
    selected: int
    answer: str
    prompt_token_ids: list[int]
    candidates: list[Candidate]
    strategy: str = "best"
    seed: int = 0
    stats: Stats = field(default_factory=Stats)
    answers: list[AnswerMass] = field(default_factory=list)  # each distinct answer's mass (select.answer_masses)

    @property
    def best(self) -> Candidate:
        return self.candidates[self.selected]

    @property
    def confidence(self) -> float | None:
        """The calibrated confidence of the selected trajectory's answer; None without a calibration."""
        return self.best.confidence if self.candidates else None

    def to_json(self) -> dict:
        return {
            "mode": self.mode,
            "n": self.n,
            "selected": self.selected,
            "answer": self.answer,
            "strategy": self.strategy,
            "seed": self.seed,
            "prompt_token_ids": self.prompt_token_ids,
            "confidence": self.confidence,
            "answers": [asdict(a) for a in self.answers],
            "candidates": [c.to_json() for c in self.candidates],
            "stats": asdict(self.stats),
        }


def _split_answer(text: str, think_end: str | None) -> tuple[str, str]:
    if think_end and think_end in text:
        reasoning, _, answer = text.partition(think_end)
        return reasoning.strip(), answer.strip()
    return "", text.strip()


class Reasoner:
    """A backbone + SPRM head loaded once; ``solve`` runs N trajectories and picks one."""

    def __init__(self, model: Model, head: Head, engine: Engine, prompt_style: str = "chat") -> None:
        self.model = model
        self.head = head
        self.engine = engine
        # How a plain string prompt is posed (edge_ms.tasks.PROMPT_STYLES); message lists go as given.
        self.prompt_style = check_prompt_style(prompt_style)  # refused now, not at the first prompt
        self._think_end_text = model.token_text(head.spec.think_end_id) if head.spec.think_end_id is not None else None

    @classmethod
    def load(
        cls,
        model: str | Path | None = None,
        *,
        quant: str | None = None,
        head: str | Path | None = None,
        settings: DeviceSettings | None = None,
        memory_bytes: int | None = None,
        n_batch: int = ENGINE_BATCH,
        n_ubatch: int | None = None,
        prompt_style: str | None = None,
    ) -> Reasoner:
        """Load a model directory, a store name, a GGUF file (+ ``head``), or the embedded default (None).

        ``prompt_style`` says how a plain string prompt is posed: "chat" (one user turn) or "arith"
        (the few-shot arithmetic chat); None: "arith" for the embedded default model, else "chat".
        """
        gguf, head_path = locate(model, quant, head)
        if head_path is None:
            raise fail(gguf, "no SPRM head given (pass head=... / --head FILE.sprm.onnx)")
        # Measured before the weights are mapped: the budget covers them too (edge_ms.plan).
        budget = memory_bytes if memory_bytes is not None else int(available_memory() * DEFAULT_BUDGET_FRACTION)
        h = load_head(head_path)
        m = Model(gguf, settings)
        check_backbone(h, m)
        weights = m.path.stat().st_size
        if weights >= budget:
            limit = f"--memory {human_size(budget)}" if memory_bytes is not None else (
                f"the memory budget of {human_size(budget)} ({DEFAULT_BUDGET_FRACTION:.0%} of available memory)")
            raise fail(gguf, f"the weights alone ({human_size(weights)}) exceed {limit}")
        style = prompt_style or (DEFAULT_MODEL_PROMPT_STYLE if model is None else "chat")
        return cls(m, h, Engine(m, h, n_batch=n_batch, n_ubatch=n_ubatch, memory_budget_bytes=budget), style)

    def close(self) -> None:
        self.engine.close()
        self.model.close()

    def prompt_ids(self, prompt: str | list[dict[str, str]], raw: bool = False, parse_special: bool = True) -> list[int]:
        """Token ids of the prompt, through the model's chat template unless ``raw``.

        ``parse_special=False`` keeps special-token text in message contents text (``Model.chat_ids``).
        """
        if raw:
            if not isinstance(prompt, str):
                raise EdgeMSError("a raw prompt must be a string")
            return self.model.tokenize(prompt, add_special=True)
        messages = styled_messages(prompt, self.prompt_style) if isinstance(prompt, str) else prompt
        if not messages:
            raise EdgeMSError("empty message list")
        return self.model.chat_ids(messages, parse_special)

    def stream(
        self,
        prompt: str | list[dict[str, str]],
        mode: str = "medium",
        n: int | None = None,
        *,
        seed: int | None = None,
        temperature: float = 0.6,
        top_p: float = 0.95,
        repetition_penalty: float = 1.05,
        max_new_tokens: int = 2048,
        stop: tuple[str, ...] | list[str] = (),
        raw: bool = False,
        strategy: str = "best",
        beam_width: int | None = None,
        policy: SearchPolicy | None = None,
        should_stop: Callable[[], bool] | None = None,
        kv_layout: str = "auto",
        parse_special: bool = True,
    ) -> Iterator[Event | Done]:
        """Like :meth:`solve`, yielding the engine's progress events, then one :class:`Done`."""
        n_seq = resolve_n(mode, n)
        if strategy not in STRATEGIES:
            raise EdgeMSError(f"--strategy {strategy}: unknown (choose from {', '.join(STRATEGIES)})")
        if seed is None:
            seed = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
        if policy is None:
            policy = self.search_policy(strategy, n_seq, beam_width)
        params = SamplingParams(temperature=temperature, top_p=top_p, repetition_penalty=repetition_penalty,
                                seed=seed, max_new_tokens=max_new_tokens, stop=tuple(stop))
        ids = self.prompt_ids(prompt, raw, parse_special)
        stats = Stats()
        for event in self.engine.generate(ids, n_seq, params, policy=policy, should_stop=should_stop, stats=stats,
                                          kv_layout=kv_layout):
            if event.kind != "done":
                yield event
                continue
            cands = [self._candidate(t) for t in event.trajectories]
            # No candidates: cancelled during the prompt.
            chosen = select(cands, strategy) if cands else -1
            yield Done(Result(mode=mode, n=n_seq, selected=chosen, answer=cands[chosen].answer if cands else "",
                              prompt_token_ids=ids, candidates=cands, strategy=strategy, seed=seed, stats=stats,
                              answers=answer_masses(cands)))

    def search_policy(self, strategy: str, n: int, beam_width: int | None = None) -> SearchPolicy | None:
        """The search a strategy runs while the trajectories grow over ``n`` sequences (None: plain sampling).

        ``beam_width`` (beam only): partial trajectories kept at each depth, default N // 4
        (at least 1), so that each kept one has about four of the N sequences. (Early stop in
        waves is ``policy=EarlyStop(total=T)`` with ``n`` sequences for T trajectories.)
        """
        if beam_width is not None and strategy != "beam":
            raise EdgeMSError(f"--beam-width: only for --strategy beam, not {strategy}")
        if strategy == "prune":
            return PruneRule()
        if strategy == "beam":
            width = max(1, n // 4) if beam_width is None else beam_width
            if not 1 <= width <= n:
                raise EdgeMSError(f"--beam-width {width}: must be from 1 to N = {n}")
            return BeamSearch(width=width)
        if strategy == "early-stop":
            return EarlyStop(**EARLY_STOP_DEFAULTS, answer_of=lambda t: self._answer_key(t.decoded()))
        return None

    def solve(self, prompt: str | list[dict[str, str]], mode: str = "medium", n: int | None = None,
              on_event: Callable[[Event], None] | None = None, **kwargs) -> Result:
        """Sample N trajectories (mode low/medium/high = 2/8/32), score their steps, return the selection.

        ``strategy``: how to search and choose (``edge_ms.select.STRATEGIES``); "beam" forks
        the best partial trajectories into the slots of the weakest (``beam_width`` kept per
        depth), "early-stop" ends the run once the SPRM-weighted vote is settled.
        """
        for event in self.stream(prompt, mode, n, **kwargs):
            if isinstance(event, Done):
                return event.result
            if on_event is not None:
                on_event(event)
        raise RuntimeError("generation ended without a result")

    def _candidate(self, traj: Trajectory) -> Candidate:
        positions, scores = traj.steps()
        text = traj.decoded()
        reasoning, answer = _split_answer(text, self._think_end_text)
        return Candidate(
            index=traj.index, text=text, token_ids=list(traj.tokens), step_positions=positions,
            step_scores=scores, score=traj.score(), finish_reason=traj.finish_reason,
            reasoning=reasoning, answer=answer, answer_key=extract_answer(answer or text),
            confidence=self.head.confidence(traj.score()),
            parent=traj.parent, fork_at=traj.fork_at,
        )

    def _answer_key(self, text: str) -> str | None:
        """The vote key of a trajectory's text: its final answer, read after ``</think>`` when there is one."""
        _, answer = _split_answer(text, self._think_end_text)
        return extract_answer(answer or text)
