"""The trainer's old logprobs on the default model under bf16 autocast: computed in the
update's own micro-batches, so the first mini-batch's ratios are exactly 1 (the whole batch's
packing gave SmolLM2 logprobs up to 0.09 apart, 0.026 on average, from the mini-batch's)."""

from __future__ import annotations

import pytest
import torch

from rlsys.config import load_recipe, to_dict
from rlsys.trainer.worker import TrainerWorker

pytestmark = pytest.mark.slow


def test_first_mini_batch_ratio_is_exactly_one_under_bf16(
    smollm_path, synthetic_groups, monkeypatch
) -> None:
    """Under bf16 autocast a sample's logprobs depend on the row packing (SDPA over padded
    length groups, GEMM kernels chosen by row count): old logprobs from the whole batch's
    packing gave the first mini-batch (policy unchanged) ratios != 1, which GSPO's 4e-4 clip
    turned into spurious clipping."""
    import rlsys.trainer.worker as tw

    cfg = load_recipe(
        None,
        [
            "model.path=smollm2-135m-instruct",
            "trainer.autocast_bf16=true",
            "trainer.mini_batches=2",
            "trainer.lr=1e-3",
            "trainer.micro_batch_tokens=256",
            "algorithm.policy_loss=gspo",
            "algorithm.loss_agg=seq-mean-token-mean",
            "algorithm.clip_low=3e-4",
            "algorithm.clip_high=4e-4",
        ],
    )
    w = TrainerWorker(to_dict(cfg), smollm_path)
    seen: list = []
    real_loss, real_step = tw.policy_loss, w.policy.step

    def record(logp, old, adv, mask, *a, **k):
        seen.append((logp.detach().clone(), old.clone(), mask.clone()))
        return real_loss(logp, old, adv, mask, *a, **k)

    def step():
        seen.append("step")
        return real_step()

    monkeypatch.setattr(tw, "policy_loss", record)
    monkeypatch.setattr(w.policy, "step", step)
    m = w.train_step(synthetic_groups(n_groups=8, n=8))
    first = seen[: seen.index("step")]
    second = seen[seen.index("step") + 1 : -1]
    assert first and second
    for logp, old, mask in first:
        assert torch.equal(logp[mask > 0], old[mask > 0])  # bit for bit
    # the second mini-batch sees the first update
    assert any(not torch.equal(lp[mk > 0], o[mk > 0]) for lp, o, mk in second)
    assert 0 < m["train/clip_frac"] <= 0.5  # only the second half of the tokens can clip
