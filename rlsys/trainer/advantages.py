"""Advantage estimators: pure functions on reward tensors.

`grpo`: A_i = (r_i - mean(r)) / (std(r) + eps) within each prompt group (Shao et al. 2024,
DeepSeekMath). With `norm_by_std=False` it is Dr.GRPO's A_i = r_i - mean(r) (Liu et al. 2025).
std is the unbiased sample std, as in verl and OpenRLHF.
"""

from __future__ import annotations

import torch


def grpo(rewards: torch.Tensor, norm_by_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """rewards: [G, n] (G groups of n samples) -> advantages [G, n]."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(
            f"GRPO needs groups of at least 2 samples, got shape {tuple(rewards.shape)}"
        )
    if not torch.isfinite(rewards).all():
        raise ValueError("non-finite reward in GRPO advantages")
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if norm_by_std:
        centred = centred / (rewards.std(dim=1, keepdim=True) + eps)
    return centred
