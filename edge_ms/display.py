"""A live terminal view of the N trajectories (rich), used by ``edge-ms solve``."""

from __future__ import annotations

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from edge_ms.engine import Event


class TrajectoryView:
    """Feed it engine events; it redraws a table of tokens, steps and running scores.

    A search adds rows as it goes: a fork (``--strategy beam``) starts with its parent's
    tokens, steps and score, and says whose fork it is and after how many tokens; a fresh
    start (``--strategy early-stop``, in waves) starts empty.
    """

    def __init__(self, n: int, console: Console | None = None, title: str = "") -> None:
        self.console = console or Console(stderr=True)
        self.title = title
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
        for col in ("#", "tokens", "steps", "last step", "score", "state") + (("fork of",) if forked else ()):
            table.add_column(col, justify="left" if col in ("state", "fork of") else "right")
        best = max(range(len(self.score)), key=lambda i: self.score[i]) if self.score else -1
        for i in range(len(self.tokens)):
            stopped = self.state[i] in ("pruned", "early-stop")
            style = "bold green" if i == best and self.steps[i] else "dim" if stopped else ""
            last = f"{self.last_step[i]:.3g}" if self.last_step[i] is not None else "-"
            row = [str(i), str(self.tokens[i]), str(self.steps[i]), last, f"{self.score[i]:.3g}", self.state[i]]
            table.add_row(*row, *([self.origin[i]] if forked else []), style=style)
        return Group(table, Text(""))
