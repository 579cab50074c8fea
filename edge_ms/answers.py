"""Final answers: what a trajectory's text states as its answer, and whether it is right.

``extract_answer`` gives the key that votes group by; ``is_correct`` labels trajectories
for training and scores benchmarks (math-verify equivalence, so 0.5 equals \\frac{1}{2}).
"""

from __future__ import annotations

import logging
import re
import threading

_ANSWER_RE = re.compile(r"answer is\s*:?\s*\$?\s*(-?[0-9][0-9,]*(?:\.[0-9]+)?)", re.IGNORECASE)
_MAX_ANSWER_CHARS = 200  # longer "answers" are junk; also bounds the work math-verify does


def _last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (balanced braces), or None."""
    start = text.rfind("\\boxed")
    while start != -1:
        i = start + len("\\boxed")
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1 : j].strip()
        start = text.rfind("\\boxed", 0, start)
    return None


def extract_answer(text: str) -> str | None:
    """The final answer stated in ``text``: the last "The answer is N" or the last \\boxed{...}.

    Whichever of the two comes last in the text wins; None when there is neither.
    """
    if not isinstance(text, str):
        return None
    candidates: list[tuple[int, str]] = []
    matches = list(_ANSWER_RE.finditer(text))
    if matches:
        m = matches[-1]
        candidates.append((m.start(), m.group(1).replace(",", "")))
    boxed_at = text.rfind("\\boxed")
    boxed = _last_boxed(text)
    if boxed:
        candidates.append((boxed_at, boxed))
    if not candidates:
        return None
    answer = max(candidates)[1]
    if not answer or len(answer) > _MAX_ANSWER_CHARS:
        return None
    return answer


def is_correct(text: str, answer: str) -> bool:
    """Whether the final answer stated in ``text`` equals ``answer`` (math-verify equivalence)."""
    got = extract_answer(text)
    if got is None:
        return False
    gold = str(answer).strip()
    if got == gold:
        return True
    from math_verify import parse, verify

    # math-verify's timeouts use SIGALRM, which only the main thread may set; off the main
    # thread (the HTTP server's workers) run without, relying on the length cap above.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    if timeout is None:
        logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns on every call without one
    try:
        gold_parsed = parse(f"${gold}$", parsing_timeout=timeout)
        got_parsed = parse(f"${got}$", parsing_timeout=timeout)
        if not gold_parsed or not got_parsed:
            return False
        return bool(verify(gold_parsed, got_parsed, timeout_seconds=timeout))
    except Exception:  # math-verify raises on junk it cannot parse; junk is simply wrong
        return False
