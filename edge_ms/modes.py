"""Effort modes: how many trajectories low / medium / high mean, and the limits on N."""

from __future__ import annotations

from edge_ms.errors import EdgeMSError

# The published modes (docs/method.md): N trajectories per effort level.
MODES = {"low": 2, "medium": 8, "high": 32}

# llama.cpp refuses contexts with more parallel sequences than this (LLAMA_MAX_SEQ).
MAX_SEQUENCES = 256


def resolve_n(mode: str, n: int | None) -> int:
    """N for an explicit ``n`` or a mode name; one line naming the bad value otherwise."""
    if n is not None:
        if n < 1:
            raise EdgeMSError(f"--n {n}: need at least one trajectory")
        if n > MAX_SEQUENCES:
            raise EdgeMSError(f"--n {n}: llama.cpp runs at most {MAX_SEQUENCES} sequences in parallel")
        return n
    if mode not in MODES:
        raise EdgeMSError(f"--mode {mode}: unknown mode (choose from {', '.join(MODES)})")
    return MODES[mode]
