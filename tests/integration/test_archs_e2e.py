"""Qwen2 and Qwen3 models through the whole loop with the default native engine: real Ray
actors, the DeepSpeed trainer on the transformers model, shm weight sync into the engine's
fused weights (biases and q/k norms included), two steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlsys.config import load_recipe
from rlsys.controller import train

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("model", ["tiny-qwen2", "tiny-qwen3"])
def test_two_steps_on_policy_after_a_push(tmp_path: Path, model: str) -> None:
    """fp32 on both sides (no bf16 autocast in the trainer): the trainer's logprobs of the sampled tokens equal the engine's
    (`train/rollout_logprob_diff`, mean |difference|) at step 1 (initial weights) and at
    step 2 (weights the trainer pushed after step 1). An engine that dropped a bias or a
    norm, or a push that missed one, would differ by ~0.1-1 here; measured ~1e-7."""
    cfg = load_recipe(
        ROOT / "recipes" / "quickstart.yaml",
        [
            f"model.path={model}",
            "steps=2",
            "rollout.prompts_per_step=2",
            "rollout.n_samples_per_prompt=4",
            "rollout.max_new_tokens=10",
            "rollout.dtype=float32",
            "trainer.autocast_bf16=false",
            "trainer.lr=1e-2",
            f"reward.fn={ROOT}/tests/assets/rewards.py:length_reward",
            "reward.kwargs={scale: 30.0}",
            f"logging.run_dir={tmp_path}/run",
            "logging.wandb.mode=disabled",
        ],
    )
    summary = train(cfg, "quickstart.yaml")
    rows = [
        json.loads(x)
        for x in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().split("\n")
        if x
    ]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[1]["sync/version"] == 2 and rows[0]["train/grad_norm"] > 0
    for r in rows:
        assert r["train/rollout_logprob_diff"] < 1e-5, r["train/rollout_logprob_diff"]
