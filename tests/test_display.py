"""The terminal view of `edge-ms solve`: one row per trajectory, forks of a search included."""

from __future__ import annotations

import io

from rich.console import Console

from edge_ms.display import TrajectoryView
from edge_ms.reasoner import Reasoner


def test_view_grows_a_row_per_fork_and_shows_whose_fork_it_is(converted):
    r = Reasoner.load(converted("tiny-qwen2", "f32"))
    out = io.StringIO()
    try:
        with TrajectoryView(8, console=Console(file=out, width=140, force_terminal=False)) as view:
            res = r.solve("Compute 12 * 7 step by step.", n=8, seed=11, max_new_tokens=80, strategy="beam",
                          on_event=view.update)
    finally:
        r.close()
    assert len(view.tokens) == len(res.candidates) > 8
    for c in res.candidates:
        assert view.tokens[c.index] == len(c.token_ids)
        assert view.steps[c.index] >= len([p for p in c.step_positions if p >= len(res.prompt_token_ids) - 1])
        assert view.state[c.index] == c.finish_reason
        assert view.origin[c.index] == ("" if c.parent is None else f"#{c.parent} @{c.fork_at}")
    last = out.getvalue().split("fork of")[-1]  # the final table
    fork = next(c for c in res.candidates if c.parent is not None)
    assert f"#{fork.parent} @{fork.fork_at}" in last and "pruned" in last
