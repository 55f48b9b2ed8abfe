"""Arithmetic with verifiable answers.

Problems `a op b` are drawn deterministically from a seed; the train and held-out splits come
from disjoint seed streams and the held-out split never repeats a train problem. The verifier
reads the *last* integer in the response (the convention of GSM8K-style graders) and scores 1.0
when it equals the answer, else 0.0.
"""

from __future__ import annotations

import random
import re
from typing import Any

_INT = re.compile(r"-?\d+")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}

PROMPT = "What is {a} {op} {b}? Answer with just the number."


def extract_answer(response: str) -> int | None:
    """Last integer in the text (commas inside numbers are ignored), or None."""
    nums = _INT.findall(response.replace(",", ""))
    return int(nums[-1]) if nums else None


def verify(response: str, answer: int | str) -> float:
    """1.0 if the last integer in `response` equals `answer`, else 0.0."""
    got = extract_answer(response)
    return 1.0 if got is not None and got == int(answer) else 0.0


def reward(prompt: str, response: str, answer: int | str, **_: Any) -> float:
    """The task's reward in the per-sample reward signature."""
    return verify(response, answer)


def make_split(
    n: int, seed: int, max_operand: int = 9, ops: str = "+", exclude: set | None = None
) -> list[dict]:
    """`n` problems as dicts with `prompt` (chat messages), `answer`, `a`, `b`, `op`."""
    for op in ops:
        if op not in _OPS:
            raise ValueError(f"unknown operator '{op}' (use some of {''.join(_OPS)})")
    rng = random.Random(seed)
    out: list[dict] = []
    exclude = exclude or set()
    space = (max_operand + 1) ** 2 * len(ops)
    while len(out) < n:
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        op = rng.choice(ops)
        if (a, op, b) in exclude and len(exclude) < space:
            continue
        text = PROMPT.format(a=a, op=op, b=b)
        out.append(
            {
                "prompt": [{"role": "user", "content": text}],
                "answer": _OPS[op](a, b),
                "a": a,
                "b": b,
                "op": op,
            }
        )
    return out


def make_task(
    num_train: int, num_eval: int, seed: int, max_operand: int = 9, ops: str = "+"
) -> tuple[list[dict], list[dict]]:
    """Train and held-out splits. The held-out split avoids train problems while the problem
    space allows (single-digit addition has only 100 distinct problems)."""
    train = make_split(num_train, seed * 2 + 1, max_operand, ops)
    seen = {(r["a"], r["op"], r["b"]) for r in train}
    held = make_split(num_eval, seed * 2 + 2, max_operand, ops, exclude=seen)
    return train, held
