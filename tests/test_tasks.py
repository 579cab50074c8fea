"""The arithmetic generator and task files, as a user of them would notice."""

from __future__ import annotations

import json
import re

import pytest

from edge_ms.answers import is_correct
from edge_ms.errors import EdgeMSError
from edge_ms.tasks import (
    ArithConfig,
    Problem,
    arith_messages,
    chat_messages,
    load_jsonl,
    make_problems,
    save_jsonl,
)


def _canonical(p: Problem) -> tuple[str, ...]:
    """The arithmetic of a problem: its worked steps fix the start value and every operation."""
    return p.steps


WIDE = ArithConfig(min_ops=2, max_ops=4, start_range=(1, 30), k_range=(1, 20))


def test_train_and_test_never_share_a_problem():
    train = make_problems("train", 5000, seed=0, config=WIDE)
    test = make_problems("test", 1000, seed=0, config=WIDE)
    assert len(train) == 5000 and len(test) == 1000
    train_keys = {_canonical(p) for p in train}
    test_keys = {_canonical(p) for p in test}
    assert len(test_keys) == 1000  # distinct within the split too
    assert not train_keys & test_keys
    # Disjoint whatever the seeds: another train seed does not reach the test problems either.
    assert not {_canonical(p) for p in make_problems("train", 2000, seed=123, config=WIDE)} & test_keys


def test_small_spaces_split_whole_and_refuse_to_overdraw():
    """Two operations on numbers up to 10 make a few hundred problems per split: all of them can be
    drawn, they never overlap, and asking for more than exist is a clear error."""
    small = ArithConfig(start_range=(1, 10), k_range=(1, 5))
    train = make_problems("train", 600, seed=0, config=small)
    test = make_problems("test", 150, seed=0, config=small)
    assert not {_canonical(p) for p in train} & {_canonical(p) for p in test}
    with pytest.raises(EdgeMSError, match=r"arith: only \d+ distinct test problems exist, 1000 asked for"):
        make_problems("test", 1000, seed=0, config=small)


def test_default_has_room_for_a_300_problem_benchmark():
    test = make_problems("test", 300, seed=1)
    assert len({_canonical(p) for p in test}) == 300
    assert not {_canonical(p) for p in test} & {_canonical(p) for p in make_problems("train", 1000, seed=0)}


def test_few_shot_examples_are_never_test_problems():
    test = {_canonical(p) for p in make_problems("test", 440, seed=0)}
    test |= {
        _canonical(p)
        for p in make_problems("test", 150, seed=0, config=ArithConfig(start_range=(1, 10), k_range=(1, 5)))
    }
    shots = [m["content"] for m in arith_messages("?") if m["role"] == "assistant"]
    assert len(shots) >= 8
    for work in shots:
        steps = tuple(line.split(": ", 1)[1] for line in work.split("\n")[:-1])
        assert steps not in test


def test_same_seed_same_problems_other_seed_other_problems():
    a = make_problems("test", 50, seed=4)
    assert a == make_problems("test", 50, seed=4)
    assert a != make_problems("test", 50, seed=5)
    assert make_problems("test", 20, seed=4) == a[:20]


def test_answers_follow_from_the_steps_and_stay_non_negative():
    for p in make_problems("train", 300, seed=1) + make_problems("train", 300, seed=1, config=WIDE):
        value = None
        assert 2 <= len(p.steps) <= 4
        for line in p.steps:
            m = re.fullmatch(r"(\d+) ([-+*]) (\d+) = (\d+)\.", line)
            assert m, line
            a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
            assert value is None or a == value  # each step continues from the last result
            assert c == {"+": a + b, "-": a - b, "*": a * b}[op] and c >= 0
            value = c
        assert p.answer == str(value)
        assert p.prompt.startswith(
            tuple(
                f"{n} has "
                for n in (
                    "Tom",
                    "Anna",
                    "Ben",
                    "Mia",
                    "Sam",
                    "Lucy",
                    "Omar",
                    "Nina",
                    "Leo",
                    "Ella",
                    "Raj",
                    "Zoe",
                )
            )
        )
        assert p.prompt.endswith("have now?")


def test_problems_vary_in_wording():
    probs = make_problems("train", 200, seed=2)
    assert len({p.prompt.split()[0] for p in probs}) >= 8  # names
    assert len({p.prompt.split()[3].rstrip(".") for p in probs}) >= 8  # objects
    assert len({len(p.steps) for p in probs}) >= 1


