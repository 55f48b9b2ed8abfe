"""A trainer step with packed micro-batches equals the padded one (fp32), for each
aggregation mode: same loss, same updated parameters."""

from __future__ import annotations

import random

import pytest
import torch

from rlsys.config import load_recipe, to_dict
from rlsys.trainer.worker import TrainerWorker
from rlsys.types import Sample, SampleGroup, Status


def _groups(n_groups: int = 3, n: int = 4, seed: int = 0) -> list[SampleGroup]:
    rng = random.Random(seed)
    out = []
    for g in range(n_groups):
        prompt = [rng.randrange(5, 300) for _ in range(rng.randint(3, 8))]
        samples = []
        for j in range(n):
            s = Sample(group_id=g, index=j, prompt_ids=prompt)
            k = rng.randint(1, 12)
            s.append(
                [rng.randrange(5, 300) for _ in range(k)],
                [-rng.random() for _ in range(k)],
                0,
                True,
            )
            s.finish(Status.DONE, "stop")
            s.reward = float(rng.random() < 0.5) + 0.1 * j
            samples.append(s)
        out.append(SampleGroup(g, samples))
    return out


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_packed_step_equals_padded_step(tiny_model_path, agg: str) -> None:
    results = []
    for packing in (False, True):
        cfg = load_recipe(
            None,
            [
                "model.path=tiny-llama",
                "trainer.autocast_bf16=false",
                "trainer.lr=1e-3",
                f"trainer.packing={str(packing).lower()}",
                "trainer.micro_batch_tokens=40",
                "trainer.micro_batch_size=5",
                f"algorithm.loss_agg={agg}",
                "algorithm.kl.mode=loss",
                "algorithm.kl.estimator=k3",
            ],
        )
        w = TrainerWorker(to_dict(cfg), tiny_model_path)
        m = w.train_step(_groups())
        params = torch.cat([p.detach().flatten() for p in w.model.parameters()])
        results.append((m, params))
    (m0, p0), (m1, p1) = results
    assert m1["train/micro_batches"] != m0["train/micro_batches"]  # really a different layout
    assert m0["train/loss"] == pytest.approx(m1["train/loss"], abs=1e-6)
    assert m0["train/grad_norm"] == pytest.approx(m1["train/grad_norm"], rel=1e-5)
    assert (p0 - p1).abs().max().item() < 1e-5
