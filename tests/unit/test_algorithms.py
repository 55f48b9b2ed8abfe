"""Estimators, losses, KL estimators and aggregation against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from rlsys.config import OverlongConfig, load_recipe
from rlsys.rollout.worker import overlong_penalty
from rlsys.trainer import advantages as est
from rlsys.trainer.algorithm import split_groups, token_advantages
from rlsys.trainer.losses import (
    AdaptiveKLController,
    aggregate,
    denominator,
    kl_penalty,
    off_policy_weights,
    policy_loss,
    value_loss,
)
from rlsys.types import Sample, SampleGroup

T = torch.tensor


def test_rloo_by_hand() -> None:
    # [3, 1, 2]: leave-one-out means 1.5, 2.5, 2.0 -> 1.5, -1.5, 0.0
    assert torch.allclose(est.rloo(T([[3.0, 1.0, 2.0]])), T([[1.5, -1.5, 0.0]]))


def test_remax_by_hand() -> None:
    a = est.remax(T([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]), T([0.5, 1.0]))
    assert a.tolist() == [[0.5, -0.5, 0.5], [-1.0, -1.0, -1.0]]


def test_reinforce_pp_by_hand() -> None:
    # x = [1, 0, 1, 1]: mean 0.75, unbiased std sqrt((3 * 0.0625 + 0.5625) / 3) = 0.5
    a = est.reinforce_pp(T([[1.0, 0.0], [1.0, 1.0]]), eps=0.0)
    assert torch.allclose(a, T([[0.5, -1.5], [0.5, 0.5]]))
    # group baseline first: [[0.5, -0.5], [0, 0]], mean 0, std sqrt(0.5 / 3) = 0.408248
    b = est.reinforce_pp(T([[1.0, 0.0], [1.0, 1.0]]), group_baseline=True, eps=0.0)
    assert torch.allclose(b, T([[1.224745, -1.224745], [0.0, 0.0]]), atol=1e-5)


def test_group_estimators_sum_to_zero_per_group() -> None:
    torch.manual_seed(0)
    r = torch.rand(6, 5)
    assert torch.allclose(est.grpo(r).sum(1), torch.zeros(6), atol=1e-5)
    assert torch.allclose(est.grpo(r, norm_by_std=False).sum(1), torch.zeros(6), atol=1e-6)
    assert torch.allclose(est.rloo(r).sum(1), torch.zeros(6), atol=1e-6)


def test_gae_by_hand() -> None:
    r, v, m = T([[0.0, 0.0, 1.0]]), T([[0.5, 0.4, 0.6]]), torch.ones(1, 3)
    # gamma = lam = 1: delta = [-0.1, 0.2, 0.4] -> A = [0.5, 0.6, 0.4], returns all 1.0
    adv, ret = est.gae(r, v, m, 1.0, 1.0)
    assert torch.allclose(adv, T([[0.5, 0.6, 0.4]]))
    assert torch.allclose(ret, T([[1.0, 1.0, 1.0]]))
    # gamma 0.9, lam 0.5: delta2 = 0.4; delta1 = 0.54 - 0.4 = 0.14, A1 = 0.14 + 0.45 * 0.4 = 0.32;
    # delta0 = 0.36 - 0.5 = -0.14, A0 = -0.14 + 0.45 * 0.32 = 0.004
    adv, _ = est.gae(r, v, m, 0.9, 0.5)
    assert torch.allclose(adv, T([[0.004, 0.32, 0.4]]), atol=1e-6)


def test_gae_lambda_one_is_returns_minus_values() -> None:
    torch.manual_seed(1)
    r, v = torch.randn(4, 7), torch.randn(4, 7)
    m = (torch.rand(4, 7) > 0.3).float()
    adv, _ = est.gae(r * m, v, m, 1.0, 1.0)
    rtg = est.returns_to_go(r * m, m)
    assert torch.allclose(adv, (rtg - v) * m, atol=1e-5)


def test_estimators_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        est.grpo(T([[1.0], [0.0]]))
    with pytest.raises(ValueError, match="at least 2"):
        est.rloo(T([[1.0]]))
    with pytest.raises(ValueError, match="non-finite"):
        est.rloo(T([[1.0, math.inf]]))
    with pytest.raises(ValueError, match="greedy"):
        est.remax(T([[1.0, 0.0]]), T([math.nan]))


def test_dual_clip_and_reinforce_by_hand() -> None:
    # A = -1, ratio = e^1.5 = 4.4817: pg1 = 4.4817, pg2 = 1.2 -> 4.4817; dual clip c = 3 -> 3
    logp = T([[1.5]], requires_grad=True)
    loss, clipped = policy_loss(logp, T([[0.0]]), T([[-1.0]]), T([[1.0]]), "clipped", 0.2, 0.2, 3.0)
    assert torch.allclose(loss, T([[3.0]])) and clipped.item() == 1.0
    loss.sum().backward()
    assert logp.grad.item() == 0.0  # the capped branch is constant
    # clip-higher: A = +1, ratio e^0.3 = 1.3499 clips at 1 + 0.28 -> -1.28
    loss, _ = policy_loss(T([[0.3]]), T([[0.0]]), T([[1.0]]), T([[1.0]]), "clipped", 0.2, 0.28)
    assert torch.allclose(loss, T([[-1.28]]))
    loss, _ = policy_loss(
        T([[-0.5, -2.0]]), T([[9.0, 9.0]]), T([[2.0, -1.0]]), T([[1.0, 1.0]]), "reinforce"
    )
    assert torch.allclose(loss, T([[1.0, -2.0]]))  # -A * logp, old logprobs ignored


def test_ppo_gradient_equals_reinforce_gradient_at_ratio_one() -> None:
    torch.manual_seed(2)
    adv, mask = torch.randn(3, 5), (torch.rand(3, 5) > 0.2).float()
    grads = []
    for kind in ("clipped", "reinforce", "cispo"):
        logp = (torch.randn(3, 5, generator=torch.Generator().manual_seed(3)) - 2).requires_grad_()
        tok, _ = policy_loss(logp, logp.detach(), adv, mask, kind, 0.2, 0.2)
        aggregate(tok, mask, "token-mean", denominator(mask, "token-mean")).backward()
        grads.append(logp.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-7)
    assert torch.allclose(grads[2], grads[1], atol=1e-7)  # CISPO
    # GSPO at ratio 1 too (s_i = 1 inside any clip range): REINFORCE's gradient
    logp = (torch.randn(3, 5, generator=torch.Generator().manual_seed(3)) - 2).requires_grad_()
    tok, _ = policy_loss(logp, logp.detach(), adv, mask, "gspo", 3e-4, 4e-4)
    aggregate(tok, mask, "token-mean", denominator(mask, "token-mean")).backward()
    assert torch.allclose(logp.grad, grads[1], atol=1e-7)


def test_gspo_by_hand() -> None:
    # Row 0 (2 tokens, the third masked): logp - old = (0.3, -0.1), mean 0.1 -> s = e^0.1 =
    # 1.10517 for both tokens. A = +1, clip 0.05 / 0.05: clip(s) = 1.05 < s -> l = -1.05,
    # clipped. Row 1 (3 tokens): logp - old = (-0.2, 0.1, -0.05), mean -0.05 -> s = e^-0.05
    # = 0.951229, inside [0.95, 1.05]: l = -A s = 0.951229 for A = -1, not clipped.
    logp = T([[-1.0, -2.0, 9.0], [-0.5, -1.5, -2.0]], requires_grad=True)
    old = T([[-1.3, -1.9, 0.0], [-0.3, -1.6, -1.95]])
    adv = T([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]])
    mask = T([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    loss, clipped = policy_loss(logp, old, adv, mask, "gspo", 0.05, 0.05)
    s1 = math.exp(-0.05)
    assert torch.allclose(loss, T([[-1.05, -1.05, 0.0], [s1, s1, s1]]), atol=1e-6)
    assert torch.equal(clipped, T([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))
    loss.sum().backward()
    # row 0 is clipped (constant); row 1: d(-A s)/d logp_t = s for every kept token
    assert torch.allclose(logp.grad, T([[0.0, 0.0, 0.0], [s1, s1, s1]]), atol=1e-6)


def test_gspo_gradient_is_the_sequence_objective_gradient() -> None:
    """GSPO-token, seq-mean-token-mean, equals the gradient of GSPO's sequence objective
    -mean_i min(s_i A_i, clip(s_i) A_i), s_i = exp(mean_t(logp - old)), in float64; some
    sequences inside the clip range, some outside."""
    g = torch.Generator().manual_seed(5)
    b, t = 6, 7
    mask = (torch.rand(b, t, generator=g) > 0.3).double()
    mask[:, 0] = 1.0
    old = torch.randn(b, t, generator=g, dtype=torch.float64) - 2
    delta = 0.04 * torch.randn(b, t, generator=g, dtype=torch.float64)
    adv_seq = torch.randn(b, 1, generator=g, dtype=torch.float64)
    adv = adv_seq.expand(b, t)
    lo, hi = 0.01, 0.015

    logp = (old + delta).requires_grad_()
    tok, clipped = policy_loss(logp, old, adv, mask, "gspo", lo, hi)
    aggregate(tok, mask, "seq-mean-token-mean", denominator(mask, "seq-mean-token-mean")).backward()

    ref = (old + delta).requires_grad_()
    s = torch.exp(((ref - old) * mask).sum(-1) / mask.sum(-1))
    a = adv_seq[:, 0]
    (-torch.minimum(s * a, torch.clamp(s, 1 - lo, 1 + hi) * a)).mean().backward()
    assert 0 < int(clipped[:, 0].sum()) < b  # both branches are exercised
    torch.testing.assert_close(logp.grad, ref.grad, rtol=1e-12, atol=1e-12)
    # per-token ratios (PPO's clipped loss) give a different gradient here
    logp2 = (old + delta).requires_grad_()
    tok2, _ = policy_loss(logp2, old, adv, mask, "clipped", lo, hi)
    aggregate(
        tok2, mask, "seq-mean-token-mean", denominator(mask, "seq-mean-token-mean")
    ).backward()
    assert not torch.allclose(logp2.grad, ref.grad, atol=1e-6)


def test_gspo_on_a_packed_row_equals_separate_rows() -> None:
    """Two sequences packed into one row (with `seq_ids`) get the loss and gradient they get
    as rows of their own: one ratio each, not one for the row."""
    g = torch.Generator().manual_seed(7)
    lp = torch.randn(2, 4, generator=g, dtype=torch.float64) - 1
    old = lp + 0.01 * torch.randn(2, 4, generator=g, dtype=torch.float64)
    adv = T([[1.0] * 4, [-1.0] * 4], dtype=torch.float64)
    mask = T([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    rows = lp.clone().requires_grad_()
    loss_rows, clip_rows = policy_loss(rows, old, adv, mask, "gspo", 0.005, 0.005)
    loss_rows.sum().backward()
    # the packed row: sequence 0's three tokens, then sequence 1's two, then one pad
    order = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (0, 3)]
    pick = lambda x: torch.stack([x[b, t] for b, t in order]).unsqueeze(0)  # noqa: E731
    packed = pick(lp).clone().requires_grad_()
    ids = T([[0, 0, 0, 1, 1, 0]])
    pmask = T([[1.0, 1.0, 1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    loss_p, clip_p = policy_loss(
        packed, pick(old), pick(adv), pmask, "gspo", 0.005, 0.005, None, None, ids
    )
    loss_p.sum().backward()
    torch.testing.assert_close(loss_p, pick(loss_rows).detach() * pmask)
    torch.testing.assert_close(packed.grad, pick(rows.grad) * pmask)
    assert torch.equal(clip_p, pick(clip_rows) * pmask)
    # without the ids the row would be one sequence: a different loss
    loss_one, _ = policy_loss(pick(lp), pick(old), pick(adv), pmask, "gspo", 0.005, 0.005)
    assert not torch.allclose(loss_one, loss_p)


def test_cispo_by_hand() -> None:
    # ratio e^0.5 = 1.648721 clipped to 1 + 0.28 = 1.28; e^-0.1 = 0.904837 inside [0.8, 1.28].
    # l = -A sg[w] logp: -2 * 1.28 * -1.0 = 2.56; -(-1) * 0.904837 * -2.0 = -1.809675.
    logp = T([[-1.0, -2.0, 5.0]], requires_grad=True)
    old, adv, mask = T([[-1.5, -1.9, 0.0]]), T([[2.0, -1.0, 3.0]]), T([[1.0, 1.0, 0.0]])
    loss, clipped = policy_loss(logp, old, adv, mask, "cispo", 0.2, 0.28)
    w1 = math.exp(-0.1)
    assert torch.allclose(loss, T([[2.56, -2.0 * w1, 0.0]]), atol=1e-6)
    assert torch.equal(clipped, T([[1.0, 0.0, 0.0]]))
    loss.sum().backward()
    # d l / d logp = -A sg[w]: the clipped token keeps a (capped) gradient, where PPO's clipped
    # loss gives it none
    assert torch.allclose(logp.grad, T([[-2.56, w1, 0.0]]), atol=1e-6)
    ppo_logp = T([[-1.0]], requires_grad=True)
    policy_loss(ppo_logp, T([[-1.5]]), T([[2.0]]), T([[1.0]]), "clipped", 0.2, 0.28)[
        0
    ].sum().backward()
    assert ppo_logp.grad.item() == 0.0


def test_gspo_needs_sequence_mean_aggregation() -> None:
    from rlsys.config import ConfigError

    with pytest.raises(ConfigError, match="loss_agg=seq-mean-token-mean"):
        load_recipe(None, ["algorithm.policy_loss=gspo"])
    cfg = load_recipe(
        None, ["algorithm.policy_loss=gspo", "algorithm.loss_agg=seq-mean-token-mean"]
    )
    assert cfg.algorithm.policy_loss == "gspo"


@pytest.mark.parametrize("kind", ["clipped", "reinforce", "gspo", "cispo"])
def test_masked_tokens_get_exactly_zero_gradient(kind: str) -> None:
    logp = T([[-0.5, -math.inf, -1.0], [-0.2, -0.3, math.nan]], requires_grad=True)
    mask = T([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    tok, _ = policy_loss(
        logp, T([[-0.4, 0.0, -1.1], [-0.2, -0.2, 0.0]]), torch.ones(2, 3), mask, kind
    )
    aggregate(tok, mask, "token-mean", denominator(mask, "token-mean")).backward()
    assert logp.grad[0, 1].item() == 0.0 and logp.grad[1, 2].item() == 0.0
    assert (logp.grad[mask > 0] != 0).all()


def test_kl_estimators_by_hand() -> None:
    # logp = -1.0, ref = -1.5: log rho = -0.5
    logp, ref = T([-1.0]), T([-1.5])
    assert torch.allclose(kl_penalty(logp, ref, "k1"), T([0.5]))
    assert torch.allclose(kl_penalty(logp, ref, "k2"), T([0.125]))
    assert torch.allclose(kl_penalty(logp, ref, "k3"), T([math.exp(-0.5) - 0.5]))  # 0.106531
    # log rho = 5: k3 = e^5 - 6 = 142.41, clamped to 10
    assert torch.allclose(kl_penalty(T([0.0]), T([5.0]), "k3"), T([math.exp(5) - 6]))
    assert kl_penalty(T([0.0]), T([5.0]), "low_var_kl").item() == 10.0
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_penalty(logp, ref, "k4")


def test_aggregation_modes_by_hand() -> None:
    loss, mask = T([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]]), T([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    cases = {
        "token-mean": 2.0,  # 6 / 3 tokens
        "seq-mean-token-mean": 2.25,  # (3/2 + 3/1) / 2
        "seq-mean-token-sum": 3.0,  # (3 + 3) / 2
        "seq-mean-token-sum-norm": 0.75,  # (3/4 + 3/4) / 2 with norm_len 4
    }
    for mode, want in cases.items():
        got = aggregate(loss, mask, mode, denominator(mask, mode), norm_len=4)
        assert got.item() == pytest.approx(want), mode
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        aggregate(loss, mask, "token-sum", 1.0)


def test_value_loss_by_hand() -> None:
    # V = 1.0, V_old = 0.5, R = 2: unclipped 1.0; clipped V = 0.7 -> 1.69; 0.5 * max = 0.845
    v = value_loss(T([[1.0, 5.0]]), T([[0.5, 0.0]]), T([[2.0, 0.0]]), T([[1.0, 0.0]]), clip=0.2)
    assert torch.allclose(v, T([[0.845, 0.0]]))


def test_off_policy_weights_by_hand() -> None:
    old, behav, mask = T([[0.1, 2.0]]), T([[0.0, 0.0]]), torch.ones(1, 2)
    w, m = off_policy_weights(old, behav, mask, "tis", cap=2.0)
    assert torch.allclose(w, T([[math.exp(0.1), 2.0]])) and m.tolist() == [[1.0, 1.0]]
    w, m = off_policy_weights(old, behav, mask, "decoupled", cap=2.0)
    assert torch.allclose(w, T([[math.exp(0.1), 0.0]])) and m.tolist() == [[1.0, 0.0]]
    assert off_policy_weights(old, behav, mask, "none", 2.0)[0] is None


def test_overlong_penalty_by_hand() -> None:
    cfg = OverlongConfig(enabled=True, buffer=5, penalty=1.0)
    assert overlong_penalty(15, 20, cfg) == 0.0
    assert overlong_penalty(17, 20, cfg) == pytest.approx(-0.4)
    assert overlong_penalty(20, 20, cfg) == -1.0


def test_adaptive_kl_by_hand() -> None:
    ctl = AdaptiveKLController(0.1, target=0.01, horizon=100)
    assert ctl.update(0.02, 10) == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))  # error clipped
    assert ctl.update(0.01, 10) == pytest.approx(0.102)  # on target: unchanged


def _group(gid: int, rewards: list[float], greedy: float | None = None) -> SampleGroup:
    samples = []
    for i, r in enumerate(rewards + ([greedy] if greedy is not None else [])):
        s = Sample(group_id=gid, index=i, prompt_ids=[1, 2])
        s.append([5, 6, 7][: 1 + i % 3], [-0.1] * (1 + i % 3), 0, True)
        s.reward, s.trainable = r, i < len(rewards)
        samples.append(s)
    return SampleGroup(gid, samples)


def test_remax_greedy_sample_is_baseline_only() -> None:
    cfg = load_recipe(None, ["algorithm.advantage=remax", "algorithm.policy_loss=reinforce"])
    gr = split_groups([_group(0, [1.0, 0.0], greedy=0.25), _group(1, [0.0, 0.0], greedy=1.0)])
    assert len(gr.samples) == 4 and all(s.trainable for s in gr.samples)
    mask = torch.ones(4, 3)
    adv, ret, _ = token_advantages(gr, cfg.algorithm, mask, None, None, None, 0.0)
    assert ret is None
    assert torch.allclose(adv[:, 0], T([0.75, -0.25, -1.0, -1.0]))


def test_kl_in_reward_adds_returns_to_go() -> None:
    cfg = load_recipe(None, ["algorithm.kl.mode=reward", "algorithm.kl.estimator=k1"])
    gr = split_groups([_group(0, [1.0, 0.0])])
    mask = T([[1.0, 1.0], [1.0, 0.0]])
    old, ref = T([[-1.0, -1.0], [-1.0, 0.0]]), T([[-1.5, -1.0], [-2.0, 0.0]])
    # k1 = old - ref = [[0.5, 0], [1, 0]]; beta 0.1 -> kl rewards [[-0.05, 0], [-0.1, 0]]
    adv, _, stats = token_advantages(gr, cfg.algorithm, mask, old, ref, None, 0.1)
    g = 1 / math.sqrt(2) / (1 / math.sqrt(2) + 1e-6) * 0.707107  # grpo: +-0.707107
    assert torch.allclose(adv, T([[g - 0.05, g], [-g - 0.1, 0.0]]), atol=1e-5)
    assert stats["train/kl_reward"] == pytest.approx(1.5 / 3)
