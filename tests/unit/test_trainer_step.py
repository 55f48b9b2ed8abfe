"""A trainer step with packed micro-batches equals the padded one (fp32), for each
aggregation mode: same loss, same updated parameters."""

from __future__ import annotations

import pytest
import torch

from rlsys.config import load_recipe, to_dict
from rlsys.trainer.losses import LOSS_AGG
from rlsys.trainer.worker import TrainerWorker


def _padded_and_packed(tiny_model_path, groups, overrides: list[str]) -> list[tuple]:
    """(metrics, flat updated parameters) of one fp32 step, padded then packed."""
    results = []
    for packing in (False, True):
        cfg = load_recipe(
            None,
            [
                "model.path=tiny-llama",
                "trainer.autocast_bf16=false",
                "trainer.lr=1e-3",
                f"trainer.packing={str(packing).lower()}",
                *overrides,
            ],
        )
        w = TrainerWorker(to_dict(cfg), tiny_model_path)
        m = w.train_step(groups)
        params = torch.cat([p.detach().flatten() for p in w.model.parameters()])
        results.append((m, params))
    return results


@pytest.mark.parametrize("agg", LOSS_AGG)
def test_packed_step_equals_padded_step(tiny_model_path, synthetic_groups, agg: str) -> None:
    (m0, p0), (m1, p1) = _padded_and_packed(
        tiny_model_path,
        synthetic_groups(),
        [
            "trainer.micro_batch_tokens=40",
            "trainer.micro_batch_size=5",
            f"algorithm.loss_agg={agg}",
            "algorithm.kl.mode=loss",
            "algorithm.kl.estimator=k3",
        ],
    )
    assert m1["train/micro_batches"] != m0["train/micro_batches"]  # really a different layout
    assert m0["train/loss"] == pytest.approx(m1["train/loss"], abs=1e-6)
    assert m0["train/grad_norm"] == pytest.approx(m1["train/grad_norm"], rel=1e-5)
    # The loss and the gradient norm are the sharp checks. AdamW's first step moves each
    # weight by lr * g / (|g| + eps), ~lr * sign(g): a gradient that nearly cancels over the
    # tokens (norm weights) keeps few significant digits, and the layout's summation order
    # moves that step by up to ~1% of lr (measured: max 1.0e-5, at most 7 of the 106,816
    # weights off by more than 1e-6); a gradient of another sign moves a weight by ~2 lr.
    d = (p0 - p1).abs()
    assert d.max().item() < 3e-5
    assert int((d > 1e-6).sum()) <= 20


def test_packed_gspo_step_equals_padded_step(tiny_model_path, synthetic_groups) -> None:
    """GSPO's one ratio per sequence holds in packed rows (several samples a row): with two
    mini-batches the second one's ratios differ from 1, and the packed step still equals the
    padded one (one sample a row)."""
    (m0, p0), (m1, p1) = _padded_and_packed(
        tiny_model_path,
        synthetic_groups(),
        [
            "trainer.mini_batches=2",
            "trainer.micro_batch_tokens=60",
            "trainer.micro_batch_size=2",
            "algorithm.policy_loss=gspo",
            "algorithm.loss_agg=seq-mean-token-mean",
            "algorithm.clip_low=0.002",
            "algorithm.clip_high=0.002",
        ],
    )
    assert m1["train/micro_batches"] != m0["train/micro_batches"]  # really a different layout
    assert 0 < m0["train/clip_frac"] < 0.5  # some of the second mini-batch clipped, not all
    assert m0["train/clip_frac"] == pytest.approx(m1["train/clip_frac"], abs=1e-9)
    assert m0["train/loss"] == pytest.approx(m1["train/loss"], abs=1e-6)
    assert m0["train/grad_norm"] == pytest.approx(m1["train/grad_norm"], rel=1e-5)
    d = (p0 - p1).abs()  # AdamW steps of ~lr * sign(g): see the test above
    assert d.max().item() < 3e-5
