"""N trajectories in one batched llama.cpp context, scored step by step as they grow.

The prompt is decoded once into sequence 0 and its KV cells are shared with the
other sequences (``kv_unified`` + ``llama_memory_seq_cp``: no copy). Each step
then decodes one token for every live sequence in a single batch; the tap hands
back the hidden state of each of those tokens, and whenever a sequence samples a
token that starts a step, the hidden state of the token before it is scored by
the head right away. No second forward pass is needed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import llama_cpp
import numpy as np

from edge_ms.errors import EdgeMSError
from edge_ms.head import Head
from edge_ms.model import KV_TYPES, Model
from edge_ms.score import StepTracker, candidate_positions, starts_step
from edge_ms.tap import AbortFlag, Tap

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    """Per-trajectory sampling; defaults are those of the published evaluation (REFERENCE.md section 3)."""

    temperature: float = 0.6
    top_p: float = 0.95
    repetition_penalty: float = 1.05
    penalty_last_n: int = 64
    seed: int = 0
    max_new_tokens: int = 2048
    stop: tuple[str, ...] = ()


@dataclass
class Trajectory:
    """One sequence as it grows."""

    index: int
    tracker: StepTracker
    tokens: list[int] = field(default_factory=list)
    text: bytearray = field(default_factory=bytearray)
    finish_reason: str | None = None
    stop_at: int | None = None  # byte offset where a stop string begins
    sampler: object = None
    rows: dict[int, np.ndarray] | None = None  # position -> tapped row, when the engine keeps them

    def step_rows(self) -> np.ndarray:
        """Hidden states of the scored positions (needs ``Engine(keep_rows=True)``), for training heads."""
        positions, _ = self.steps()
        if self.rows is None:
            raise ValueError("rows were not kept: create the Engine with keep_rows=True")
        return np.stack([self.rows[q] for q in positions]) if positions else np.zeros((0, 0), np.float32)

    @property
    def live(self) -> bool:
        return self.finish_reason is None

    def steps(self) -> tuple[list[int], list[float]]:
        return self.tracker.steps()

    def score(self) -> float:
        return self.tracker.score()

    def decoded(self) -> str:
        data = bytes(self.text if self.stop_at is None else self.text[: self.stop_at])
        return data.decode("utf-8", "replace")


@dataclass
class Event:
    """Progress of one trajectory: a token, a scored step, or its end. ``done`` carries all of them."""

    kind: str  # "token" | "step" | "finish" | "done"
    index: int = -1
    token: int | None = None
    n_tokens: int = 0
    step_score: float | None = None
    score: float = 0.0
    finish_reason: str | None = None
    trajectories: list[Trajectory] | None = None
    result: object = None  # set on the final event by Reasoner.stream


@dataclass
class Stats:
    """Where the time of one generation went."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    decode_s: float = 0.0
    sample_s: float = 0.0
    score_s: float = 0.0
    total_s: float = 0.0
    n_ctx: int = 0
    reused_prompt_tokens: int = 0


# A pruning rule: given every trajectory after a step, the indices of live ones to stop now.
Pruner = Callable[[list[Trajectory]], list[int]]


def _sampler(params: SamplingParams, n_vocab: int, seed: int):
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    add = llama_cpp.llama_sampler_chain_add
    if params.repetition_penalty != 1.0:
        add(chain, llama_cpp.llama_sampler_init_penalties(n_vocab, params.penalty_last_n, params.repetition_penalty, 0.0, 0.0))
    if params.temperature <= 0:
        add(chain, llama_cpp.llama_sampler_init_greedy())
        return chain
    # Temperature before top-p, as in the published (vLLM / transformers) sampling.
    add(chain, llama_cpp.llama_sampler_init_temp(params.temperature))
    add(chain, llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
    add(chain, llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))
    return chain


