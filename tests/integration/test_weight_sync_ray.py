"""Broadcast weight sync through real Ray actors: a 2-rank ZeRO-3 trainer (weights gathered
bucket by bucket) pushes to a native-engine and an hf-engine rollout worker; both then hold
exactly the trainer's weights cast to bf16, at the new version."""

from __future__ import annotations

import os

import pytest
import ray
import torch

from rlsys import models
from rlsys.config import load_recipe, to_dict

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_session():
    env = {k: os.environ[k] for k in ("RLSYS_CACHE", "HF_HOME", "HF_HUB_OFFLINE")}
    env["DS_ACCELERATOR"] = "cpu"
    ray.init(
        num_cpus=4, include_dashboard=False, logging_level="ERROR", runtime_env={"env_vars": env}
    )
    yield
    ray.shutdown()


def test_broadcast_push_from_zero3(ray_session, synthetic_groups) -> None:
    from rlsys.rollout.worker import RolloutWorker
    from rlsys.trainer.group import TrainerGroup
    from rlsys.weight_sync import WeightSync

    path = models.resolve("tiny-llama")
    base = [
        "model.path=tiny-llama",
        "trainer.ranks=2",
        "trainer.zero_stage=3",
        "trainer.lr=1e-2",
        "rollout.dtype=bfloat16",
        "rollout.prompts_per_step=3",
    ]
    trainer = TrainerGroup(to_dict(load_recipe(None, base)), path)
    workers = []
    try:
        for i, engine in enumerate(("native", "hf")):
            cfg = to_dict(load_recipe(None, [*base, f"rollout.engine={engine}"]))
            workers.append(ray.remote(num_cpus=0)(RolloutWorker).remote(cfg, path, i))
        before = ray.get(workers[0].get_weights.remote())
        trainer.train_step(synthetic_groups())
        sync = WeightSync(trainer, workers, "bfloat16", bucket_mb=0.1, method="broadcast")
        assert len(sync.plan) > 1  # several buckets even for the tiny model
        m = sync.push(1)
        assert m["sync/version"] == 1 and m["sync/gb_per_s"] > 0
        assert ray.get([w.get_version.remote() for w in workers]) == [1, 1]
        want = ray.get(trainer.weights_ref("bfloat16"))
        moved = 0.0
        for w in workers:
            got = ray.get(w.get_weights.remote())
            for k, v in want.items():
                assert torch.equal(got[k], v), k
                moved = max(moved, (got[k].float() - before[k].float()).abs().max().item())
        assert moved > 1e-3  # the push really changed the weights
        # a second push after another step: the reused receive buffer is overwritten
        trainer.train_step(synthetic_groups(seed=1))
        sync.push(2)
        want = ray.get(trainer.weights_ref("bfloat16"))
        got = ray.get(workers[1].get_weights.remote())
        assert all(torch.equal(got[k], v) for k, v in want.items())
    finally:
        trainer.kill()
        for w in workers:
            ray.kill(w)
