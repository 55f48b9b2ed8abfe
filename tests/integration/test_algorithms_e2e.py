"""Each algorithm recipe runs end to end (real Ray actors) on the tiny model for a few steps."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from rlsys.config import load_recipe
from rlsys.controller import train

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ["grpo", "dr_grpo", "dapo", "gspo", "cispo", "rloo", "reinforce_pp", "remax", "ppo"]
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_runs_on_tiny_model(name: str, tmp_path: Path) -> None:
    cfg = load_recipe(
        ROOT / "recipes" / f"{name}.yaml",
        [
            "model.path=tiny-llama",
            "steps=2",
            "rollout.prompts_per_step=4",
            "rollout.n_samples_per_prompt=3",
            "rollout.max_new_tokens=10",
            "rollout.dtype=float32",
            "trainer.micro_batch_size=4",
            f"reward.fn={ROOT}/tests/assets/rewards.py:length_reward",
            "logging.wandb.mode=disabled",
            "logging.plot=false",
            f"logging.run_dir={tmp_path}/run",
        ]
        + (["algorithm.overlong.buffer=4"] if name == "dapo" else [])
        + (["trainer.lr=1e-3"] if name == "gspo" else []),  # moves the tiny model past 4e-4
    )
    summary = train(cfg)
    rows = [
        json.loads(x) for x in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 2
    for r in rows:
        assert math.isfinite(r["train/loss"]) and math.isfinite(r["train/grad_norm"])
        assert r["train/version"] == r["step"]
    last = rows[-1]
    if name in ("grpo",):
        assert last["train/kl"] > 0  # the policy moved away from the reference
    if name in ("rloo", "reinforce_pp", "ppo"):
        assert "train/kl_reward" in last
    if name == "remax":
        assert "reward/greedy_mean" in last
        assert last["train/clip_frac"] == 0.0  # plain REINFORCE: nothing is clipped
    if name == "ppo":
        assert math.isfinite(last["train/value_loss"]) and last["train/value_loss"] > 0
    if name == "gspo":
        assert last["train/clip_frac"] > 0  # the second mini-batch is off-policy
    if name == "dapo":
        assert "rollout/dropped_groups" in last and "reward/overlong" in last