class Engine:
    """One model, one head, one reusable llama.cpp context with the tap installed."""

    def __init__(self, model: Model, head: Head | None, n_batch: int = 512, n_ubatch: int | None = None,
                 tap_enabled: bool = True, keep_rows: bool = False,
                 memory_budget_bytes: int | None = None, n_threads: int | None = None) -> None:
        self.model = model
        # Threads of this context (default: the model's settings); several engines on one
        # model, one thread each, is how train-sprm uses every core.
        self.n_threads = n_threads
        self.head = head
        self.n_batch = n_batch
        self.n_ubatch = n_ubatch
        # Everything a generation keeps resident (edge_ms.plan's estimate, the same as `edge-ms plan`).
        self.memory_budget_bytes = memory_budget_bytes
        self.keep_rows = keep_rows
        layer = head.spec.layer if head else model.n_layer - 2
        self.layer = layer
        self.tap_enabled = tap_enabled and head is not None
        self.abort = AbortFlag()
        self._ctx = None
        self._ctx_key: tuple[int, int] | None = None
        self._tap: Tap | None = None
        self._batch = None
        self._batch_cap = 0
        # The prompt whose KV cells seq 0 still holds, and its tapped candidate rows: a
        # prompt that starts the same way (a few-shot prefix, a system prompt) decodes only
        # what differs, as llama.cpp's server does with cache_prompt.
        self._cached: list[int] = []
        self._cached_rows: dict[int, np.ndarray] = {}

    # -- context -----------------------------------------------------------------

    def plan_context(self, n_prompt: int, n: int, max_new_tokens: int) -> int:
        """KV cells needed: the shared prompt once, plus each trajectory's own tokens."""
        m = self.model
        if n < 1:
            raise EdgeMSError(f"n={n}: need at least one trajectory")
        if max_new_tokens < 1:
            raise EdgeMSError(f"max_new_tokens={max_new_tokens}: must be at least 1")
        if n_prompt + max_new_tokens > m.n_ctx_train:
            raise EdgeMSError(
                f"{m.path.name}: prompt of {n_prompt} tokens + max_new_tokens {max_new_tokens} exceeds the "
                f"model's context of {m.n_ctx_train} tokens; shorten the prompt or lower --max-new-tokens"
            )
        n_ctx = n_prompt + n * max_new_tokens + 1
        if self.memory_budget_bytes is not None:
            from edge_ms.plan import shape_estimate, shape_from_model

            batch = min(self.n_batch, self.n_ubatch or self.n_batch)
            est = shape_estimate(shape_from_model(m), n_ctx, n, m.settings.kv_type, n_prompt, batch)
            if est.total > self.memory_budget_bytes:
                raise EdgeMSError(
                    f"{m.path.name}: {n} trajectories x {max_new_tokens} new tokens need {est.total / 2**30:.2f} GiB "
                    f"({est.kv_cache / 2**30:.2f} GiB of KV cache, {est.weights / 2**30:.2f} GiB of weights), over the "
                    f"budget of {self.memory_budget_bytes / 2**30:.2f} GiB; lower --n / --mode or --max-new-tokens, "
                    f"use --kv-type q8_0, or raise --memory (`edge-ms plan` shows what fits)"
                )
        return n_ctx

    def _context(self, n_ctx: int, n_seq: int):
        if self._ctx is not None and self._ctx_key[0] >= n_ctx and self._ctx_key[1] >= n_seq:
            return self._ctx
        self.close_context()
        m = self.model
        s = m.settings
        p = llama_cpp.llama_context_default_params()
        n_batch = max(self.n_batch, n_seq)
        p.n_ctx = n_ctx
        p.n_batch = n_batch
        p.n_ubatch = min(self.n_ubatch or n_batch, n_batch)
        p.n_seq_max = n_seq
        p.n_threads = p.n_threads_batch = self.n_threads or s.threads()
        p.kv_unified = True
        p.type_k = p.type_v = KV_TYPES[s.kv_type]
        # A quantized V cache needs flash attention in llama.cpp.
        p.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if s.kv_type != "f16" else llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO
        )
        p.no_perf = True
        self._tap = Tap(self.layer, m.n_embd, n_batch)
        self._tap.enabled = self.tap_enabled
        if self.tap_enabled:
            p.cb_eval = self._tap.cb_eval
            p.cb_eval_user_data = self._tap.user_data
        p.abort_callback = self.abort.callback
        p.abort_callback_data = self.abort.data
        ctx = llama_cpp.llama_init_from_model(m.ptr, p)
        if not ctx:
            need = n_ctx * m.kv_bytes_per_token(s.kv_type)
            raise EdgeMSError(
                f"{m.path.name}: could not create a context of {n_ctx} tokens ({need / 2**30:.2f} GiB of KV cache); "
                "lower --n / --mode or --max-new-tokens"
            )
        self._ctx = ctx
        self._ctx_key = (n_ctx, n_seq)
        if self._batch_cap < n_batch:
            if self._batch is not None:
                llama_cpp.llama_batch_free(self._batch)
            self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
            self._batch_cap = n_batch
        return ctx

    def close_context(self) -> None:
        self._cached, self._cached_rows = [], {}
        if self._ctx is not None:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
            self._ctx_key = None

    def close(self) -> None:
        self.close_context()
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
            self._batch_cap = 0

    def __del__(self) -> None:
        self.close()

    # -- decoding ----------------------------------------------------------------

    def _decode(self, ctx, items: list[tuple[int, int, int, bool]]) -> np.ndarray | None:
        """Decode (token, pos, seq, want_logits) items as one batch; returns the tapped rows."""
        b = self._batch
        for i, (tok, pos, seq, want) in enumerate(items):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = want
        b.n_tokens = len(items)
        if self._tap is not None:
            self._tap.reset()
        rc = llama_cpp.llama_decode(ctx, b)
        if rc == 2 or self.abort.is_set():
            raise _Aborted()
        if rc != 0:
            raise EdgeMSError(f"{self.model.path.name}: llama_decode failed ({rc}): the KV cache is full")
        return self._tap.rows() if self.tap_enabled else None

    def generate(
        self,
        prompt_ids: list[int],
        n: int,
        params: SamplingParams,
        prune: Pruner | None = None,
        should_stop: Callable[[], bool] | None = None,
        stats: Stats | None = None,
    ) -> Iterator[Event]:
        """Sample ``n`` trajectories after ``prompt_ids``; yields progress, then a ``done`` event.

        Cancelling (``should_stop`` returning True, or :attr:`abort` set from another
        thread) ends every live trajectory with finish_reason ``cancelled``.
        """
        t_start = time.perf_counter()
        stats = stats if stats is not None else Stats()
        m = self.model
        if not prompt_ids:
            raise EdgeMSError("empty prompt: nothing to condition on")
        n_prompt = len(prompt_ids)
        n_ctx = self.plan_context(n_prompt, n, params.max_new_tokens)
        ctx = self._context(n_ctx, n)
        stats.n_ctx, stats.prompt_tokens = n_ctx, n_prompt
        mem = llama_cpp.llama_get_memory(ctx)
        self.abort.clear()
        spec = self.head.spec if self.head else None
        delimiters = frozenset(spec.step_delimiter_ids) if spec else frozenset()
        think_start = spec.think_start_id if spec else None
        scoring = self.head is not None and self.tap_enabled

        # Rows of the prompt positions that are step candidates (a later </think> or
        # <think> can bring them into the scoring region), and of its last token.
        prompt_cands = candidate_positions(prompt_ids, spec) if scoring else []
        wanted = set(prompt_cands)
        reuse = self._reusable(prompt_ids, prompt_cands)
        rows: dict[int, np.ndarray] = {q: self._cached_rows[q] for q in prompt_cands if q < reuse}
        self._cached, self._cached_rows = [], {}
        if reuse:
            llama_cpp.llama_memory_seq_rm(mem, -1, reuse, -1)
            llama_cpp.llama_memory_seq_keep(mem, 0)
        else:
            llama_cpp.llama_memory_clear(mem, True)
        stats.reused_prompt_tokens = reuse
        last_row = None
        step = max(self._batch_cap, 1)
        try:
            for start in range(reuse, n_prompt, step):
                chunk = prompt_ids[start : start + step]
                items = [(t, start + i, 0, start + i == n_prompt - 1) for i, t in enumerate(chunk)]
                t0 = time.perf_counter()
                tapped = self._decode(ctx, items)
                stats.decode_s += time.perf_counter() - t0
                if tapped is not None:
                    for q in range(start, start + len(chunk)):
                        if q in wanted:
                            rows[q] = tapped[q - start].copy()
                    if start + len(chunk) == n_prompt:
                        last_row = tapped[len(chunk) - 1].copy()
        except _Aborted:
            llama_cpp.llama_memory_clear(mem, True)
            yield Event("done", trajectories=[])
            return
        t0 = time.perf_counter()
        prompt_scores = self.head.score(np.stack([rows[q] for q in prompt_cands])) if prompt_cands else []
        stats.score_s += time.perf_counter() - t0
        for seq in range(1, n):
            llama_cpp.llama_memory_seq_cp(mem, 0, seq, -1, -1)

        base = StepTracker(spec, n_prompt) if spec else None
        if base is not None:
            for tok in prompt_ids:
                base.add_token(tok)
            for q, s in zip(prompt_cands, prompt_scores):
                base.add_candidate(q, float(s))
        trajs: list[Trajectory] = []
        for i in range(n):
            tracker = (
                StepTracker(spec, n_prompt, base.length, list(base.candidates), list(base.think_starts), list(base.think_ends))
                if base
                else StepTracker(_NO_STEPS, n_prompt)
            )
            traj = Trajectory(i, tracker, sampler=_sampler(params, m.n_vocab, params.seed + i))
            if self.keep_rows:
                traj.rows = {q: rows[q] for q in prompt_cands}
            for tok in prompt_ids[-params.penalty_last_n :]:
                llama_cpp.llama_sampler_accept(traj.sampler, tok)
            trajs.append(traj)

        completed = False
        try:
            live = trajs
            out_rows = None  # row j: hidden state of the token just decoded for live[j]
            first = True
            while live:
                if should_stop is not None and should_stop():
                    raise _Aborted()
                to_score: list[tuple[Trajectory, int, np.ndarray]] = []
                events: list[Event] = []
                t0 = time.perf_counter()
                for j, traj in enumerate(live):
                    # After the prompt every trajectory samples from the same (last) logits.
                    tok = llama_cpp.llama_sampler_sample(traj.sampler, ctx, -1 if first else j)
                    prev = traj.tokens[-1] if traj.tokens else prompt_ids[-1]
                    pos = n_prompt + len(traj.tokens)
                    if scoring and starts_step(prev, tok, delimiters, think_start):
                        to_score.append((traj, pos - 1, last_row if first else out_rows[j]))
                    traj.tokens.append(tok)
                    traj.tracker.add_token(tok)
                    events.append(Event("token", traj.index, tok, len(traj.tokens)))
                    if m.is_eog(tok):
                        traj.finish_reason = "stop"
                    else:
                        traj.text += m.piece(tok)
                        if params.stop and _hit_stop(traj, params.stop):
                            traj.finish_reason = "stop"
                        elif len(traj.tokens) >= params.max_new_tokens:
                            traj.finish_reason = "length"
                stats.sample_s += time.perf_counter() - t0
                stats.generated_tokens += len(live)
                if to_score:
                    t0 = time.perf_counter()
                    scores = self.head.score(np.stack([r for _, _, r in to_score]))
                    stats.score_s += time.perf_counter() - t0
                    for (traj, q, row), s in zip(to_score, scores):
                        traj.tracker.add_candidate(q, float(s))
                        if traj.rows is not None:
                            traj.rows[q] = row.copy()
                        events.append(Event("step", traj.index, None, len(traj.tokens), float(s), traj.score()))
                if prune is not None and to_score:
                    for idx in prune(trajs):
                        if trajs[idx].live:
                            trajs[idx].finish_reason = "pruned"
                for traj in live:
                    if not traj.live:
                        # Only its own tokens: the prompt cells stay for the next call to reuse.
                        llama_cpp.llama_memory_seq_rm(mem, traj.index, n_prompt, -1)
                        events.append(
                            Event("finish", traj.index, None, len(traj.tokens), None, traj.score(), traj.finish_reason)
                        )
                yield from events
                live = [t for t in live if t.live]
                if not live:
                    break
                items = [(t.tokens[-1], n_prompt + len(t.tokens) - 1, t.index, True) for t in live]
                t0 = time.perf_counter()
                out_rows = self._decode(ctx, items)
                stats.decode_s += time.perf_counter() - t0
                first = False
            completed = True
        except _Aborted:
            for traj in trajs:
                if traj.live:
                    traj.finish_reason = "cancelled"
            llama_cpp.llama_memory_clear(mem, True)
        finally:
            for traj in trajs:
                if traj.sampler is not None:
                    llama_cpp.llama_sampler_free(traj.sampler)
                    traj.sampler = None
        if completed:
            self._cached, self._cached_rows = list(prompt_ids), rows
        stats.total_s = time.perf_counter() - t_start
        yield Event("done", trajectories=trajs)

    def _reusable(self, prompt_ids: list[int], prompt_cands: list[int]) -> int:
        """How many leading prompt tokens seq 0 already holds, with every tapped row they need."""
        common = 0
        limit = min(len(self._cached), len(prompt_ids) - 1)  # the last token is decoded again for its logits
        while common < limit and self._cached[common] == prompt_ids[common]:
            common += 1
        for q in prompt_cands:
            if q < common and q not in self._cached_rows:
                return q
        return common


class _Aborted(Exception):
    pass


@dataclass(frozen=True)
class _NoSteps:
    step_delimiter_ids: tuple[int, ...] = ()
    think_start_id: int | None = None
    think_end_id: int | None = None


_NO_STEPS = _NoSteps()


def _hit_stop(traj: Trajectory, stops: tuple[str, ...]) -> bool:
    # Only the tail can hold a stop string that the newest token completed.
    tail_start = max(0, len(traj.text) - max(len(s.encode()) for s in stops) - 16)
    tail = bytes(traj.text[tail_start:])
    for s in stops:
        at = tail.find(s.encode())
        if at >= 0:
            traj.stop_at = tail_start + at
            return True
    return False

