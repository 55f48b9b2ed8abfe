"""`rlsys train` with partial rollouts on two rollout workers (tiny model): unfinished groups
are recycled into later steps, old tokens are masked (`stale: mask`), and training runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlsys.config import load_recipe
from rlsys.controller import train

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_partial_rollouts_recycle_across_steps(tmp_path: Path) -> None:
    cfg = load_recipe(
        ROOT / "recipes" / "quickstart.yaml",
        [
            "model.path=tiny-llama",
            "steps=4",
            "rollout.workers=2",
            "rollout.prompts_per_step=4",
            "rollout.n_samples_per_prompt=2",
            "rollout.max_new_tokens=24",
            "rollout.dtype=float32",
            "rollout.partial.enabled=true",
            "rollout.partial.over_provision=2.0",
            "rollout.partial.stale=mask",
            "rollout.max_batch=3",  # queued samples: a round ends with some not yet started
            "trainer.lr=1e-3",
            f"reward.fn={ROOT}/tests/assets/rewards.py:length_reward",  # dense: updates
            "logging.wandb.mode=disabled",
            f"logging.run_dir={tmp_path}/run",
        ],
    )
    train(cfg)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["rollout/recycled_groups"] == 0  # nothing to recycle yet
    assert rows[0]["rollout/aborted_samples"] > 0  # the over-provisioned rest was cut off
    assert sum(r["rollout/recycled_groups"] for r in rows[1:]) > 0
    assert any(r["rollout/stale_token_frac"] > 0 for r in rows[1:])  # old tokens trained on
    assert all(r["rollout/staleness_max"] <= r["step"] for r in rows)
    # every step trains a full batch of complete groups; groups started stay bounded
    assert all(r["train/version"] == r["step"] for r in rows)
    assert all(r["train/grad_norm"] > 0 for r in rows)  # the recycled tokens' policy moved
    assert all(r["buffer/recycle_depth"] <= 8 for r in rows)