def test_bad_arguments():
    with pytest.raises(EdgeMSError, match="unknown split 'dev'"):
        make_problems("dev", 3, seed=0)
    with pytest.raises(EdgeMSError, match=">= 0"):
        make_problems("train", -1, seed=0)


def test_arith_messages_are_few_shot_chat_ending_with_the_question():
    p = make_problems("test", 1, seed=0)[0]
    msgs = chat_messages(p)
    assert [m["role"] for m in msgs[-1:]] == ["user"]
    assert p.prompt in msgs[-1]["content"]
    roles = [m["role"] for m in msgs]
    assert "assistant" in roles
    for m in msgs:
        assert set(m) == {"role", "content"}
        if m["role"] == "assistant":
            # Worked examples follow the format we score: one calculation per line, then the answer line.
            *steps, last = m["content"].split("\n")
            assert all(
                re.fullmatch(
                    r"[A-Z][a-z]+ [a-z ]+ \d+( more)?( from a friend| to a neighbour)?: \d+ [-+*] \d+ = \d+\.",
                    s,
                )
                for s in steps
            ), steps
            assert re.fullmatch(r"The answer is \d+\.", last)
            assert is_correct(m["content"], last.split()[-1].rstrip("."))


def test_plain_problem_is_one_user_turn():
    msgs = chat_messages(Problem(prompt="What is 2+2?", answer="4"))
    assert msgs == [{"role": "user", "content": "What is 2+2?"}]


def test_jsonl_round_trip(tmp_path):
    probs = make_problems("test", 5, seed=3) + [Problem(prompt="Find x.", answer="\\frac{1}{2}")]
    path = tmp_path / "t.jsonl"
    save_jsonl(path, probs)
    back = load_jsonl(path)
    assert [(p.prompt, p.answer, p.task) for p in back] == [(p.prompt, p.answer, p.task) for p in probs]
    assert [p.name for p in tmp_path.iterdir()] == ["t.jsonl"]  # no temp file left behind


def test_loads_a_benchmark_file_in_the_published_format(tmp_path):
    # The published evaluation's files: one {"prompt", "answer"} object per line, the prompt
    # carrying its own instruction (so the task is "plain": posed as one user turn).
    tail = " Please reason step by step, and put your final answer within \\boxed{}."
    lines = [{"prompt": "Find the sum of all positive divisors of 28." + tail, "answer": "56"},
             {"prompt": "How many primes are less than 30?" + tail, "answer": 10}]
    path = tmp_path / "bench.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    probs = load_jsonl(path)
    assert [p.answer for p in probs] == ["56", "10"]
    assert all(p.task == "plain" and "\\boxed{}" in p.prompt for p in probs)
    assert chat_messages(probs[0]) == [{"role": "user", "content": lines[0]["prompt"]}]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"prompt": "a", "answer": "1"}\n{"prompt": "b"\n', "line 2: not valid JSON"),
        ('{"prompt": "a", "answer": "1"}\n' + "[" * 100_000 + "\n", "line 2: not valid JSON (nested too deeply)"),
        ('{"prompt": "a", "answer": "1"}\n\n[1, 2]\n', "line 3: expected a JSON object, got list"),
        ('{"prompt": "a"}\n', "line 1: missing field 'answer'"),
        ('{"prompt": "", "answer": "1"}\n', "line 1: 'prompt' must be a non-empty string"),
        ('{"prompt": "a", "answer": null}\n', "line 1: 'answer' must be a string or a number"),
        ('{"prompt": "a", "answer": 1, "task": "poetry"}\n', "line 1: unknown task 'poetry'"),
        ("\n\n", "no problems in task file"),
    ],
)
def test_bad_task_files_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(EdgeMSError) as err:
        load_jsonl(path)
    assert str(err.value) == f"{path}: {message}" or str(err.value).startswith(f"{path}: {message}")
    assert "\n" not in str(err.value)


def test_missing_and_binary_task_files(tmp_path):
    with pytest.raises(EdgeMSError, match=r"nope\.jsonl: no such file"):
        load_jsonl(tmp_path / "nope.jsonl")
    bad = tmp_path / "bin.jsonl"
    bad.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(EdgeMSError, match="cannot read task file"):
        load_jsonl(bad)


def test_numeric_answers_are_kept_as_text(tmp_path):
    path = tmp_path / "n.jsonl"
    path.write_text(json.dumps({"prompt": "q", "answer": 204}) + "\n")
    assert load_jsonl(path)[0].answer == "204"
