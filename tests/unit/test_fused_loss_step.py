"""`trainer.fused_loss`: a trainer step whose policy-loss gradient is made in the LM head's
forward (`rlsys.kernels.head_loss`) equals the step through autograd (fp32: same loss,
metrics, gradient norm and updated weights), for the per-token losses; GSPO keeps autograd's
path. A spy on `fused_head_loss` proves which path ran."""

from __future__ import annotations

import pytest
import torch

from rlsys.config import load_recipe, to_dict
from rlsys.kernels import head_loss
from rlsys.trainer.worker import TrainerWorker

BASE = ["model.path=tiny-llama", "trainer.lr=1e-3", "trainer.micro_batch_tokens=60"]
FP32 = ["trainer.autocast_bf16=false"]
# two mini-batches: the second's ratios differ from 1, so clipping and weights matter
CASES = {
    "clipped_kl_entropy": [
        "trainer.mini_batches=2",
        "algorithm.clip_low=0.002",
        "algorithm.clip_high=0.003",
        "algorithm.kl.mode=loss",
        "algorithm.kl.estimator=k3",
        "algorithm.entropy_coef=0.01",
    ],
    "cispo_tis": [
        "trainer.mini_batches=2",
        "algorithm.policy_loss=cispo",
        "algorithm.clip_low=0.002",
        "algorithm.clip_high=0.002",
        "algorithm.off_policy.mode=tis",
        "algorithm.loss_agg=seq-mean-token-sum-norm",
    ],
    "dual_clip_decoupled_kl_reward": [
        "trainer.mini_batches=2",
        "algorithm.dual_clip=1.5",
        "algorithm.clip_low=0.002",
        "algorithm.off_policy.mode=decoupled",
        "algorithm.off_policy.cap=1.001",
        "algorithm.kl.mode=reward",
        "algorithm.loss_agg=seq-mean-token-mean",
    ],
    "reinforce": ["algorithm.policy_loss=reinforce", "algorithm.loss_agg=seq-mean-token-sum"],
}
REAL = head_loss.fused_head_loss
METRICS = ("train/loss", "train/entropy", "train/clip_frac", "train/kl", "train/is_weight")


def _step(path: str, groups, overrides: list[str], fused: bool, monkeypatch) -> tuple:
    """(metrics, flat updated parameters, fused_head_loss calls) of one step."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[0].shape[0])
        return REAL(*args, **kwargs)

    monkeypatch.setattr(head_loss, "fused_head_loss", spy)
    cfg = load_recipe(None, [*BASE, *overrides, f"trainer.fused_loss={str(fused).lower()}"])
    w = TrainerWorker(to_dict(cfg), path)
    m = w.train_step(groups)
    params = torch.cat([p.detach().flatten() for p in w.model.parameters()])
    return m, params, calls, w.fused_loss


@pytest.mark.parametrize("case", CASES, ids=str)
def test_fused_loss_step_equals_autograd_step(
    tiny_model_path, synthetic_groups, case: str, monkeypatch
) -> None:
    groups = synthetic_groups()
    m0, p0, calls0, on0 = _step(tiny_model_path, groups, [*FP32, *CASES[case]], False, monkeypatch)
    m1, p1, calls1, on1 = _step(tiny_model_path, groups, [*FP32, *CASES[case]], True, monkeypatch)
    assert (on0, on1) == (False, True)
    assert calls0 == [] and len(calls1) >= m1["train/micro_batches"] >= 1
    for key in METRICS:
        if key in m0:
            assert m1[key] == pytest.approx(m0[key], rel=1e-5, abs=1e-7), key
    if case != "reinforce":
        assert m0["train/clip_frac"] > 0  # the clipped branches are exercised
    assert m1["train/grad_norm"] == pytest.approx(m0["train/grad_norm"], rel=1e-5)
    # AdamW's first step moves each weight by ~lr * sign(g): where g nearly cancels the
    # summation order can flip it (see test_trainer_step.py), so a handful may differ
    d = (p0 - p1).abs()
    assert d.max().item() < 3e-5
    assert int((d > 1e-6).sum()) <= 20


def test_bf16_autocast_fused_loss_step_is_close(
    tiny_model_path, synthetic_groups, monkeypatch
) -> None:
    groups = synthetic_groups()
    m0, _, _, _ = _step(tiny_model_path, groups, CASES["clipped_kl_entropy"], False, monkeypatch)
    m1, _, calls, _ = _step(tiny_model_path, groups, CASES["clipped_kl_entropy"], True, monkeypatch)
    assert calls
    # both round the GEMM operands to bf16 (oneDNN's bf16 mode); the chunking differs
    assert m1["train/loss"] == pytest.approx(m0["train/loss"], rel=1e-3, abs=1e-5)
    assert m1["train/grad_norm"] == pytest.approx(m0["train/grad_norm"], rel=1e-2)


def test_gspo_keeps_the_autograd_path(tiny_model_path, synthetic_groups, monkeypatch) -> None:
    gspo = ["algorithm.policy_loss=gspo", "algorithm.loss_agg=seq-mean-token-mean"]
    _, _, calls, on = _step(tiny_model_path, synthetic_groups(), [*FP32, *gspo], True, monkeypatch)
    assert on is False and calls == []
