"""From finished groups to per-token advantages: the algorithm-specific part of a step.

    outcome rewards r [G, n] ──estimator──► A [G, n] ──broadcast──► A_t [B, T]
    (kl.mode == reward)   A_t += returns_to_go(-beta * kl_t)        (whitened for reinforce_pp)
    (gae)                 r_t = -beta * kl_t, + r at the last token; A_t, R_t = GAE(r_t, V_t)

ReMax's greedy sample is part of its group but never trained on: it only supplies the baseline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlsys.config import AlgorithmConfig
from rlsys.trainer import advantages as est
from rlsys.trainer.losses import kl_penalty
from rlsys.types import Sample, SampleGroup


@dataclass
class GroupRewards:
    samples: list[Sample]  # trainable samples, group-major
    rewards: torch.Tensor  # [G, n]
    greedy: torch.Tensor | None  # [G] ReMax baseline rewards


def split_groups(groups: list[SampleGroup]) -> GroupRewards:
    """Trainable samples and their rewards as [G, n]; greedy rewards for ReMax groups."""
    samples, rows, greedy = [], [], []
    for g in groups:
        train = [s for s in g.samples if s.trainable]
        base = [s for s in g.samples if not s.trainable]
        if len(base) > 1:
            raise ValueError(f"group {g.group_id} has {len(base)} baseline samples, expected <= 1")
        samples += train
        rows.append([float(s.reward) for s in train])
        if base:
            greedy.append(float(base[0].reward))
    sizes = {len(r) for r in rows}
    if len(sizes) != 1:
        raise ValueError(f"groups of unequal size in one batch: {sorted(sizes)}")
    rewards = torch.tensor(rows, dtype=torch.float32)
    if not torch.isfinite(rewards).all():
        raise ValueError("non-finite reward reached the trainer")
    g = torch.tensor(greedy) if greedy else None
    if g is not None and len(greedy) != len(groups):
        raise ValueError("ReMax: some groups lack their greedy baseline sample")
    return GroupRewards(samples, rewards, g)


def outcome_advantages(gr: GroupRewards, cfg: AlgorithmConfig) -> torch.Tensor:
    """One advantage per trainable sample, [G * n], for the outcome estimators."""
    r = gr.rewards
    if cfg.advantage == "grpo":
        a = est.grpo(r, norm_by_std=cfg.norm_adv_by_std)
    elif cfg.advantage == "rloo":
        a = est.rloo(r)
    elif cfg.advantage == "reinforce_pp":
        a = est.reinforce_pp(r, group_baseline=cfg.group_baseline)
    elif cfg.advantage == "remax":
        if gr.greedy is None:
            raise ValueError("ReMax needs the greedy baseline sample in every group")
        a = est.remax(r, gr.greedy)
    else:
        raise ValueError(f"'{cfg.advantage}' is not an outcome estimator")
    return a.flatten()


def last_token_rewards(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] outcome rewards placed on the last trainable token of each row -> [B, T]."""
    idx = torch.arange(mask.shape[1]).expand_as(mask)
    last = torch.where(mask > 0, idx, torch.full_like(idx, -1)).max(dim=1).values
    out = torch.zeros_like(mask, dtype=torch.float32)
    rows = torch.nonzero(last >= 0).squeeze(-1)
    out[rows, last[rows]] = rewards[rows]
    return out


def token_advantages(
    gr: GroupRewards,
    cfg: AlgorithmConfig,
    mask: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    values: torch.Tensor | None,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, float]]:
    """Per-token advantages [B, T] (and returns for the critic) for a collated batch."""
    stats: dict[str, float] = {}
    kl_rew = torch.zeros_like(mask)
    if cfg.kl.mode == "reward":
        assert old_logp is not None and ref_logp is not None
        kl = kl_penalty(old_logp, ref_logp, cfg.kl.estimator) * mask
        kl_rew = -kl_coef * kl
        stats["train/kl_reward"] = float(kl.sum() / mask.sum().clamp(min=1))
    if cfg.advantage == "gae":
        if values is None:
            raise ValueError("GAE needs critic values")
        token_r = kl_rew + last_token_rewards(gr.rewards.flatten(), mask)
        adv, returns = est.gae(token_r, values, mask, cfg.gamma, cfg.lam)
        return est.normalize_tokens(adv, mask), returns, stats
    if cfg.kl.mode == "reward" and cfg.advantage == "reinforce_pp":
        # REINFORCE++ with a per-token KL penalty: returns-to-go of (outcome at the last token
        # - beta * kl_t), whitened over all tokens of the batch (OpenRLHF's formulation).
        r = gr.rewards
        base = r - r.mean(dim=1, keepdim=True) if cfg.group_baseline else r
        g = est.returns_to_go(kl_rew + last_token_rewards(base.flatten(), mask), mask)
        return est.normalize_tokens(g, mask), None, stats
    adv = outcome_advantages(gr, cfg)[:, None] * mask
    if cfg.kl.mode == "reward":
        adv = adv + est.returns_to_go(kl_rew, mask)
    return adv, None, stats
