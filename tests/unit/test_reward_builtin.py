"""Built-in rewards against hand-checked answers."""

from __future__ import annotations

import pytest

from rlsys.reward import RewardConfig, RewardPartConfig, build_scorer, load_reward
from rlsys.reward.builtin import parse_number
from rlsys.reward.code import extract_code, run_python
from rlsys.reward.scorer import RewardInput
from rlsys.types import Sample

# (gold, response, correct?) -- each checked by hand
MATH_CASES = [
    ("\\frac{1}{2}", "The answer is $\\boxed{\\frac{2}{4}}$", True),  # equivalent fraction
    ("\\frac{1}{2}", "I think it is $\\frac{3}{6}$.", True),
    ("1/2", "so the result is 0.5", True),  # plain gold, decimal answer
    ("0.25", "$\\frac14$", True),  # \frac14 shorthand
    ("3", "First 2, then \\boxed{3}", True),  # boxed wins over earlier numbers
    ("3", "\\boxed{4}", False),
    ("\\sqrt{2}/2", "$\\frac{\\sqrt{2}}{2}$", True),  # symbolic equality
    ("\\frac{\\pi}{3}", "\\boxed{\\dfrac{\\pi}{3}}", True),  # \dfrac
    ("x^2+2x+1", "\\boxed{(x+1)^2}", True),  # expanded vs factored
    ("(1,2)", "\\boxed{(1, 2)}", True),  # intervals / tuples
    ("-7", "answer: $\\boxed{-7}$", True),
    ("\\frac{1}{3}", "\\boxed{0.3333}", False),  # not equal to 6 places
    ("12", "there is no answer here", False),
    (1000, "$1000$", True),  # a numeric gold field
]


@pytest.mark.parametrize("gold, response, correct", MATH_CASES)
def test_math_verify_agrees_with_hand_checked_answers(gold, response, correct) -> None:
    score, extras = load_reward("math").call_one("prompt", response, {"answer": gold})
    assert score == float(correct)
    assert extras["extracted"] == float("answer here" not in response)


def test_math_reward_on_a_thread_pool_with_answer_key() -> None:
    """math-verify's signal-based timeout would fail off the main thread; ours is off."""
    cfg = RewardConfig(fn="math", kwargs={"answer_key": "solution"}, workers=2)
    with build_scorer(cfg, None) as scorer:
        out = scorer.score([RewardInput("p", "\\boxed{\\frac{6}{8}}", {"solution": "3/4"})] * 3)
    assert [o.score for o in out] == [1.0] * 3 and scorer.errors == 0


def test_exact_numeric_and_regex_matches() -> None:
    exact = load_reward("exact_match")
    assert exact.call_one("p", "  Paris ", {"answer": "paris"})[0] == 1.0
    assert exact.call_one("p", "Paris, France", {"answer": "paris"})[0] == 0.0
    boxed = load_reward("exact_match", {"pattern": r"\\boxed\{([^}]*)\}"})
    assert boxed.call_one("p", "so \\boxed{B}", {"answer": "b"})[0] == 1.0
    assert boxed.call_one("p", "so B", {"answer": "b"})[0] == 0.0

    num = load_reward("numeric_match")
    assert num.call_one("p", "total: 1,234.50 dollars", {"answer": 1234.5})[0] == 1.0
    assert num.call_one("p", "it is 3/4", {"answer": "0.75"})[0] == 1.0
    assert num.call_one("p", "3 then 5", {"answer": 3}) == (0.0, {"found": 1.0})
    assert num.call_one("p", "none", {"answer": 3}) == (0.0, {"found": 0.0})
    assert [parse_number(t) for t in ["-2.5e3", "x", "1/0", "v2 is 7."]] == [-2500.0, None, None, 7]

    fmt = load_reward("regex", {"pattern": r"<think>.*</think>\s*<answer>.*</answer>"})
    assert fmt.call_one("p", "<think>a\nb</think> <answer>4</answer>", {})[0] == 1.0
    assert fmt.call_one("p", "<answer>4</answer>", {})[0] == 0.0
    full = load_reward("regex", {"pattern": r"\d+", "mode": "fullmatch"})
    assert [full.call_one("p", r, {})[0] for r in ("42\n", "42 apples")] == [1.0, 0.0]


def test_length_and_overlong_shaping() -> None:
    length = load_reward("length", {"max_len": 10, "penalty": 0.5})
    assert [length.call_one("p", "x" * n, {})[0] for n in (5, 10, 15, 20, 40)] == [
        0.0,
        0.0,
        -0.25,
        -0.5,
        -0.5,
    ]
    words = load_reward("length", {"max_len": 2, "unit": "words", "ramp": 2})
    assert words.call_one("p", "a b c", {}) == (-0.5, {"len": 3.0})

    overlong = load_reward("overlong", {"max_tokens": 10, "buffer": 4})
    assert overlong.batched
    samples = []
    for n in (6, 8, 10):
        s = Sample(0, len(samples), [1], meta={"response_text": "..."})
        s.append(list(range(n)), [0.0] * n, version=0, trainable=True)
        samples.append(s)
    # DAPO: 0 up to 10 - 4 = 6 tokens, then -(L - 6) / 4
    assert [x[0] for x in overlong.call_batch(samples)] == [0.0, -0.5, -1.0]
    with pytest.raises(ValueError, match="counts tokens"):
        overlong.call_one("p", "text but no token ids", {})


def test_code_runner_and_extraction() -> None:
    assert extract_code("a\n```python\nx = 1\n```\nthen\n```py\nx = 2\n```") == "x = 2\n"
    assert extract_code("```\nplain\n```") == "plain\n"
    assert extract_code("print(1)") == "print(1)"
    res = run_python("import os\nprint(os.environ.get('HOME'), len(os.environ))")
    assert res.ok and "rlsys-code-" in res.stdout  # a temp HOME, a minimal environment
    res = run_python("while True: pass", timeout_s=0.5)
    assert res.timed_out and not res.ok and res.duration_s < 3


def test_code_tests_reward() -> None:
    code = "```python\ndef add(a, b):\n    return a + b\n```"
    tests = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 5"]
    cfg = RewardConfig(
        parts=[RewardPartConfig(name="tests", fn="code_tests", kwargs={"timeout_s": 2.0})],
        workers=3,
    )
    batch = [
        RewardInput("p", code, {"tests": tests}),
        RewardInput("p", "def add(a, b): raise SystemExit(0)", {"tests": tests}),
        RewardInput("p", "import time\ntime.sleep(30)", {"tests": tests[:1]}),
        RewardInput("p", code, {"tests": "assert add(2, 3) == 5"}),
    ]
    with build_scorer(cfg, None) as scorer:
        out = scorer.score(batch)
    assert [o.score for o in out] == pytest.approx([2 / 3, 0.0, 0.0, 1.0])
    assert out[0].parts["tests/passed"] == 2.0 and out[0].parts["tests/total"] == 3.0
    assert out[2].parts["tests/timed_out"] == 1.0
    assert scorer.errors == 0  # failing or hanging programs are scores, not reward errors
