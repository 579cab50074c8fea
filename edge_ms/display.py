"""A live terminal view of the N trajectories (rich), used by ``edge-ms solve``."""

from __future__ import annotations

from collections.abc import Callable

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from edge_ms.engine import Event


class TrajectoryView:
    """Feed it engine events; it redraws a table of tokens, steps and running scores.

    A search adds rows as it goes: a fork (``--strategy beam``) starts with its parent's
    tokens, steps and score, and says whose fork it is and after how many tokens; a fresh
    start (``--strategy early-stop``, in waves) starts empty. ``confidence`` (a head's
    calibration) adds a column of the running scores as calibrated confidences.
    """

    def __init__(self, n: int, console: Console | None = None, title: str = "",
                 confidence: Callable[[float], float] | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.title = title
        self.confidence = confidence
        self.tokens = [0] * n
        self.steps = [0] * n
        self.last_step = [None] * n
        self.score = [0.0] * n
        self.state = ["running"] * n
        self.origin = [""] * n
        self._live = Live(self._render(), console=self.console, refresh_per_second=8, transient=False)

    def __enter__(self) -> TrajectoryView:
        self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._live.update(self._render())
        self._live.__exit__(*exc)

    def update(self, event: Event) -> None:
        i = event.index
        if event.kind == "fork":
            p = event.parent
            for col in (self.tokens, self.steps, self.last_step, self.score):
                col.append(col[p])
            self.state.append("running")
            self.origin.append(f"#{p} @{event.n_tokens}")
        elif event.kind == "start":
            for col, fresh in ((self.tokens, 0), (self.steps, 0), (self.last_step, None), (self.score, 0.0),
                               (self.state, "running"), (self.origin, "")):
                col.append(fresh)
        elif event.kind == "token":
            self.tokens[i] = event.n_tokens
        elif event.kind == "step":
            self.steps[i] += 1
            self.last_step[i] = event.step_score
            self.score[i] = event.score
        elif event.kind == "finish":
            self.state[i] = event.finish_reason or "done"
            self.score[i] = event.score
        self._live.update(self._render())

    def _render(self) -> Group:
        table = Table(title=self.title or None, expand=False)
        forked = any(self.origin)
        cols = ("#", "tokens", "steps", "last step", "score") + ("confidence",) * bool(self.confidence) + ("state",)
        for col in cols + (("fork of",) if forked else ()):
            table.add_column(col, justify="left" if col in ("state", "fork of") else "right")
        best = max(range(len(self.score)), key=lambda i: self.score[i]) if self.score else -1
        for i in range(len(self.tokens)):
            stopped = self.state[i] in ("pruned", "early-stop")
            style = "bold green" if i == best and self.steps[i] else "dim" if stopped else ""
            last = f"{self.last_step[i]:.3g}" if self.last_step[i] is not None else "-"
            conf = (f"{self.confidence(self.score[i]):.2f}" if self.steps[i] else "-",) if self.confidence else ()
            row = [str(i), str(self.tokens[i]), str(self.steps[i]), last, f"{self.score[i]:.3g}", *conf, self.state[i]]
            table.add_row(*row, *([self.origin[i]] if forked else []), style=style)
        return Group(table, Text(""))


# Strategy names as a person reads them, for the summary.
_PICKED_BY = {"best": "SPRM best-of-N", "prune": "SPRM best-of-N with pruning", "majority": "majority vote",
              "weighted": "SPRM-weighted vote", "beam": "SPRM beam search", "early-stop": "SPRM-weighted vote, stopped early"}
_SHOWN = 8  # candidates listed one per line; the rest are summed up


def summary_lines(result) -> list[str]:
    """What ``edge-ms solve`` reports beside the answer: speed, each candidate's final answer with
    its confidence, the vote over answers, and which trajectory was chosen and how."""
    s = result.stats
    secs = max(s.total_s, 1e-9)
    forks = sum(c.parent is not None for c in result.candidates)
    stopped = sum(c.finish_reason in ("pruned", "early-stop") for c in result.candidates)
    search = (f" (+{forks} forks)" if forks else "") + (f", {stopped} stopped early" if stopped else "")
    lines = [f"{result.n} trajectories{search}, {s.generated_tokens} tokens in {secs:.1f} s "
             f"({s.generated_tokens / secs:.1f} tokens/s, KV {s.kv_layout or 'unified'})"]
    order = sorted(range(len(result.candidates)), key=lambda i: -result.candidates[i].score)
    for i in order[:_SHOWN]:
        c = result.candidates[i]
        conf = "" if c.confidence is None else f"confidence {c.confidence:.2f}, "
        mark = "  <- chosen" if i == result.selected else ""
        lines.append(f"  #{i:<2} answer {c.answer_key or '-':>6}  {conf}score {c.score:.3g}, "
                     f"{len(c.step_scores)} steps, {len(c.token_ids)} tokens ({c.finish_reason}){mark}")
    if len(order) > _SHOWN:
        lines.append(f"  ... and {len(order) - _SHOWN} more")
    if result.answers:
        parts = [f"{a.answer} ({a.count} of {result.n}" + (")" if a.mass is None else f", mass {a.mass:.2f})")
                 for a in result.answers[:5]]
        more = f" and {len(result.answers) - 5} more" if len(result.answers) > 5 else ""
        lines.append("answers: " + ", ".join(parts) + more)
    best = result.best
    shown = f"score {best.score:.3g}" if best.confidence is None else \
        f"confidence {best.confidence:.2f} (score {best.score:.3g})"
    lines.append(f"chosen by {_PICKED_BY.get(result.strategy, result.strategy)}: trajectory {result.selected} "
                 f"of {result.n}, {shown}, {len(best.step_scores)} steps, {len(best.token_ids)} tokens "
                 f"({best.finish_reason})")
    return lines
