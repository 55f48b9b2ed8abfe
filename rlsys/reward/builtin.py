"""Built-in rewards, usable by name in a recipe (`fn: exact_match`), and the name table.

| name            | form       | score                                                          |
| --------------- | ---------- | -------------------------------------------------------------- |
| `math`          | per sample | 1 if math-verify finds the response's answer equal to `answer` |
| `exact_match`   | per sample | 1 if the (extracted) answer equals `answer` as text            |
| `numeric_match` | per sample | 1 if the last number in the response equals `answer`           |
| `regex`         | per sample | 1 if `pattern` matches (a format check)                        |
| `length`        | per sample | 0 up to `max_len` chars/words, then a ramp down to -penalty    |
| `overlong`      | batched    | DAPO soft overlong penalty on response *tokens*                |
| `code_tests`    | per sample | fraction of `tests` that pass, run in a subprocess             |
| `reward_model`  | batched    | a sequence-classification model's logit, served by a Ray actor |
| `task`          | per sample | the built-in data task's verifier (`data.task`)                |

Rewards that compare to a gold answer read it from the dataset field `answer`, or from the
field named by the `answer_key` kwarg.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rlsys.types import Sample

BUILTINS: dict[str, str] = {
    "math": "rlsys.reward.math:math_verify",
    "exact_match": "rlsys.reward.builtin:exact_match",
    "numeric_match": "rlsys.reward.builtin:numeric_match",
    "regex": "rlsys.reward.builtin:regex_match",
    "length": "rlsys.reward.builtin:length_penalty",
    "overlong": "rlsys.reward.builtin:overlong_penalty",
    "code_tests": "rlsys.reward.code:code_tests",
    "reward_model": "rlsys.reward.model:RewardModel",
}
"""Built-in name -> `module:attr`, imported on first use (math-verify and torch are heavy)."""


def gold(meta: dict[str, Any], answer: Any, answer_key: str | None) -> Any:
    """The gold answer: `meta[answer_key]` when a key is given, else `answer`."""
    if answer_key is not None:
        if answer_key not in meta:
            raise KeyError(f"the sample has no field '{answer_key}' (answer_key)")
        return meta[answer_key]
    if answer is None:
        raise KeyError("the sample has no 'answer' field; set answer_key to the gold field")
    return answer


_FLAGS = {"i": re.IGNORECASE, "s": re.DOTALL, "m": re.MULTILINE, "x": re.VERBOSE}


def _flags(flags: str) -> int:
    out = 0
    for ch in flags:
        if ch not in _FLAGS:
            raise ValueError(f"unknown regex flag '{ch}' (use some of {''.join(_FLAGS)})")
        out |= _FLAGS[ch]
    return out


def _norm_text(s: str, ignore_case: bool) -> str:
    s = " ".join(str(s).split())
    return s.lower() if ignore_case else s


def exact_match(
    prompt: str,
    response: str,
    answer: Any = None,
    pattern: str | None = None,
    ignore_case: bool = True,
    answer_key: str | None = None,
    **meta: Any,
) -> float:
    """1.0 when the answer text equals the gold answer (whitespace collapsed, case ignored by
    default). With `pattern`, the answer is its last match in the response (group 1 if the
    pattern has a group); without, the whole response."""
    target = gold(meta, answer, answer_key)
    text = response
    if pattern is not None:
        matches = list(re.finditer(pattern, response, re.DOTALL))
        if not matches:
            return 0.0
        m = matches[-1]
        text = m.group(1) if m.re.groups else m.group(0)
    return float(_norm_text(text, ignore_case) == _norm_text(target, ignore_case))


# -1,234.5e-3, 3/4, .5 ; thousands separators only in groups of three
_NUM = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:[eE][-+]?\d+)?(?:/\d+)?")


def parse_number(text: str) -> float | None:
    """The last number in `text` (integers, decimals, 1,234, 1e-3, a/b), or None."""
    last = None
    for m in _NUM.finditer(text):
        tok = m.group(0)
        if not any(c.isdigit() for c in tok):
            continue
        last = tok
    if last is None:
        return None
    tok = last.replace(",", "")
    try:
        return float(Fraction(tok)) if "/" in tok else float(tok)
    except (ValueError, ZeroDivisionError):
        return None


def numeric_match(
    prompt: str,
    response: str,
    answer: Any = None,
    rel_tol: float = 1e-6,
    abs_tol: float = 1e-9,
    answer_key: str | None = None,
    **meta: Any,
) -> dict[str, float]:
    """1.0 when the last number in the response equals the gold number within tolerance;
    `found` is 1 when the response had a number at all."""
    target = gold(meta, answer, answer_key)
    want = float(target) if isinstance(target, (int, float)) else parse_number(str(target))
    if want is None:
        raise ValueError(f"gold answer {target!r} is not a number")
    got = parse_number(response)
    ok = got is not None and abs(got - want) <= max(abs_tol, rel_tol * abs(want))
    return {"score": float(ok), "found": float(got is not None)}


def regex_match(
    prompt: str, response: str, pattern: str, mode: str = "search", flags: str = "s", **_: Any
) -> float:
    """1.0 when `pattern` matches the response: `mode` search (anywhere) | fullmatch (the whole
    stripped response); `flags` from `i s m x`."""
    if mode not in ("search", "fullmatch"):
        raise ValueError(f"regex mode must be search or fullmatch, got {mode!r}")
    rx = re.compile(pattern, _flags(flags))
    m = rx.search(response) if mode == "search" else rx.fullmatch(response.strip())
    return float(m is not None)


def length_penalty(
    prompt: str,
    response: str,
    max_len: int,
    unit: str = "chars",
    penalty: float = 1.0,
    ramp: int | None = None,
    **_: Any,
) -> dict[str, float]:
    """0 while the response is at most `max_len` chars (or words), then falling linearly to
    `-penalty` at `max_len + ramp` (default ramp = max_len) and staying there."""
    if unit not in ("chars", "words"):
        raise ValueError(f"length unit must be chars or words, got {unit!r}")
    n = len(response) if unit == "chars" else len(response.split())
    ramp = ramp or max_len
    over = max(n - max_len, 0)
    return {"score": -penalty * min(over / ramp, 1.0), "len": float(n)}


def overlong_penalty(
    samples: list[Sample], max_tokens: int, buffer: int, penalty: float = 1.0
) -> list[float]:
    """DAPO's soft overlong penalty (Yu et al. 2025) on each response's token count L:
    0 if L <= max_tokens - buffer, else -penalty * min(L - (max_tokens - buffer), buffer) /
    buffer. Needs token ids (`RewardInput.sample`)."""
    if not 0 < buffer <= max_tokens:
        raise ValueError(f"overlong needs 0 < buffer <= max_tokens, got {buffer}, {max_tokens}")
    out = []
    for s in samples:
        if not s.response_ids and s.meta.get("response_text"):
            raise ValueError("overlong counts tokens: score with RewardInput.sample set")
        out.append(soft_overlong(len(s.response_ids), max_tokens, buffer, penalty))
    return out


def soft_overlong(length: int, max_tokens: int, buffer: int, penalty: float = 1.0) -> float:
    """The DAPO penalty of one response of `length` tokens (formula in `overlong_penalty`)."""
    start = max_tokens - buffer
    return 0.0 if length <= start else -penalty * min(length - start, buffer) / buffer
