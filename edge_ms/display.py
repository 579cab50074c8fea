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

    ``confidence`` (a head's calibration) adds a column of the running scores as calibrated confidences.
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
        self._live = Live(self._render(), console=self.console, refresh_per_second=8, transient=False)

    def __enter__(self) -> TrajectoryView:
        self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._live.update(self._render())
        self._live.__exit__(*exc)

    def update(self, event: Event) -> None:
        i = event.index
        if event.kind == "token":
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
        cols = ("#", "tokens", "steps", "last step", "score") + ("confidence",) * bool(self.confidence) + ("state",)
        for col in cols:
            table.add_column(col, justify="right" if col != "state" else "left")
        best = max(range(len(self.score)), key=lambda i: self.score[i]) if self.score else -1
        for i in range(len(self.tokens)):
            style = "bold green" if i == best and self.steps[i] else ""
            last = f"{self.last_step[i]:.3g}" if self.last_step[i] is not None else "-"
            conf = (f"{self.confidence(self.score[i]):.2f}" if self.steps[i] else "-",) if self.confidence else ()
            table.add_row(str(i), str(self.tokens[i]), str(self.steps[i]), last, f"{self.score[i]:.3g}", *conf,
                          self.state[i], style=style)
        return Group(table, Text(""))
