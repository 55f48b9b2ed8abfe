"""DeepSpeed ZeRO across Ray actors: 2 ranks give the same losses and parameters as 1 rank.

fp32 (no autocast), 3 steps on the tiny model. Tolerance 1e-5 absolute: the only difference
between the runs is the order of floating-point sums (each rank reduces its share of the
micro-batches, then gloo sums the two shares), which moves fp32 results by ~1e-7 relative.
"""

from __future__ import annotations

import pytest
import torch

from rlsys.config import load_recipe, to_dict

pytestmark = pytest.mark.slow

TOL = 1e-5


@pytest.fixture(scope="module")
def ray_session():
    import os

    import ray

    env = {k: os.environ[k] for k in ("RLSYS_CACHE", "HF_HOME", "HF_HUB_OFFLINE")}
    env["DS_ACCELERATOR"] = "cpu"
    ray.init(
        num_cpus=4, include_dashboard=False, logging_level="ERROR", runtime_env={"env_vars": env}
    )
    yield ray
    ray.shutdown()


def _run(ranks: int, stage: int, groups_fn, extra: list[str] = ()) -> tuple[list[dict], dict]:
    from rlsys.trainer.group import TrainerGroup

    cfg = load_recipe(
        None,
        [
            "model.path=tiny-llama",
            "trainer.autocast_bf16=false",
            "trainer.lr=1e-3",
            "trainer.micro_batch_tokens=40",
            "trainer.mini_batches=2",
            f"trainer.ranks={ranks}",
            f"trainer.zero_stage={stage}",
            "trainer.bucket_mb=1",  # several buckets even for the tiny model
            "algorithm.kl.mode=loss",
            "algorithm.kl.estimator=k3",
            "rollout.prompts_per_step=4",
            *extra,
        ],
    )
    from rlsys import models

    group = TrainerGroup(to_dict(cfg), models.resolve("tiny-llama"))
    try:
        metrics = [group.train_step(groups_fn(n_groups=4, seed=s)) for s in range(3)]
        import ray

        weights = ray.get(group.weights_ref(None))
    finally:
        group.kill()
    return metrics, weights


@pytest.fixture(scope="module")
def one_rank(ray_session, synthetic_groups):
    return _run(1, 0, synthetic_groups)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_two_ranks_equal_one_rank(ray_session, synthetic_groups, one_rank, stage: int) -> None:
    m1, w1 = one_rank
    m2, w2 = _run(2, stage, synthetic_groups)
    for a, b in zip(m1, m2, strict=True):
        for k in ("train/loss", "train/kl", "train/entropy", "train/clip_frac"):
            assert abs(a[k] - b[k]) < TOL, (k, a[k], b[k])
        assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], rel=TOL)
    assert m1[-1]["train/version"] == m2[-1]["train/version"] == 3
    assert set(w1) == set(w2)
    init = _initial()
    assert set(w1) <= set(init)  # HF names (a tied lm_head is sent once, as the embedding)
    moved = max((w1[k] - init[k]).abs().max().item() for k in w1)
    assert moved > 1e-3  # the runs really trained
    for k in w1:
        assert (w1[k] - w2[k]).abs().max().item() < TOL, k


def _initial() -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    from rlsys import models

    return AutoModelForCausalLM.from_pretrained(models.resolve("tiny-llama")).state_dict()


def test_ppo_critic_under_zero3(ray_session, synthetic_groups) -> None:
    """The critic is sharded the same way: 2-rank ZeRO-3 PPO equals 1-rank (stage 0) PPO."""
    extra = ["algorithm.advantage=gae", "algorithm.kl.mode=none", "algorithm.critic.warmup_steps=0"]
    m1, w1 = _run(1, 0, synthetic_groups, extra)
    m2, w2 = _run(2, 3, synthetic_groups, extra)
    for a, b in zip(m1, m2, strict=True):
        assert abs(a["train/value_loss"] - b["train/value_loss"]) < TOL
        assert abs(a["train/loss"] - b["train/loss"]) < TOL
    # Parameters: 5e-5. Here fp32 rounding differences pass through two optimisers (critic
    # values -> GAE advantages -> policy update), and Adam's m/sqrt(v) turns a 1e-7 relative
    # change of a tiny gradient into a visible one; measured max |dp| = 1.4e-5 at lr 1e-3.
    for k in w1:
        assert (w1[k] - w2[k]).abs().max().item() < 5e-5, k


@pytest.mark.parametrize("stage", [2, 3])
def test_lora_two_ranks_equal_one_rank(ray_session, synthetic_groups, stage: int) -> None:
    """LoRA across ranks: ZeRO shards only the adapters' gradients and optimizer state (and at
    stage 3 gathers the factors with their base weight for the push); 2 ranks give the same
    losses and merged weights as 1 rank."""
    extra = ["trainer.lora.rank=4", "trainer.lr=1e-2"]
    m1, w1 = _run(1, 0, synthetic_groups, extra)
    m2, w2 = _run(2, stage, synthetic_groups, extra)
    for a, b in zip(m1, m2, strict=True):
        for k in ("train/loss", "train/kl"):
            assert abs(a[k] - b[k]) < TOL, (k, a[k], b[k])
        assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], rel=TOL)
    assert m1[-1]["train/kl"] > 0  # the adapters moved the policy off the base
    init = _initial()
    assert set(w1) == set(w2) and set(w1) <= set(init)  # base names only
    assert max((w1[k] - init[k]).abs().max().item() for k in w1) > 1e-3
    for k in w1:
        assert (w1[k] - w2[k]).abs().max().item() < TOL, k


def test_two_rank_zero3_run_end_to_end(tmp_path) -> None:
    """`rlsys train` with 2 ZeRO-3 ranks and 2 rollout workers: broadcast sync every step,
    every worker at the last version, and a Hugging Face export that loads."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from rlsys.controller import train

    root = Path(__file__).resolve().parents[2]
    cfg = load_recipe(
        root / "recipes" / "quickstart.yaml",
        [
            "model.path=tiny-llama",
            "steps=2",
            "rollout.workers=2",
            "rollout.prompts_per_step=4",
            "rollout.n_samples_per_prompt=2",
            "rollout.max_new_tokens=8",
            "trainer.ranks=2",
            "trainer.zero_stage=3",
            "trainer.lr=1e-3",
            # dense: the arithmetic reward is 0 for every sample of the random tiny model
            # (zero advantages, no update)
            f"reward.fn={root}/tests/assets/rewards.py:length_reward",
            "sync.bucket_mb=0.1",
            "logging.wandb.mode=disabled",
            f"logging.run_dir={tmp_path}/run",
        ],
    )
    summary = train(cfg)
    import json

    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["sync/version"] for r in rows] == [1, 2]
    assert all(r["sync/gb_per_s"] > 0 and r["train/version"] == r["step"] for r in rows)
    # The export gathers the ZeRO-3 shards of the trained policy: every tensor present, and
    # moved from the initial weights by the two lr-1e-3 updates.
    from rlsys import models

    exported = AutoModelForCausalLM.from_pretrained(summary["checkpoint"]).state_dict()
    initial = AutoModelForCausalLM.from_pretrained(models.resolve("tiny-llama")).state_dict()
    assert exported.keys() == initial.keys()
    assert all(exported[k].shape == initial[k].shape for k in initial)
    assert max((exported[k] - initial[k]).abs().max().item() for k in initial) > 1e-4
