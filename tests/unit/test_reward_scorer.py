"""RewardScorer: weighted parts, on_error policies, error counting, timeouts, both pools."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from rlsys.reward import RewardConfig, RewardPartConfig, build_scorer
from rlsys.reward.scorer import RewardError, RewardInput
from rlsys.types import Sample

ROOT = Path(__file__).resolve().parents[2]
USER = f"{ROOT}/tests/assets/reward_fns/user_rewards.py"


def _inputs(*responses: str, **meta) -> list[RewardInput]:
    return [RewardInput("prompt", r, dict(meta)) for r in responses]


def test_weighted_parts_are_combined_and_each_part_logged() -> None:
    cfg = RewardConfig(
        parts=[
            RewardPartConfig(name="has_yes", fn=f"{USER}:contains", weight=1.0),
            RewardPartConfig(fn=f"{USER}:async_len", weight=0.1),  # name defaults to fn's
            RewardPartConfig(name="tokens", fn="test_batch_tokens", weight=0.5),
        ]
    )
    s = Sample(group_id=3, index=0, prompt_ids=[1])
    s.append([4, 5], [-1.0, -1.0], version=0, trainable=True)
    batch = [RewardInput("p", "yes!", {}, s), RewardInput("p", "no", {})]
    with build_scorer(cfg, None) as scorer:
        out = scorer.score(batch)
    assert out[0].score == pytest.approx(1.0 + 0.1 * 4 + 0.5 * 2)
    assert out[0].parts == {
        "has_yes": 1.0,
        "has_yes/chars": 4.0,
        "async_len": 4.0,
        "tokens": 2.0,
        "tokens/group": 3.0,
    }
    assert out[1].score == pytest.approx(0.0 + 0.1 * 2 + 0.5 * 0)  # no Sample: no tokens
    assert out[1].error is None
    assert s.meta == {}  # the caller's Sample is not mutated


def test_single_fn_keeps_unprefixed_extras_and_task_default() -> None:
    with build_scorer(RewardConfig(fn=f"{USER}:contains", kwargs={"word": "a"}), None) as sc:
        assert sc.score(_inputs("abc"))[0].parts == {"chars": 3.0}
    with build_scorer(RewardConfig(), "arithmetic") as sc:  # no fn: the task's verifier
        out = sc.score(_inputs("it is 12", "it is 13", answer=12))
    assert [o.score for o in out] == [1.0, 0.0]
    assert sc.score([]) == []


@pytest.mark.parametrize("on_error", ["zero", "skip", "raise"])
def test_raising_reward_under_each_policy_is_counted(on_error: str) -> None:
    cfg = RewardConfig(
        parts=[
            RewardPartConfig(name="strict", fn=f"{USER}:broken", weight=1.0),
            RewardPartConfig(name="length", fn=f"{USER}:async_len", weight=0.5),
        ],
        on_error=on_error,
    )
    batch = _inputs("ok", "bad", "worse")
    with build_scorer(cfg, None) as scorer:
        if on_error == "raise":
            with pytest.raises(RewardError, match="reward 'strict': RuntimeError: cannot grade"):
                scorer.score(batch)
        else:
            out = scorer.score(batch)
            assert out[0].score == pytest.approx(1.0 + 0.5 * 2) and out[0].error is None
            assert "RuntimeError: cannot grade 'bad'" in (out[1].error or "")
            if on_error == "zero":  # the failed part counts 0, the others still count
                assert out[1].score == pytest.approx(0.5 * 3)
                assert out[1].parts["strict"] == 0.0 and out[1].parts["length"] == 3.0
            else:
                assert out[1].score is None and out[2].score is None
                assert scorer.skipped == 2
        assert scorer.errors == 2
        assert "Traceback" in (scorer.first_traceback or "")
        assert "RuntimeError: cannot grade 'bad'" in (scorer.first_traceback or "")
        stats = scorer.take_stats()
        assert stats["reward/errors"] == 2
        assert stats["reward/first_error"].startswith("reward 'strict': RuntimeError")
        assert scorer.take_stats()["reward/errors"] == 0  # per interval


def test_non_finite_and_malformed_results_are_errors() -> None:
    for fn, needle in [
        ("nan_reward", "non-finite score"),
        ("no_score", "without 'score'"),
        ("short_batch", "returned 1 results for 2 samples"),
    ]:
        with build_scorer(RewardConfig(fn=f"{USER}:{fn}"), None) as scorer:
            out = scorer.score(_inputs("a", "b"))
        assert [o.score for o in out] == [0.0, 0.0]
        assert needle in (out[0].error or ""), fn
        assert scorer.errors == 2  # a failed batched call counts once per sample it covered


def test_slow_rewards_run_concurrently() -> None:
    cfg = RewardConfig(fn=f"{USER}:sleepy", workers=4)
    with build_scorer(cfg, None) as scorer:
        t0 = time.perf_counter()
        out = scorer.score(_inputs("a", "b", "c", "d", sleep=0.3))
        elapsed = time.perf_counter() - t0
    assert [o.score for o in out] == [1.0] * 4
    assert elapsed < 0.9, elapsed  # 4 x 0.3 s one after another would be 1.2 s


@pytest.mark.parametrize("fn", ["sleepy", "async_sleepy"])
def test_thread_pool_timeout_returns_on_time(fn: str) -> None:
    cfg = RewardConfig(fn=f"{USER}:{fn}", timeout_s=0.6, workers=2, on_error="skip")
    with build_scorer(cfg, None) as scorer:
        batch = [RewardInput("p", f"r{i}", {"sleep": s}) for i, s in enumerate([0, 3, 0, 3, 0])]
        t0 = time.perf_counter()
        out = scorer.score(batch)
        elapsed = time.perf_counter() - t0
        # 2 hung calls on 2 workers: about one timeout, not the 3 s sleeps
        assert elapsed < 1.5, elapsed
        assert [o.score for o in out] == [1.0, None, 1.0, None, 1.0]
        assert "RewardTimeout" in (out[1].error or "")
        assert scorer.errors == scorer.timeouts == 2
        # the abandoned threads were replaced: full capacity for the next batch
        t0 = time.perf_counter()
        assert [o.score for o in scorer.score(_inputs("a", "b", sleep=0.25))] == [1.0, 1.0]
        assert time.perf_counter() - t0 < 0.45  # one after another: 0.5 s


def test_process_pool_timeout_kills_and_replaces_the_process() -> None:
    cfg = RewardConfig(fn=f"{USER}:sleepy", timeout_s=0.5, pool="process", workers=2)
    with build_scorer(cfg, None) as scorer:
        batch = [RewardInput("p", f"r{i}", {"sleep": s}) for i, s in enumerate([0, 30, 0])]
        t0 = time.perf_counter()
        out = scorer.score(batch)
        assert time.perf_counter() - t0 < 3.0
        assert [o.score for o in out] == [1.0, 0.0, 1.0]
        assert "RewardTimeout" in (out[1].error or "")
        assert scorer.timeouts == 1 and scorer.runner.killed == 1
        assert [o.score for o in scorer.score(_inputs("a", "b", "c"))] == [1.0] * 3


def test_process_pool_runs_setup_in_children_and_survives_a_crash() -> None:
    cfg = RewardConfig(
        parts=[
            RewardPartConfig(name="pid", fn=f"{USER}:PidReward", weight=0.0),
            RewardPartConfig(name="alive", fn=f"{USER}:die"),
            RewardPartConfig(name="tokens", fn="test_batch_tokens", weight=0.0),
        ],
        pool="process",
        workers=1,
    )
    with build_scorer(cfg, None) as scorer:
        out = scorer.score(_inputs("a", "die", "b"))
        assert float(os.getpid()) not in {o.parts["pid"] for o in out}
        assert [o.parts["alive"] for o in out] == [1.0, 0.0, 1.0]
        assert "RewardWorkerDied" in (out[1].error or "")
        assert out[0].parts["tokens"] == 0.0  # batched reward ran in a child too


@pytest.mark.parametrize("pool", ["thread", "process"])
def test_failing_setup_raises_at_build(pool: str) -> None:
    with pytest.raises((OSError, RuntimeError), match="model weights not found"):
        build_scorer(RewardConfig(fn=f"{USER}:FailingSetup", pool=pool, workers=1), None)


def test_reward_config_is_an_omegaconf_schema() -> None:
    """What the recipe loader does with the `reward:` section once it uses this schema."""
    raw = {
        "parts": [{"name": "correct", "fn": "math"}, {"fn": "regex", "weight": 0.2}],
        "on_error": "skip",
        "timeout_s": None,
    }
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RewardConfig), raw))
    assert isinstance(cfg, RewardConfig) and isinstance(cfg.parts[1], RewardPartConfig)
    assert cfg.parts[1].weight == 0.2 and cfg.timeout_s is None and cfg.pool == "thread"


README_RECIPE = r"""
reward:
  parts:
    - {name: correct, fn: math, weight: 1.0}
    - {name: boxed, fn: regex, weight: 0.1, kwargs: {pattern: '\\boxed\{.+\}'}}
    - {name: concise, fn: FILE:concise, weight: 0.2, kwargs: {max_words: 4}}
    - {name: repeats, fn: FILE:NoRepeats, weight: 1.0}
  on_error: zero
  timeout_s: 10
  pool: process
  workers: 2
"""


def test_readme_example_recipe() -> None:
    text = README_RECIPE.replace("FILE", f"{ROOT}/tests/assets/reward_fns/readme_example.py")
    raw = OmegaConf.to_container(OmegaConf.create(text))["reward"]  # type: ignore[index]
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RewardConfig), raw))
    batch = [
        RewardInput("p", "so $\\boxed{\\frac{1}{2}}$", {"answer": "0.5"}),
        RewardInput("p", "so $\\boxed{\\frac{1}{2}}$", {"answer": "0.5"}),
        RewardInput("p", "the answer is one half, i.e. 1/3", {"answer": "1/2"}),
    ]
    with build_scorer(cfg, None) as scorer:
        out = scorer.score(batch)
    assert out[0].parts == {
        "correct": 1.0,
        "correct/extracted": 1.0,
        "boxed": 1.0,
        "concise": 1.0,
        "concise/words": 2.0,
        "repeats": 0.0,
    }
    assert out[0].score == pytest.approx(1.0 + 0.1 + 0.2)
    assert out[1].parts["repeats"] == -1.0  # same text as sample 0
    assert out[2].score == pytest.approx(0.2 * 4 / 7)  # wrong, unboxed, 7 words
    assert scorer.errors == 0
