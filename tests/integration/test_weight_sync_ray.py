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


def test_pool_recovers_worker_killed_between_calls(ray_session, synthetic_groups) -> None:
    """A worker killed while idle comes back (Ray restart) with the initial checkpoint: a
    generate call that needs newer weights, and a broadcast push that finds it outside the
    group, each recover it (current weights, group rebuilt) instead of failing or silently
    sampling from stale weights."""
    from rlsys.data import Prompt
    from rlsys.rollout.pool import Call, RolloutPool
    from rlsys.trainer.group import TrainerGroup
    from rlsys.weight_sync import WeightSync

    path = models.resolve("tiny-llama")
    base = ["model.path=tiny-llama", "rollout.dtype=float32", "trainer.lr=1e-2"]
    cfg = to_dict(load_recipe(None, [*base, "sync.timeout_s=10"]))
    trainer = TrainerGroup(cfg, path)
    pool = RolloutPool(cfg, path, 2)
    try:
        pool.ready()
        sync = WeightSync(trainer, pool, "float32", bucket_mb=0.1, method="broadcast", timeout_s=10)
        current = {"v": 0}

        def on_restart(i: int) -> None:  # what the controller does
            ray.get(
                pool.workers[i].update_weights.remote(trainer.weights_ref("float32"), current["v"])
            )
            sync.invalidate()

        pool.on_restart = on_restart
        initial = ray.get(pool.workers[1].get_weights.remote())
        trainer.train_step(synthetic_groups())
        current["v"] = 1
        sync.push(1)
        want = ray.get(trainer.weights_ref("float32"))
        assert any(not torch.equal(want[k], initial[k]) for k in want)  # v1 != checkpoint

        # (1) killed while idle; the next generate call needs v1
        ray.kill(pool.workers[1], no_restart=False)  # Ray restarts it from the checkpoint
        prompts = [Prompt([1, 50, 60, 70], "p", {"answer": "1"}, [])]
        out = pool.call([Call(1, "generate", (prompts, [0], 7, 1))])[0]
        assert len(out["groups"]) == 1 and pool.restarts == 1 and pool.reissued == 1
        got = ray.get(pool.workers[1].get_weights.remote())
        assert ray.get(pool.workers[1].get_version.remote()) == 1
        assert all(torch.equal(got[k], v) for k, v in want.items())

        # (2) killed while idle; the next broadcast push finds it outside the group
        trainer.train_step(synthetic_groups(seed=1))
        current["v"] = 2
        ray.kill(pool.workers[0], no_restart=False)
        m = sync.push(2)
        assert m["sync/version"] == 2 and pool.restarts == 2
        want = ray.get(trainer.weights_ref("float32"))
        for w in pool.workers:
            assert ray.get(w.get_version.remote()) == 2
            got = ray.get(w.get_weights.remote())
            assert all(torch.equal(got[k], v) for k, v in want.items())
    finally:
        trainer.kill()
        pool.kill()
