"""The multi-turn tool recipe runs end to end with real Ray actors (tiny model, 1 step)."""

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
