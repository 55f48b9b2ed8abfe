"""Advantage estimators: pure functions on reward tensors.

Outcome estimators take rewards shaped [G, n] (G prompt groups of n samples) and return one
advantage per sample, broadcast over its tokens by the caller:

- `grpo`: A_i = (r_i - mean(r)) / (std(r) + eps) within the group (Shao et al. 2024,
  DeepSeekMath). std is the unbiased sample std, as in verl and OpenRLHF. With
  `norm_by_std=False` it is Dr.GRPO's A_i = r_i - mean(r) (Liu et al. 2025).
- `rloo`: A_i = r_i - mean_{j != i} r_j = n / (n - 1) * (r_i - mean(r)) (Ahmadian et al. 2024).
- `remax`: A_i = r_i - r_greedy, the reward of the greedy response to the same prompt
  (Li et al. 2023).
- `reinforce_pp`: REINFORCE++ (Hu 2025): optionally subtract the group mean, then normalise
  over the whole batch: A = (x - mean_batch(x)) / (std_batch(x) + eps).

`gae` is per token, for PPO (Schulman et al. 2016), over the response tokens of each row:

    delta_t = r_t + gamma * V_{t+1} - V_t        (V after the last token is 0)
    A_t     = delta_t + gamma * lam * A_{t+1}
    R_t     = A_t + V_t                           (the critic's regression target)

`returns_to_go` turns per-token rewards (e.g. a KL penalty) into sum_{s >= t} r_s.
"""

from __future__ import annotations

import torch


def _check(rewards: torch.Tensor, min_group: int) -> None:
    if rewards.dim() != 2 or rewards.shape[1] < min_group:
        raise ValueError(
            f"needs groups of at least {min_group} samples, got rewards of shape "
            f"{tuple(rewards.shape)} (raise rollout.n_samples_per_prompt)"
        )
    if not torch.isfinite(rewards).all():
        raise ValueError("non-finite reward in advantage computation")


def grpo(rewards: torch.Tensor, norm_by_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """rewards [G, n] -> advantages [G, n]."""
    _check(rewards, 2)
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if norm_by_std:
        centred = centred / (rewards.std(dim=1, keepdim=True) + eps)
    return centred


def rloo(rewards: torch.Tensor) -> torch.Tensor:
    """rewards [G, n] -> leave-one-out advantages [G, n]."""
    _check(rewards, 2)
    n = rewards.shape[1]
    loo_mean = (rewards.sum(dim=1, keepdim=True) - rewards) / (n - 1)
    return rewards - loo_mean


def remax(rewards: torch.Tensor, greedy_rewards: torch.Tensor) -> torch.Tensor:
    """rewards [G, n], greedy_rewards [G] -> advantages [G, n]."""
    _check(rewards, 1)
    if greedy_rewards.shape != (rewards.shape[0],) or not torch.isfinite(greedy_rewards).all():
        raise ValueError("ReMax needs one finite greedy reward per group")
    return rewards - greedy_rewards[:, None]


def reinforce_pp(
    rewards: torch.Tensor, group_baseline: bool = False, eps: float = 1e-6
) -> torch.Tensor:
    """rewards [G, n] -> batch-normalised advantages [G, n]."""
    _check(rewards, 1)
    x = rewards - rewards.mean(dim=1, keepdim=True) if group_baseline else rewards
    if x.numel() < 2:
        return x - x.mean()
    return (x - x.mean()) / (x.std() + eps)


def normalize_tokens(adv: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Whiten per-token advantages over the masked tokens of the batch (REINFORCE++ with a
    per-token KL penalty, PPO's advantage whitening)."""
    n = mask.sum().clamp(min=1)
    mean = (adv * mask).sum() / n
    var = (((adv - mean) * mask) ** 2).sum() / (n - 1).clamp(min=1)
    return (adv - mean) / (var.sqrt() + eps) * mask


def returns_to_go(
    token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0
) -> torch.Tensor:
    """[B, T] per-token rewards -> sum_{s >= t} gamma^{s-t} r_s over masked-in positions.
    Masked-out positions (env tokens, padding) are skipped, as in `gae`."""
    out = torch.zeros_like(token_rewards)
    running = torch.zeros_like(token_rewards[:, 0])
    for t in range(token_rewards.shape[1] - 1, -1, -1):
        m = mask[:, t] > 0
        running = torch.where(m, token_rewards[:, t] + gamma * running, running)
        out[:, t] = running
    return out * mask


def gae(
    token_rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token GAE over masked positions of each row. All inputs [B, T]; masked positions
    are skipped (the next value is that of the next *masked-in* position), so env tokens inside
    a trajectory do not break the recursion. Returns (advantages, returns), zero where masked."""
    if not (token_rewards.shape == values.shape == mask.shape):
        raise ValueError("token_rewards, values and mask must have the same shape")
    b, t_len = values.shape
    adv = torch.zeros_like(values)
    last_adv = torch.zeros(b, dtype=values.dtype)
    next_value = torch.zeros(b, dtype=values.dtype)
    for t in range(t_len - 1, -1, -1):
        m = mask[:, t]
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * last_adv
        adv[:, t] = a * m
        last_adv = torch.where(m > 0, a, last_adv)
        next_value = torch.where(m > 0, values[:, t], next_value)
    returns = (adv + values) * mask
    return adv, returns
