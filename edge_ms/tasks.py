"""Tasks: the seeded arithmetic word-problem generator, its few-shot chat prompts, JSONL task files.

The arithmetic task exists to train and test an SPRM head on a model small enough to ship
(SmolLM2-135M-Instruct): problems are short, one reasoning step per line, and the final
line is "The answer is N." so that correctness is checked exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from edge_ms.atomic import atomic_write
from edge_ms.errors import EdgeMSError, fail
from edge_ms.jsonio import parse_json

__all__ = [
    "Problem",
    "make_problems",
    "chat_messages",
    "arith_messages",
    "load_jsonl",
    "save_jsonl",
    "SPLITS",
]

SPLITS = ("train", "test")


@dataclass(frozen=True)
class Problem:
    """One task: the question as the user asks it, and the reference final answer.

    ``task`` picks the chat prompt (``"arith"``: few-shot, one step per line; ``"plain"``:
    the prompt alone, e.g. AIME files whose prompts carry their own instructions).
    ``steps`` is the worked solution of a generated problem (empty for loaded ones).
    """

    prompt: str
    answer: str
    task: str = "plain"
    steps: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------
# The arithmetic generator.
#
# A problem is a canonical tuple (start, ((op, k), ...)) rendered with a name, an object
# and one phrase per operation. Train and test are disjoint by construction: a stable hash
# of the canonical tuple assigns every tuple to exactly one split, each split draws from
# its own seed stream, and duplicates within a split are dropped.

_NAMES = ("Tom", "Anna", "Ben", "Mia", "Sam", "Lucy", "Omar", "Nina", "Leo", "Ella", "Raj", "Zoe")
_OBJECTS = ("apples", "marbles", "stickers", "coins", "books", "cards", "pencils", "shells", "stamps", "eggs")
# Phrases take the amount k; {o} is the object.
_ADD = (
    "buys {k} more",
    "finds {k} more",
    "gets {k} more from a friend",
    "is given {k} more",
    "wins {k} more",
)
_SUB = ("gives away {k}", "loses {k}", "sells {k}", "gives {k} to a neighbour", "uses {k}")
_MUL = {2: ("doubles them",), 3: ("triples them",)}

_TEST_SHARE = 5  # one canonical tuple in _TEST_SHARE belongs to the test split


@dataclass(frozen=True)
class ArithConfig:
    """The difficulty of generated problems."""

    min_ops: int = 2
    max_ops: int = 2
    # 2187 distinct problems, 442 of them in the test split. Small numbers: SmolLM2-135M is
    # already weak at two steps, and larger ones made it weaker (docs/experiments.md, section 3).
    start_range: tuple[int, int] = (1, 10)
    k_range: tuple[int, int] = (1, 9)
    ops: tuple[str, ...] = ("+", "-")  # any of "+", "-", "*" (doubles / triples)


DEFAULT_ARITH = ArithConfig()


def _split_of(key: tuple) -> str:
    digest = hashlib.sha256(repr(key).encode()).digest()
    return "test" if digest[0] % _TEST_SHARE == 0 else "train"


def _draw_key(rng: random.Random, cfg: ArithConfig) -> tuple | None:
    """A random canonical problem, or None when the draw ran out of allowed operations."""
    start = rng.randint(*cfg.start_range)
    value = start
    ops = []
    for _ in range(rng.randint(cfg.min_ops, cfg.max_ops)):
        # Only operations that keep every intermediate result a small non-negative integer.
        choices = [
            op for op in cfg.ops if (op != "-" or value >= cfg.k_range[0]) and (op != "*" or value <= 30)
        ]
        if not choices:
            return None
        op = rng.choice(choices)
        if op == "+":
            k = rng.randint(*cfg.k_range)
            value += k
        elif op == "-":
            k = rng.randint(cfg.k_range[0], min(value, cfg.k_range[1]))
            value -= k
        else:
            k = rng.choice((2, 3))
            value *= k
        ops.append((op, k))
    return (start, tuple(ops))


def _solve(key: tuple) -> tuple[int, tuple[str, ...]]:
    value, ops = key
    lines = []
    for op, k in ops:
        new = value + k if op == "+" else value - k if op == "-" else value * k
        sym = {"+": "+", "-": "-", "*": "*"}[op]
        lines.append(f"{value} {sym} {k} = {new}.")
        value = new
    return value, tuple(lines)


def _question(name: str, obj: str, start: int, phrases: list[str]) -> str:
    if len(phrases) == 1:
        actions = phrases[0]
    else:
        actions = ", ".join(phrases[:-1]) + " and then " + phrases[-1]
    return f"{name} has {start} {obj}. {name} {actions}. How many {obj} does {name} have now?"


def _render(key: tuple, rng: random.Random) -> str:
    start, ops = key
    name = rng.choice(_NAMES)
    obj = rng.choice(_OBJECTS)
    phrases = []
    for op, k in ops:
        table = _ADD if op == "+" else _SUB if op == "-" else _MUL[k]
        phrases.append(rng.choice(table).format(k=k, o=obj))
    return _question(name, obj, start, phrases)


def make_problems(split: str, n: int, seed: int, config: ArithConfig = DEFAULT_ARITH) -> list[Problem]:
    """``n`` distinct arithmetic word problems of ``split`` ("train" or "test").

    The same (split, n, seed, config) always gives the same problems; no test problem's
    arithmetic (start value and operations) ever appears in a train split, whatever the seeds.
    """
    if split not in SPLITS:
        raise EdgeMSError(f"arith: unknown split {split!r} (expected one of {', '.join(SPLITS)})")
    if n < 0:
        raise EdgeMSError(f"arith: number of problems must be >= 0, got {n}")
    bad_ops = set(config.ops) - {"+", "-", "*"}
    if not config.ops or bad_ops:
        raise EdgeMSError(
            f"arith: operations must be some of +, -, * (got {', '.join(config.ops) or 'none'})"
        )
    if not 1 <= config.min_ops <= config.max_ops:
        raise EdgeMSError(f"arith: need 1 <= min_ops <= max_ops, got {config.min_ops} and {config.max_ops}")
    for name, (lo, hi) in (("start_range", config.start_range), ("k_range", config.k_range)):
        if not 0 <= lo <= hi:
            raise EdgeMSError(f"arith: {name} must be 0 <= low <= high, got {lo}..{hi}")
    rng = random.Random(f"edge_ms-arith-{split}-{seed}")
    seen: set[tuple] = set()
    out: list[Problem] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 200 * n + 10_000:
            raise EdgeMSError(
                f"arith: only {len(out)} distinct {split} problems exist, {n} asked for (widen the ranges)"
            )
        key = _draw_key(rng, config)
        if key is None or key in seen or _split_of(key) != split:
            continue
        seen.add(key)
        answer, steps = _solve(key)
        out.append(Problem(prompt=_render(key, rng), answer=str(answer), task="arith", steps=steps))
    return out


# ---------------------------------------------------------------------------------------
# Chat prompts. The runtime applies the GGUF's chat template to these messages.
#
# Each worked step restates its action before the equation ("Tom buys 3 more: 5 + 3 = 8."):
# a small model mostly mistakes which operation a phrase means and miscopies numbers, and
# restating the phrase ties each equation to its words (the variants measured are in
# docs/experiments.md, section 3).

_SYSTEM = "Solve the word problem. Write one calculation per line. End with: The answer is N."

# Worked examples: (name, object, start, ((phrase, op, k), ...)). Their arithmetic lies in
# the train split (a test checks it), so no test problem repeats an example. Every pair of
# operations appears, each phrase at least once.
_SHOTS = (
    ("Tom", "apples", 5, (("buys {k} more", "+", 3), ("gives away {k}", "-", 2))),
    ("Mia", "cards", 9, (("loses {k}", "-", 4), ("sells {k}", "-", 2))),
    ("Sam", "coins", 4, (("finds {k} more", "+", 5), ("is given {k} more", "+", 2))),
    ("Nina", "shells", 8, (("uses {k}", "-", 5), ("wins {k} more", "+", 4))),
    ("Leo", "marbles", 6, (("gets {k} more from a friend", "+", 4), ("loses {k}", "-", 3))),
    ("Anna", "stickers", 10, (("gives {k} to a neighbour", "-", 5), ("buys {k} more", "+", 3))),
    ("Ben", "books", 3, (("wins {k} more", "+", 1), ("finds {k} more", "+", 4))),
    ("Zoe", "stamps", 7, (("sells {k}", "-", 2), ("gives away {k}", "-", 4))),
    ("Raj", "pencils", 2, (("is given {k} more", "+", 5), ("uses {k}", "-", 1))),
    ("Ella", "eggs", 9, (("gives away {k}", "-", 6), ("gets {k} more from a friend", "+", 3))),
)


def _shot_key(shot: tuple) -> tuple:
    _, _, start, acts = shot
    return (start, tuple((op, k) for _, op, k in acts))


def _shot_messages(shot: tuple) -> list[dict[str, str]]:
    name, obj, start, acts = shot
    phrases = [phrase.format(k=k) for phrase, _, k in acts]
    answer, steps = _solve(_shot_key(shot))
    question = _question(name, obj, start, phrases)
    work = [f"{name} {ph}: {st}" for ph, st in zip(phrases, steps)]
    return [
        {"role": "user", "content": question},
        {"role": "assistant", "content": "\n".join(work) + f"\nThe answer is {answer}."},
    ]


def arith_messages(question: str) -> list[dict[str, str]]:
    """The few-shot chat that asks for one calculation per line and a final answer line."""
    messages = [{"role": "system", "content": _SYSTEM}]
    for shot in _SHOTS:
        messages.extend(_shot_messages(shot))
    messages.append({"role": "user", "content": question})
    return messages


# How a plain question is posed to a model: as one user turn, or inside the few-shot arithmetic
# chat (what the embedded default model's head was trained and calibrated on).
PROMPT_STYLES = ("chat", "arith")


def check_prompt_style(style: str) -> str:
    """``style`` itself when it is one of PROMPT_STYLES; one line naming it otherwise."""
    if style not in PROMPT_STYLES:
        raise EdgeMSError(f"--prompt-style {style}: unknown (choose from {', '.join(PROMPT_STYLES)})")
    return style


def styled_messages(question: str, style: str) -> list[dict[str, str]]:
    """The messages that pose ``question`` in ``style`` (one of PROMPT_STYLES)."""
    if check_prompt_style(style) == "arith":
        return arith_messages(question)
    return [{"role": "user", "content": question}]


def chat_messages(problem: Problem) -> list[dict[str, str]]:
    """The messages that pose ``problem`` to a chat model."""
    if problem.task == "arith":
        return arith_messages(problem.prompt)
    return [{"role": "user", "content": problem.prompt}]


# ---------------------------------------------------------------------------------------
# JSONL task files: one {"prompt": ..., "answer": ...} object per line (optional "task").


def load_jsonl(path: str | os.PathLike) -> list[Problem]:
    """Read a task file; a bad line raises EdgeMSError naming the file and the line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise fail(path, "no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise fail(path, f"cannot read task file ({err.__class__.__name__}: {err})") from None
    problems = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        row = parse_json(line, path, f"line {lineno}: ")
        if not isinstance(row, dict):
            raise fail(path, f"line {lineno}: expected a JSON object, got {type(row).__name__}")
        for field in ("prompt", "answer"):
            if field not in row:
                raise fail(path, f"line {lineno}: missing field {field!r}")
        prompt, answer = row["prompt"], row["answer"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise fail(path, f"line {lineno}: 'prompt' must be a non-empty string")
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise fail(path, f"line {lineno}: 'answer' must be a string or a number")
        task = row.get("task", "plain")
        if task not in ("plain", "arith"):
            raise fail(path, f"line {lineno}: unknown task {task!r} (expected 'plain' or 'arith')")
        problems.append(Problem(prompt=prompt, answer=str(answer).strip(), task=task))
    if not problems:
        raise fail(path, "no problems in task file")
    return problems


def save_jsonl(path: str | os.PathLike, problems: list[Problem]) -> None:
    """Write ``problems`` as a task file, atomically (a temp file in the same folder, then rename)."""
    path = Path(path)
    lines = [json.dumps({"prompt": p.prompt, "answer": p.answer, "task": p.task}) for p in problems]
    with atomic_write(path) as f:
        f.write("\n".join(lines) + "\n")
