"""N trajectories in one batched llama.cpp context, scored step by step as they grow.

The prompt is decoded once into sequence 0 and shared with the other sequences by
``llama_memory_seq_cp``: in the unified KV layout the cells themselves are shared (no copy),
in the streams layout each sequence's stream gets a copy (edge_ms.plan.auto_layout picks).
Each round then decodes one token for every live sequence in a single batch; the tap hands
back the hidden state of each of those tokens, and whenever a sequence samples a token that
starts a step, the hidden state of the token before it is scored by the head right away.
No second forward pass is needed.
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
from edge_ms.interrupts import hold_interrupt
from edge_ms.model import KV_TYPES, Model
from edge_ms.plan import ENGINE_BATCH, layout_estimate, shape_from_model
from edge_ms.sampling import SamplingParams, make_sampler
from edge_ms.score import StepTracker, candidate_positions, starts_step
from edge_ms.search import SearchPolicy
from edge_ms.sizes import human_size
from edge_ms.tap import AbortFlag, Tap

log = logging.getLogger(__name__)


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
    # Where this sequence's logits (and tapped row) sit in the last decoded batch; -1 once it
    # has finished (as in llama.cpp's examples/batched). After the prompt every sequence points
    # at the prompt's last token, so the first round needs no special case.
    i_batch: int = -1
    # The llama.cpp sequence (slot) it runs in: its index, unless a search (edge_ms.search)
    # forked or started it in the slot of a trajectory that ended. A fork records its parent's
    # index and how many of its tokens it shares with the parent.
    seq: int = -1
    parent: int | None = None
    fork_at: int | None = None

    def __post_init__(self) -> None:
        if self.seq < 0:
            self.seq = self.index

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

    def ends_step(self) -> bool:
        """Whether the newest token is the delimiter that ended a scored step."""
        positions, _ = self.steps()
        return bool(positions) and positions[-1] == self.tracker.length - 2


@dataclass
class Event:
    """Progress of one trajectory: a token, a scored step, a fork or start, or its end. ``done`` carries all of them.

    A ``fork`` event announces a new trajectory ``index``, forked from ``parent`` after its
    first ``n_tokens`` tokens (which the fork shares); a ``start`` event, a new trajectory
    started afresh from the prompt in a freed sequence. Their own tokens follow as usual.
    """

    kind: str  # "token" | "step" | "fork" | "start" | "finish" | "done"
    index: int = -1
    token: int | None = None
    n_tokens: int = 0
    step_score: float | None = None
    score: float = 0.0
    finish_reason: str | None = None
    trajectories: list[Trajectory] | None = None
    parent: int | None = None


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
    kv_layout: str = ""


class Engine:
    """One model, one head, one reusable llama.cpp context with the tap installed."""

    def __init__(self, model: Model, head: Head | None, n_batch: int = ENGINE_BATCH, n_ubatch: int | None = None,
                 tap_enabled: bool = True, keep_rows: bool = False,
                 memory_budget_bytes: int | None = None, n_threads: int | None = None,
                 extra_layers: tuple[int, ...] = ()) -> None:
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
        # Layers also tapped (after the head's, side by side in each kept row): training data
        # for a choice of layer comes from one pass of sampling. Scoring reads the head's alone.
        self.extra_layers = tuple(extra_layers)
        self.tap_enabled = tap_enabled and head is not None
        # The last layer's output holds only the rows of tokens that ask for logits.
        bad = [k for k in (layer, *self.extra_layers) if not 0 <= k < model.n_layer - 1]
        if self.tap_enabled and bad:
            raise EdgeMSError(f"{model.path.name}: cannot tap layer {bad[0]} (choose 0 to {model.n_layer - 2})")
        self.abort = AbortFlag()
        self._ctx = None
        self._mem = None
        self._ctx_plan: ContextPlan | None = None
        self._tap: Tap | None = None
        self._batch = None
        self._batch_cap = 0
        # The prompt whose KV cells seq 0 still holds, and its tapped candidate rows: a
        # prompt that starts the same way (a few-shot prefix, a system prompt) decodes only
        # what differs, as llama.cpp's server does with cache_prompt.
        self._cached: list[int] = []
        self._cached_rows: dict[int, np.ndarray] = {}

    @property
    def scoring(self) -> bool:
        """Whether steps are scored as they are sampled (a head, and the tap on)."""
        return self.tap_enabled

    # -- context -----------------------------------------------------------------

    def plan_context(self, n_prompt: int, n: int, max_new_tokens: int, kv_layout: str = "auto",
                     forks: bool = False) -> ContextPlan:
        """The KV layout and cells of a generation, checked against the model and the memory budget."""
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
        batch = min(self.n_batch, self.n_ubatch or self.n_batch)
        layout, n_ctx, est = layout_estimate(shape_from_model(m), n_prompt, n, max_new_tokens, m.settings.kv_type,
                                             self.memory_budget_bytes, kv_layout, batch, forks)
        if self.memory_budget_bytes is not None and est.total > self.memory_budget_bytes:
            raise EdgeMSError(
                f"{m.path.name}: {n} trajectories x {max_new_tokens} new tokens need {human_size(est.total)} "
                f"({human_size(est.kv_cache)} of KV cache, {human_size(est.weights)} of weights), over the "
                f"budget of {human_size(self.memory_budget_bytes)}; lower --n / --mode or --max-new-tokens, "
                f"use --kv-type q8_0, or raise --memory (`edge-ms plan` shows what fits)"
            )
        return ContextPlan(n_ctx, n, layout)

    def _context(self, plan: ContextPlan):
        if self._ctx is not None and self._ctx_plan.holds(plan):
            return self._ctx
        self.close_context()
        m = self.model
        s = m.settings
        p = llama_cpp.llama_context_default_params()
        n_seq = plan.n_seq
        n_batch = max(self.n_batch, n_seq)
        p.n_ctx = plan.n_ctx
        p.n_batch = n_batch
        p.n_ubatch = min(self.n_ubatch or n_batch, n_batch)
        p.n_seq_max = n_seq
        p.n_threads = p.n_threads_batch = self.n_threads or s.threads()
        p.kv_unified = plan.layout == "unified"
        p.type_k = p.type_v = KV_TYPES[s.kv_type]
        # A quantized V cache needs flash attention in llama.cpp.
        p.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if s.kv_type != "f16" else llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO
        )
        p.no_perf = True
        self._tap = Tap(self.layer, m.n_embd, n_batch, self.extra_layers)
        self._tap.enabled = self.tap_enabled
        if self.tap_enabled:
            p.cb_eval = self._tap.cb_eval
            p.cb_eval_user_data = self._tap.user_data
        p.abort_callback = self.abort.callback
        p.abort_callback_data = self.abort.data
        with hold_interrupt():  # llama.cpp logs through a Python callback while it builds the context
            ctx = llama_cpp.llama_init_from_model(m.ptr, p)
        if not ctx:
            n_ctx = plan.n_ctx
            need = n_ctx * m.kv_bytes_per_token(s.kv_type)
            raise EdgeMSError(
                f"{m.path.name}: could not create a context of {n_ctx} tokens ({human_size(need)} of KV cache); "
                "lower --n / --mode or --max-new-tokens"
            )
        self._ctx = ctx
        self._mem = llama_cpp.llama_get_memory(ctx)
        self._ctx_plan = plan
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
            self._ctx_plan = None

    def close(self) -> None:
        self.close_context()
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
            self._batch_cap = 0

    def __del__(self) -> None:
        if hasattr(self, "_batch"):  # else __init__ was cut short (Ctrl-C) before there was anything to free
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
        policy: SearchPolicy | None = None,
        should_stop: Callable[[], bool] | None = None,
        stats: Stats | None = None,
        kv_layout: str = "auto",
    ) -> Iterator[Event]:
        """Sample ``n`` trajectories after ``prompt_ids``; yields progress, then a ``done`` event.

        ``kv_layout`` (auto / unified / streams) says how the sequences share the KV cache
        (edge_ms.plan.auto_layout); tokens and scores do not depend on it beyond float noise.

        The phases read top to bottom: prefill the prompt, fork it into ``n`` sequences,
        then rounds of sample, score, search, retire, decode until no sequence is live.
        ``policy`` (edge_ms.search) is consulted after each round that scored a step or ended a
        trajectory: it may stop live trajectories, fork others into the freed sequences or
        start fresh ones there, so the run can end with more than ``n`` trajectories (never
        more than ``n`` live at once).
        Cancelling (``should_stop`` returning True, or :attr:`abort` set from another thread)
        ends every live trajectory with finish_reason ``cancelled``.
        """
        t_start = time.perf_counter()
        stats = stats if stats is not None else Stats()
        if not prompt_ids:
            raise EdgeMSError("empty prompt: nothing to condition on")
        forks = bool(getattr(policy, "forks", False))
        plan = self.plan_context(len(prompt_ids), n, params.max_new_tokens, kv_layout, forks)
        ctx = self._context(plan)
        stats.n_ctx, stats.prompt_tokens, stats.kv_layout = plan.n_ctx, len(prompt_ids), plan.layout
        self.abort.clear()
        try:
            prefill = self._prefill(ctx, prompt_ids, stats)
        except _Aborted:
            llama_cpp.llama_memory_clear(self._mem, True)
            yield Event("done", trajectories=[])
            return
        trajs = self._fork(prompt_ids, n, params, prefill, stats)
        completed = False
        root = Trajectory(-1, trajs[0].tracker.copy(),  # what a fresh start copies: the prompt's state
                          rows=None if trajs[0].rows is None else dict(trajs[0].rows))
        try:
            live, batch_rows = list(trajs), prefill.last_rows
            while live:
                if should_stop is not None and should_stop():
                    raise _Aborted()
                events, to_score = self._sample_round(ctx, live, batch_rows, params, stats)
                events += self._score_round(to_score, stats)
                parents, fresh = [], 0
                if policy is not None and (to_score or not all(t.live for t in live)):
                    parents, fresh = _apply_policy(policy, trajs, n)
                events += self._retire(live, len(prompt_ids))
                live = [t for t in live if t.live]
                events += self._restart(fresh, root, trajs, live, n, params, prompt_ids)
                yield from events
                if live:
                    batch_rows = self._decode_round(ctx, live, prompt_ids, stats)
                    yield from self._branch(parents, trajs, live, n, params, prompt_ids)
            completed = True
        except _Aborted:
            for traj in trajs:
                if traj.live:
                    traj.finish_reason = "cancelled"
            llama_cpp.llama_memory_clear(self._mem, True)
        finally:
            for traj in trajs:
                if traj.sampler is not None:
                    llama_cpp.llama_sampler_free(traj.sampler)
                    traj.sampler = None
        if completed:
            self._cached, self._cached_rows = list(prompt_ids), prefill.rows
        stats.total_s = time.perf_counter() - t_start
        yield Event("done", trajectories=trajs)

    # -- the phases of one generation ----------------------------------------------

    def _prefill(self, ctx, prompt_ids: list[int], stats: Stats) -> _Prefill:
        """Decode into sequence 0 what of the prompt it does not already hold.

        Keeps the tapped rows of the prompt's step candidates (a later ``</think>`` or
        ``<think>`` can bring them into the scoring region) and of the last chunk, whose
        last row is the state every trajectory's first sampled token follows.
        """
        mem = self._mem
        cands = candidate_positions(prompt_ids, self.head.spec) if self.scoring else []
        wanted = set(cands)
        reuse = self._reusable(prompt_ids, cands)
        rows = {q: self._cached_rows[q] for q in cands if q < reuse}
        self._cached, self._cached_rows = [], {}
        if reuse:
            llama_cpp.llama_memory_seq_rm(mem, -1, reuse, -1)
            llama_cpp.llama_memory_seq_keep(mem, 0)
        else:
            llama_cpp.llama_memory_clear(mem, True)
        stats.reused_prompt_tokens = reuse
        n_prompt = len(prompt_ids)
        step = max(self._batch_cap, 1)
        tapped, chunk = None, []
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
        return _Prefill(cands, rows, tapped, len(chunk) - 1)

    def _fork(self, prompt_ids: list[int], n: int, params: SamplingParams, prefill: _Prefill,
              stats: Stats) -> list[Trajectory]:
        """Score the prompt's candidates once, share the prompt's cells with ``n`` sequences."""
        spec = self.head.spec if self.head else _NO_STEPS
        cands = prefill.candidates
        t0 = time.perf_counter()
        scores = self._score([prefill.rows[q] for q in cands]) if cands else []
        stats.score_s += time.perf_counter() - t0
        for seq in range(1, n):
            llama_cpp.llama_memory_seq_cp(self._mem, 0, seq, -1, -1)
        base = StepTracker(spec, len(prompt_ids))
        for tok in prompt_ids:
            base.add_token(tok)
        for q, s in zip(cands, scores):
            base.add_candidate(q, float(s))
        trajs = []
        for i in range(n):
            traj = Trajectory(i, base.copy(), i_batch=prefill.last_index,
                              sampler=self._sampler(params, i, prompt_ids))
            if self.keep_rows:
                traj.rows = {q: prefill.rows[q] for q in cands}
            trajs.append(traj)
        return trajs

    def _sample_round(self, ctx, live: list[Trajectory], batch_rows: np.ndarray | None, params: SamplingParams,
                      stats: Stats) -> tuple[list[Event], list[tuple[Trajectory, int, np.ndarray]]]:
        """Sample one token per live trajectory from its logits in the last batch.

        Returns the token events and the step candidates to score: a trajectory whose new
        token starts a step has the hidden state of the token before it scored (rules 1-4).
        """
        m = self.model
        spec = self.head.spec if self.head else _NO_STEPS
        delimiters = frozenset(spec.step_delimiter_ids)
        events: list[Event] = []
        to_score = []
        t0 = time.perf_counter()
        for traj in live:
            tok = llama_cpp.llama_sampler_sample(traj.sampler, ctx, traj.i_batch)
            prev = traj.tracker.last_token
            if self.scoring and starts_step(prev, tok, delimiters, spec.think_start_id):
                to_score.append((traj, traj.tracker.length - 1, batch_rows[traj.i_batch]))
            traj.tokens.append(tok)
            traj.tracker.add_token(tok)
            events.append(Event("token", index=traj.index, token=tok, n_tokens=len(traj.tokens)))
            if m.is_eog(tok):
                traj.finish_reason = "stop"
                continue
            traj.text += m.piece(tok)
            if params.stop and _hit_stop(traj, params.stop):
                traj.finish_reason = "stop"
            elif len(traj.tokens) >= params.max_new_tokens:
                traj.finish_reason = "length"
        stats.sample_s += time.perf_counter() - t0
        stats.generated_tokens += len(live)
        return events, to_score

    def _score_round(self, to_score: list[tuple[Trajectory, int, np.ndarray]], stats: Stats) -> list[Event]:
        """Run the head once over every step candidate of the round (rules 1-4 hold; rule 5 applies on read)."""
        if not to_score:
            return []
        t0 = time.perf_counter()
        scores = self._score([row for _, _, row in to_score])
        stats.score_s += time.perf_counter() - t0
        events = []
        for (traj, q, row), s in zip(to_score, scores):
            traj.tracker.add_candidate(q, float(s))
            if traj.rows is not None:
                traj.rows[q] = row.copy()
            events.append(Event("step", index=traj.index, n_tokens=len(traj.tokens), step_score=float(s), score=traj.score()))
        return events

    def _score(self, rows: list[np.ndarray]) -> np.ndarray:
        """The head's step scores of tapped rows (their first ``n_embd`` floats: the head's layer)."""
        return self.head.score(np.stack(rows)[:, : self.model.n_embd])

    def _retire(self, live: list[Trajectory], n_prompt: int) -> list[Event]:
        """Free the cells of trajectories that ended this round; their logits index becomes -1."""
        events = []
        for traj in live:
            if traj.live:
                continue
            traj.i_batch = -1
            # Only its own tokens: the prompt cells stay for the next call to reuse.
            llama_cpp.llama_memory_seq_rm(self._mem, traj.seq, n_prompt, -1)
            events.append(Event("finish", index=traj.index, n_tokens=len(traj.tokens), score=traj.score(),
                                finish_reason=traj.finish_reason))
        return events

    def _decode_round(self, ctx, live: list[Trajectory], prompt_ids: list[int], stats: Stats) -> np.ndarray | None:
        """Decode every live trajectory's newest token in one batch; each keeps its index in it.

        A trajectory started afresh (no token yet) decodes the prompt's last token again in its
        own sequence, for the logits and tapped row its first token follows.
        """
        items = []
        for j, traj in enumerate(live):
            newest = traj.tokens[-1] if traj.tokens else prompt_ids[-1]
            items.append((newest, len(prompt_ids) + len(traj.tokens) - 1, traj.seq, True))
            traj.i_batch = j
        t0 = time.perf_counter()
        rows = self._decode(ctx, items)
        stats.decode_s += time.perf_counter() - t0
        return rows

    def _branch(self, parents: list[Trajectory], trajs: list[Trajectory], live: list[Trajectory], n: int,
                params: SamplingParams, prompt_ids: list[int]) -> list[Event]:
        """Fork each (still live) parent into a free sequence, right after the parent's newest token was decoded.

        The child's sequence takes the parent's KV cells (metadata only in a unified cache)
        and the child points at the parent's logits and tapped row in the batch just decoded,
        so its first token is drawn from the very distribution the parent's next one will be,
        with no extra decode. It copies the parent's tokens, text, step tracker and rows; its
        sampler is fresh, seeded by its own index, its penalty window primed with the same history.
        """
        free = _free_seqs(n, live)
        events = []
        for parent, seq in zip([p for p in parents if p.live], free):
            llama_cpp.llama_memory_seq_rm(self._mem, seq, -1, -1)
            llama_cpp.llama_memory_seq_cp(self._mem, parent.seq, seq, -1, -1)
            child = Trajectory(len(trajs), parent.tracker.copy(), list(parent.tokens), bytearray(parent.text),
                               i_batch=parent.i_batch, seq=seq, parent=parent.index, fork_at=len(parent.tokens))
            child.sampler = self._sampler(params, child.index, prompt_ids + parent.tokens)
            if parent.rows is not None:
                child.rows = dict(parent.rows)
            trajs.append(child)
            live.append(child)
            events.append(Event("fork", index=child.index, parent=parent.index, n_tokens=len(child.tokens),
                                score=child.score()))
        return events

    def _restart(self, count: int, root: Trajectory, trajs: list[Trajectory], live: list[Trajectory], n: int,
                 params: SamplingParams, prompt_ids: list[int]) -> list[Event]:
        """Start ``count`` fresh trajectories from the prompt in free sequences (before the decode).

        A free sequence holds the prompt's cells (``_retire`` keeps them); its last one is
        decoded again with the round, so a fresh trajectory number i is trajectory i of a
        plain run: the same state, the same seed, the same penalty history.
        """
        free = _free_seqs(n, live)
        events = []
        for seq in free[:count]:
            llama_cpp.llama_memory_seq_rm(self._mem, seq, len(prompt_ids) - 1, -1)
            traj = Trajectory(len(trajs), root.tracker.copy(), seq=seq,
                              rows=dict(root.rows) if root.rows is not None else None)
            traj.sampler = self._sampler(params, traj.index, prompt_ids)
            trajs.append(traj)
            live.append(traj)
            events.append(Event("start", index=traj.index))
        return events

    def _sampler(self, params: SamplingParams, index: int, history: list[int]):
        """Trajectory ``index``'s sampler chain: its own seed, the penalty window primed with
        ``history``, and every end-of-generation token banned when ``params.ignore_eos``."""
        banned = self.model.eog_ids if params.ignore_eos else ()
        return make_sampler(params, self.model.n_vocab, params.seed + index, history, banned)

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
class ContextPlan:
    """The llama.cpp context a generation needs: KV cells in all, sequences, and their layout."""

    n_ctx: int
    n_seq: int
    layout: str  # "unified" (one shared pool) or "streams" (one stream per sequence)

    def holds(self, other: ContextPlan) -> bool:
        """Whether a context made for this plan can run ``other`` as well."""
        if self.layout != other.layout:
            return False
        if self.layout == "streams":  # llama.cpp gives each of n_seq streams n_ctx / n_seq cells
            return self.n_seq >= other.n_seq and self.n_ctx // self.n_seq >= other.n_ctx // other.n_seq
        return self.n_ctx >= other.n_ctx and self.n_seq >= other.n_seq


@dataclass
class _Prefill:
    """What the prompt left behind: its scored candidates' rows, and the last batch's rows."""

    candidates: list[int]
    rows: dict[int, np.ndarray]
    last_rows: np.ndarray | None
    last_index: int  # the prompt's last token in the last batch: where its logits are


def _free_seqs(n: int, live: list[Trajectory]) -> list[int]:
    """The sequence ids of ``n`` that no live trajectory holds, lowest first."""
    return sorted(set(range(n)) - {t.seq for t in live})


def _apply_policy(policy: SearchPolicy, trajs: list[Trajectory], n: int) -> tuple[list[Trajectory], int]:
    """Stop what the policy stops; the parents it wants forked (after the decode), and how many to start afresh."""
    decision = policy(trajs, n - sum(t.live for t in trajs))
    for idx in decision.stop:
        if trajs[idx].live:
            trajs[idx].finish_reason = decision.reason
    return [trajs[idx] for idx in decision.fork if trajs[idx].live], decision.spawn


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

