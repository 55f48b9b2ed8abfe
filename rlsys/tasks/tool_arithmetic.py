"""Harder arithmetic that a model may solve with the sandboxed `python` tool.

Problems are 3-4 digit products, sums of three or four 3-4 digit numbers, and `a * b + c`,
drawn deterministically from a seed; train and held-out splits come from disjoint seed streams
and the held-out split never repeats a train problem. The prompt's system message teaches the
tool call format of the `code_block` parser (a fenced ```python block whose printed output comes
back as the next message) and asks for a final line `Answer: <number>`; by default a one-shot
demonstration follows, as real chat turns in exactly the format the `ToolEnv` produces
(SmolLM2-135M-Instruct never calls the tool from the instruction alone, and greedily solved
3/3 problems with the demonstration).

The reward reads the *final answer*: the response passed to it must be the last assistant turn
(`rlsys.rollout.agent.final_response`). Fenced code blocks are ignored (code is not an answer);
an `Answer:` line wins, else the last integer of the remaining text. 1.0 if it equals the
answer, else 0.0.
"""

from __future__ import annotations

import random
import re
from typing import Any

from rlsys.tasks.arithmetic import extract_answer

SYSTEM = (
    "You are a careful assistant that solves arithmetic problems. You may run Python: write "
    "the code in a ```python fenced block and print() what you need; its output will come "
    "back in the next message. When you know the result, reply with a final line "
    "'Answer: <number>' and no code."
)
DEMO = [
    {"role": "user", "content": "What is 123 * 456?"},
    {"role": "assistant", "content": "```python\nprint(123 * 456)\n```"},
    {"role": "user", "content": "Output:\n56088"},
    {"role": "assistant", "content": "Answer: 56088"},
]
KINDS = ("mul", "sum", "muladd")
_FENCE = re.compile(r"```.*?(```|$)", re.S)
_ANSWER = re.compile(r"answer\s*[:=]\s*(-?[\d,]+)", re.I)


def final_answer(response: str) -> int | None:
    """The answer in a final assistant turn: its last `Answer: N`, else its last integer,
    outside fenced code blocks; None when there is none."""
    text = _FENCE.sub(" ", response)
    tagged = _ANSWER.findall(text)
    if tagged:
        return int(tagged[-1].replace(",", ""))
    return extract_answer(text)


def reward(prompt: str, response: str, answer: int | str, **_: Any) -> float:
    """1.0 when the final answer of `response` (the last assistant turn) equals `answer`."""
    got = final_answer(response)
    return 1.0 if got is not None and got == int(answer) else 0.0


def _problem(rng: random.Random, kinds: tuple[str, ...]) -> tuple[str, int]:
    def num() -> int:
        return rng.randint(100, 9999)

    kind = rng.choice(kinds)
    if kind == "mul":
        a, b = num(), num()
        return f"{a} * {b}", a * b
    if kind == "sum":
        xs = [num() for _ in range(rng.choice((3, 4)))]
        return " + ".join(map(str, xs)), sum(xs)
    a, b, c = num(), num(), num()
    return f"{a} * {b} + {c}", a * b + c


def make_split(
    n: int,
    seed: int,
    kinds: tuple[str, ...] = KINDS,
    system_prompt: bool = True,
    demo: bool = True,
    exclude: set[str] | None = None,
) -> list[dict]:
    """`n` problems as dicts with `prompt` (chat messages), `answer` and `expression`."""
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"unknown problem kinds {bad} (use some of {', '.join(KINDS)})")
    rng = random.Random(seed)
    out: list[dict] = []
    exclude = exclude or set()
    while len(out) < n:
        expr, value = _problem(rng, tuple(kinds))
        if expr in exclude:
            continue
        msgs = [{"role": "user", "content": f"What is {expr}?"}]
        if demo:
            msgs = [dict(m) for m in DEMO] + msgs
        if system_prompt:
            msgs.insert(0, {"role": "system", "content": SYSTEM})
        out.append({"prompt": msgs, "answer": value, "expression": expr})
    return out


def make_task(
    num_train: int,
    num_eval: int,
    seed: int,
    kinds: list[str] | tuple[str, ...] = KINDS,
    system_prompt: bool = True,
    demo: bool = True,
) -> tuple[list[dict], list[dict]]:
    """Train and held-out splits (the held-out split avoids every train expression).
    `system_prompt` adds the tool instructions, `demo` the one-shot demonstration."""
    train = make_split(num_train, seed * 2 + 1, tuple(kinds), system_prompt, demo)
    seen = {r["expression"] for r in train}
    held = make_split(num_eval, seed * 2 + 2, tuple(kinds), system_prompt, demo, exclude=seen)
    return train, held
