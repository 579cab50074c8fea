"""Final-answer extraction and checking, as voting and training rely on them."""

from __future__ import annotations

from edge_ms.answers import extract_answer, is_correct


def test_extract_answer_forms():
    assert extract_answer("3 + 4 = 7.\nThe answer is 7.") == "7"
    assert extract_answer("The answer is 5. Wait, no. The answer is 6.") == "6"
    assert extract_answer("so the answer is: 1,234") == "1234"
    assert extract_answer("Thus \\boxed{204}.") == "204"
    assert extract_answer("\\boxed{\\frac{1}{2}} and more") == "\\frac{1}{2}"
    assert extract_answer("The answer is 3. Finally \\boxed{4}") == "4"  # the later one wins
    assert extract_answer("\\boxed{5} hmm, the answer is 6.") == "6"
    assert extract_answer("3 + 4 = 7.") is None
    assert extract_answer("") is None
    assert extract_answer("\\boxed{unclosed") is None
    assert extract_answer(None) is None  # type: ignore[arg-type]


def test_is_correct():
    assert is_correct("12 + 7 = 19.\nThe answer is 19.", "19")
    assert not is_correct("12 + 7 = 19.\nThe answer is 18.", "19")
    # A number in the work is not an answer: without the answer line nothing is claimed.
    assert not is_correct("12 + 7 = 19.", "19")
    assert is_correct("so \\boxed{0.5}", "\\frac{1}{2}")
    assert is_correct("The answer is 1,234.", "1234")
    assert is_correct("\\boxed{033}", "33")
    for junk in [
        "",
        "\\boxed{}",
        "The answer is",
        "\\boxed{\\frac{{}}",
        "\x00\xff" * 50,
        "The answer is " + "9" * 500,
    ]:
        assert not is_correct(junk, "19")


def test_is_correct_off_the_main_thread():
    """The HTTP server checks answers in worker threads, where math-verify may not use SIGALRM."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        got = list(
            pool.map(lambda t: is_correct(*t), [("\\boxed{0.5}", "\\frac{1}{2}"), ("The answer is 3.", "4")])
        )
    assert got == [True, False]
