"""Math answers checked with Hugging Face's `math-verify` (LaTeX, `\\boxed{}`, fractions, sets,
intervals, equations; symbolic and numeric equality via SymPy).

The gold answer is parsed as LaTeX (wrapped in `$...$` unless it already has `$` or `\\boxed`),
the response with LaTeX first (a `\\boxed{}` answer wins) and plain expressions second.
`verify(gold, pred)` is not symmetric: gold first.

Timeouts: math-verify's own timeout uses `signal.alarm`, which only works on the main thread,
so it is turned off here and the reward pool's `reward.timeout_s` bounds each call instead.
SymPy can spin on adversarial input; with `pool: process` such a call is killed, with
`pool: thread` it is abandoned (see `rlsys.reward.pool`).
"""

from __future__ import annotations

import logging
from typing import Any

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from rlsys.reward.builtin import gold


class _NoTimeoutWarning(logging.Filter):
    """math-verify warns once that its timeout is off; here that is by design (see above)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_NoTimeoutWarning())

_PRED_CONFIG = (
    LatexExtractionConfig(boxed_match_priority=0),  # a boxed answer beats any other LaTeX
    ExprExtractionConfig(),
)


def parse_gold(answer: Any) -> list:
    """math-verify's parse of a gold answer given as a number or a LaTeX / plain string."""
    text = str(answer).strip()
    if "$" not in text and "\\boxed" not in text:
        text = f"${text}$"
    return parse(text, parsing_timeout=None)  # type: ignore[arg-type]


def math_verify(
    prompt: str,
    response: str,
    answer: Any = None,
    answer_key: str | None = None,
    float_rounding: int = 6,
    **meta: Any,
) -> dict[str, float]:
    """1.0 when the response's final answer equals the gold `answer` (math-verify), else 0.0.
    `extracted` is 1 when an answer could be parsed from the response at all."""
    target = parse_gold(gold(meta, answer, answer_key))
    if not target:
        raise ValueError(f"math-verify cannot parse the gold answer {answer!r}")
    pred = parse(response, extraction_config=_PRED_CONFIG, parsing_timeout=None)  # type: ignore[arg-type]
    ok = bool(pred) and verify(target, pred, float_rounding=float_rounding, timeout_seconds=None)
    return {"score": float(ok), "extracted": float(bool(pred))}
