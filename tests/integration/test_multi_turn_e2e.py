"""The multi-turn tool recipe runs end to end with real Ray actors: the tiny model (1 step), and
the default model, which really calls the tool."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlsys.config import load_recipe
from rlsys.controller import train

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_tool_recipe_runs_on_tiny_model(tmp_path: Path) -> None:
    cfg = load_recipe(
        ROOT / "recipes" / "tool_arithmetic.yaml",
        [
            "model.path=tiny-llama",
            "steps=1",
            "rollout.prompts_per_step=2",
            "rollout.n_samples_per_prompt=2",
            "rollout.max_new_tokens=8",
            "rollout.dtype=float32",
            "rollout.turns.max_turns=3",
            "data.max_prompt_tokens=1024",
            f"reward.fn={ROOT}/tests/assets/rewards.py:length_reward",
            "logging.wandb.mode=disabled",
            "logging.plot=false",
            f"logging.run_dir={tmp_path}/run",
        ],
    )
    summary = train(cfg)
    row = json.loads((Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()[0])
    assert row["train/version"] == 1
    turns = row["rollout/agent/turns_mean"]
    assert 1 <= turns <= 3


def test_tool_recipe_with_the_default_model_calls_the_tool(tmp_path: Path) -> None:
    """SmolLM2-135M-Instruct on the tool recipe (1 step, fp32 on both sides): the model calls
    the sandboxed Python tool, its outputs come back as env tokens, and the trainer's
    logprobs of the model's tokens across every turn equal the engine's (one token stream
    for rollout and training: a re-tokenized turn boundary would differ by ~1 there)."""
    cfg = load_recipe(
        ROOT / "recipes" / "tool_arithmetic.yaml",
        [
            "steps=1",
            "rollout.prompts_per_step=4",
            "rollout.n_samples_per_prompt=2",
            "rollout.dtype=float32",
            "trainer.autocast_bf16=false",
            "logging.wandb.mode=disabled",
            "logging.plot=false",
            f"logging.run_dir={tmp_path}/run",
        ],
    )
    summary = train(cfg)
    row = json.loads((Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()[0])
    assert row["rollout/agent/tool_calls"] > 0 and row["rollout/agent/turns_mean"] > 1
    assert row["rollout/agent/env_tokens_per_turn"] > 0
    assert row["train/rollout_logprob_diff"] < 1e-4, row["train/rollout_logprob_diff"]
    assert row["train/version"] == 1
