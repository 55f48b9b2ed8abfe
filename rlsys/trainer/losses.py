"""Policy losses: pure functions on per-token tensors.

Clipped surrogate (PPO, Schulman et al. 2017) with separate low/high clip (DAPO's
clip-higher, Yu et al. 2025):

    ratio_t = exp(logp_t - old_logp_t)
    l_t     = -min(ratio_t * A_t, clip(ratio_t, 1 - eps_low, 1 + eps_high) * A_t)

Aggregation over a mini-batch of sequences (mask m, sequence length |o_i| = sum_t m_it):

    token-mean:          sum_it l_it m_it / sum_it m_it
    seq-mean-token-mean: mean_i (sum_t l_it m_it / |o_i|)
    seq-mean-token-sum:  mean_i (sum_t l_it m_it)

`denominator` lets micro-batches of one mini-batch share the mini-batch's normaliser, so that
accumulated gradients equal the gradient of the unsplit loss.
"""

from __future__ import annotations

import torch


def clipped_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss and per-token clipped indicator, both [B, T] (masked positions 0)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * advantages
    loss = -torch.minimum(unclipped, clipped)
    was_clipped = (clipped < unclipped).float()
    return loss * mask, was_clipped * mask


def aggregate(
    loss: torch.Tensor, mask: torch.Tensor, mode: str, denominator: float
) -> torch.Tensor:
    """Reduce a masked [B, T] per-token loss; `denominator` is the mini-batch's token count
    (token-mean) or sequence count (seq-mean-*)."""
    if mode == "token-mean":
        return loss.sum() / denominator
    per_seq = loss.sum(dim=-1)
    if mode == "seq-mean-token-mean":
        per_seq = per_seq / mask.sum(dim=-1).clamp(min=1)
    elif mode != "seq-mean-token-sum":
        raise ValueError(f"unknown loss aggregation '{mode}'")
    return per_seq.sum() / denominator


def denominator(mask: torch.Tensor, mode: str) -> float:
    """The normaliser `aggregate` expects for a whole mini-batch `mask` [B, T]."""
    if mode == "token-mean":
        return max(float(mask.sum()), 1.0)
    return float(max(int((mask.sum(dim=-1) > 0).sum()), 1))
