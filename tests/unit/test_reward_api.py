"""The reward contract: naming, loading, call forms, return values, legacy `build_reward`."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

import rlsys.reward
from rlsys.config import ConfigError
from rlsys.reward import (
    RewardConfig,
    RewardPartConfig,
    build_reward,
    build_scorer,
    load_callable,
    load_reward,
    validate_reward_config,
)
from rlsys.reward.api import normalize
from rlsys.reward.config import resolve_paths
from rlsys.reward.scorer import RewardInput
from rlsys.types import Sample

ROOT = Path(__file__).resolve().parents[2]
FNS = ROOT / "tests" / "assets" / "reward_fns"
USER = f"{FNS}/user_rewards.py"


def test_file_path_reward_loads_and_runs() -> None:
    r = load_reward(f"{USER}:contains", {"word": "cat"})
    assert r.call_one("p", "a cat", {}) == (1.0, {"chars": 5.0})
    assert r.call_one("p", "a dog", {"word": "ignored: kwargs win over meta"})[0] == 0.0


def test_relative_file_path_resolves_against_cwd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    r = load_reward("tests/assets/reward_fns/user_rewards.py:needs_answer")
    # a function without **meta gets only the fields it names
    assert r.call_one("p", " 7 ", {"answer": 7, "other": 1})[0] == 1.0
    assert r.spec == f"{USER}:needs_answer"  # absolute, for pool processes


def test_module_path_reward_loads_and_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "my_rewards"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "graders.py").write_text(
        "def upper(prompt, response, **meta):\n    return float(response.isupper())\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_callable("my_rewards.graders:upper")("p", "OK") == 1.0
    with build_scorer(RewardConfig(fn="my_rewards.graders:upper"), None) as s:
        assert [o.score for o in s.score([RewardInput("p", "OK"), RewardInput("p", "no")])] == [
            1.0,
            0.0,
        ]
    # a built-in module path and a built-in name load the same function
    assert load_reward("rlsys.reward.builtin:exact_match").fn is load_reward("exact_match").fn


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("no_such_pkg.graders:fn", "no module named 'no_such_pkg.graders'"),
        ("rlsys.reward.no_such_module:fn", "no module named 'rlsys.reward.no_such_module'"),
        ("rlsys.reward.builtin:exact_matc", "has no attribute 'exact_matc'. Did you mean"),
        ("missing/file.py:fn", "file not found: missing/file.py"),
        (f"{FNS}/broken_import.py:fn", "No module named 'rlsys_no_such_dependency'"),
        (f"{USER}:no_such_fn", "has no attribute 'no_such_fn'"),
        (f"{USER}:not_callable", "is not callable"),
        ("exact_mach", "not a registered reward name. Did you mean 'exact_match'?"),
    ],
)
def test_missing_module_file_or_function_is_a_config_error(spec: str, needle: str) -> None:
    with pytest.raises(ConfigError, match="reward") as e:
        validate_reward_config(RewardConfig(fn=spec), None)
    assert needle in str(e.value)
    assert spec.split(":")[0].split("/")[-1] in str(e.value)


def test_unknown_kwarg_and_bad_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"does not take keyword argument\(s\) wrod"):
        validate_reward_config(RewardConfig(fn=f"{USER}:needs_answer", kwargs={"wrod": 1}), None)
    with pytest.raises(ConfigError, match="does not take keyword argument"):  # class: __init__
        validate_reward_config(RewardConfig(fn=f"{USER}:Judge", kwargs={"bonsu": 1}), None)
    bad = [
        (RewardConfig(on_error="ignore"), "reward.on_error: 'ignore' is not one of"),
        (RewardConfig(pool="procs"), "Did you mean 'process'?"),
        (RewardConfig(workers=0), "reward.workers must be >= 1"),
        (RewardConfig(timeout_s=0), "reward.timeout_s must be > 0"),
        (RewardConfig(fn="math", parts=[{"fn": "math"}]), "not both"),
        (RewardConfig(parts=[{"fn": "math"}, {"fn": "math"}]), "'math' is used twice"),
        (RewardConfig(parts=[{"name": "errors", "fn": "math"}]), "not a valid metric name"),
        (RewardConfig(parts=[{"name": "x"}]), r"reward.parts\[0\].fn is required"),
    ]
    for cfg, needle in bad:
        with pytest.raises(ConfigError, match=needle):
            validate_reward_config(cfg, "arithmetic")
    with pytest.raises(ConfigError, match="required when data.task is null"):
        validate_reward_config(RewardConfig(), None)


def test_batched_and_async_forms() -> None:
    assert load_reward(f"{USER}:async_len").call_one("p", "abcd", {}) == (4.0, {})
    batched = load_reward(f"{USER}:batch_len", {"scale": 2.0})
    assert batched.batched
    assert batched.call_one("p", "abc", {}) == (6.0, {})  # a one-sample batch
    tokens = load_reward("test_batch_tokens")  # registered by name, batched=True, async
    assert tokens.batched
    s = Sample(group_id=7, index=0, prompt_ids=[1, 2])
    s.append([5, 6, 7], [-0.1, -0.2, -0.3], version=0, trainable=True)
    assert tokens.call_batch([s]) == [(3.0, {"group": 7.0})]


def test_class_reward_runs_setup_once_before_calls() -> None:
    obj, _ = rlsys.reward.api.resolve_target(f"{USER}:Judge")
    before = obj.setups
    r = load_reward(f"{USER}:Judge", {"bonus": 0.5})
    assert obj.setups == before  # constructing (also done by validation) does not set up
    assert r.call_one("p", "good", {}) == (1.5, {})
    assert r.call_one("p", "bad", {}) == (-0.5, {})
    assert obj.setups == before + 1
    assert load_reward(f"{USER}:BatchJudge").batched


def test_decorator_registers_by_name_and_module_is_callable() -> None:
    @rlsys.reward(name="test_inline_reward")
    def inline(prompt: str, response: str, **meta) -> float:
        return 2.0

    assert inline("p", "r") == 2.0  # still a plain function
    assert "test_inline_reward" in rlsys.reward.registered()
    assert load_reward("test_inline_reward").call_one("p", "r", {}) == (2.0, {})

    @rlsys.reward(batched=True)
    def test_decorated_batch(xs: list) -> list[float]:
        return [1.0 for _ in xs]

    assert load_reward("test_decorated_batch").batched
    with pytest.raises(ValueError, match="already registered"):

        @rlsys.reward(name="test_inline_reward")
        def other(prompt: str, response: str) -> float:
            return 0.0


def test_return_values_follow_the_contract() -> None:
    assert normalize(1) == (1.0, {})
    assert normalize(True) == (1.0, {})
    assert normalize({"score": 0.5, "len": 3}) == (0.5, {"len": 3.0})
    for bad, msg in [
        (float("nan"), "non-finite"),
        (math.inf, "non-finite"),
        ({"accuracy": 1.0}, "without 'score'"),
        ({"score": 1.0, "x": "high"}, "not a number"),
        ({"score": 1.0, "x": math.nan}, "not finite"),
        ("1.0x", "expected a number"),
    ]:
        with pytest.raises((ValueError, TypeError), match=msg):
            normalize(bad)
    with pytest.raises(ValueError, match="returned 1 results for 2 samples"):
        load_reward(f"{USER}:short_batch").call_batch(
            [Sample(0, i, [], meta={"prompt_text": "", "response_text": ""}) for i in range(2)]
        )


def test_legacy_build_reward_still_works() -> None:
    fn = build_reward(str(ROOT / "tests/assets/rewards.py:length_reward"), {"scale": 10.0}, None)
    assert fn("p", "x" * 5, {}) == (0.5, {"chars": 5.0})
    task = build_reward(None, {}, "arithmetic")
    assert task("What is 2 + 3?", "It is 5", {"answer": 5}) == (1.0, {})
    with pytest.raises(ConfigError, match="required when data.task is null"):
        build_reward(None, {}, None)


def test_relative_file_specs_are_made_absolute_for_ray_workers() -> None:
    cfg = RewardConfig(
        parts=[
            RewardPartConfig(fn="tests/assets/reward_fns/user_rewards.py:contains"),
            RewardPartConfig(fn="math"),
        ]
    )
    fixed = resolve_paths(cfg, ROOT)
    assert fixed.parts[0].fn == f"{USER}:contains" and fixed.parts[1].fn == "math"
    assert resolve_paths(RewardConfig(fn="pkg.mod:fn")).fn == "pkg.mod:fn"
    assert cfg.parts[0].fn.startswith("tests/")  # a copy


def test_schema_module_does_not_import_rlsys_config() -> None:
    """rlsys.config imports rlsys.reward.config for the recipe schema: no import cycle."""
    code = "import sys, rlsys.reward.config; print('rlsys.config' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "False", out.stderr
