"""Every YAML under recipes/ loads, validates and sets the method its name promises."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from rlsys.config import load_recipe, to_dict

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").rglob("*.yaml"))

# What makes each recipe the method it is named after (the papers in REFERENCES.md): dotted
# keys of the resolved recipe and their values. A new recipe must add its row here.
METHOD = {
    "quickstart": {"algorithm.advantage": "grpo", "algorithm.policy_loss": "clipped"},
    "grpo": {
        "algorithm.advantage": "grpo",
        "algorithm.norm_adv_by_std": True,
        "algorithm.policy_loss": "clipped",
        "algorithm.kl.mode": "loss",
    },
    # Dr.GRPO: no std division, no per-sequence length normalisation (a constant instead)
    "dr_grpo": {
        "algorithm.advantage": "grpo",
        "algorithm.norm_adv_by_std": False,
        "algorithm.loss_agg": "seq-mean-token-sum-norm",
    },
    # DAPO: clip-higher, token-level aggregation, dynamic sampling, soft overlong penalty
    "dapo": {
        "algorithm.advantage": "grpo",
        "algorithm.clip_low": 0.2,
        "algorithm.clip_high": 0.28,
        "algorithm.loss_agg": "token-mean",
        "algorithm.dynamic_sampling.enabled": True,
        "algorithm.overlong.enabled": True,
    },
    "cispo": {"algorithm.advantage": "grpo", "algorithm.policy_loss": "cispo"},
    "gspo": {
        "algorithm.advantage": "grpo",
        "algorithm.policy_loss": "gspo",
        "algorithm.loss_agg": "seq-mean-token-mean",
    },
    "rloo": {"algorithm.advantage": "rloo"},
    "reinforce_pp": {"algorithm.advantage": "reinforce_pp"},
    # ReMax: REINFORCE (no ratio, no clip) against the greedy response's reward
    "remax": {"algorithm.advantage": "remax", "algorithm.policy_loss": "reinforce"},
    # PPO: a critic and GAE, the clipped ratio, KL in the reward
    "ppo": {
        "algorithm.advantage": "gae",
        "algorithm.policy_loss": "clipped",
        "algorithm.kl.mode": "reward",
    },
    "tool_arithmetic": {
        "algorithm.advantage": "grpo",
        "rollout.agent.env": "tools",
        "rollout.agent.tools": ["python"],
        "rollout.turns.policy": "fixed",
    },
}


def test_there_are_recipes() -> None:
    assert any(p.name == "quickstart.yaml" for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_loads(path: Path) -> None:
    cfg = load_recipe(path)
    assert cfg.steps > 0
    assert cfg.rollout.n_samples_per_prompt >= 2


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_sets_its_method(path: Path) -> None:
    assert path.stem in METHOD, f"add {path.stem}'s defining settings to METHOD"
    resolved = OmegaConf.create(to_dict(load_recipe(path)))
    got = {key: OmegaConf.select(resolved, key, default="<missing>") for key in METHOD[path.stem]}
    got = {k: OmegaConf.to_object(v) if OmegaConf.is_config(v) else v for k, v in got.items()}
    assert got == METHOD[path.stem]
