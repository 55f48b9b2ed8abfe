"""The arithmetic task: deterministic splits and the last-integer verifier."""

from __future__ import annotations

import pytest

from rlsys.tasks.arithmetic import extract_answer, make_task, verify


@pytest.mark.parametrize(
    "response, answer, expected",
    [
        ("7", 7, 1.0),
        ("3 + 4 = 7", 7, 1.0),
        ("The answer is 7.", 7, 1.0),
        ("7 is wrong, it is 8", 7, 0.0),
        ("The answer is -3", -3, 1.0),
        ("1,234", 1234, 1.0),
        ("seventy", 70, 0.0),
        ("", 0, 0.0),
        ("12", 1, 0.0),
    ],
)
def test_verify(response: str, answer: int, expected: float) -> None:
    assert verify(response, answer) == expected


def test_extract_answer_none_without_digits() -> None:
    assert extract_answer("no digits here") is None


def test_splits_are_deterministic_and_correct() -> None:
    train1, held1 = make_task(50, 10, seed=3, max_operand=20, ops="+-*")
    train2, held2 = make_task(50, 10, seed=3, max_operand=20, ops="+-*")
    assert train1 == train2 and held1 == held2
    assert make_task(50, 10, seed=4, max_operand=20, ops="+-*")[0] != train1
    for r in train1 + held1:
        a, b, op = r["a"], r["b"], r["op"]
        assert r["answer"] == {"+": a + b, "-": a - b, "*": a * b}[op]
        assert f"{a} {op} {b}" in r["prompt"][0]["content"]
    seen = {(r["a"], r["op"], r["b"]) for r in train1}
    assert not any((r["a"], r["op"], r["b"]) in seen for r in held1)


def test_unknown_operator_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown operator"):
        make_task(5, 5, seed=0, ops="/")
