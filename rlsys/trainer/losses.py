"""Losses: pure functions on per-token [B, T] tensors; masked positions get exactly zero.

Policy losses (A = advantage, ratio r_t = exp(logp_t - old_logp_t)):

- `clipped` (PPO, Schulman et al. 2017) with separate low/high clip (DAPO's clip-higher,
  Yu et al. 2025) and optional dual-clip constant c > 1 for A < 0 (Ye et al. 2020):

      l_t = max(-A r_t, -A clip(r_t, 1 - eps_low, 1 + eps_high))
      l_t = min(l_t, -c A)                                   if dual_clip and A < 0

- `reinforce` (ReMax, Li et al. 2023): l_t = -A logp_t, no ratio and no clipping.

- `gspo` (GSPO, Zheng et al. 2025): the clipped loss above with one ratio per sequence, the
  length-normalised sequence likelihood ratio, in its token form (GSPO-token):

      s_i = exp(mean_{t in o_i} (logp_t - old_logp_t))
      r_t = sg[s_i] * exp(logp_t - sg[logp_t])       (value s_i, gradient s_i grad logp_t)

  so a sequence is clipped as a whole. With `seq-mean-token-mean` aggregation (which the
  recipe check requires) the gradient is that of GSPO's sequence objective
  -mean_i min(s_i A_i, clip(s_i) A_i) for sequence-level A; the paper clips at 3e-4 / 4e-4.
  log r_t is capped at 10, as in verl.

- `cispo` (CISPO, MiniMax-M1 2025): REINFORCE weighted by the clipped, detached ratio, so a
  token outside the clip range keeps its gradient (scaled) instead of losing it:

      l_t = -sg[clip(r_t, 1 - eps_low, 1 + eps_high)] A logp_t

  (value at r = 1: -A logp_t, REINFORCE's; the paper leaves the low side unbounded).

Off-policy weights w_t multiply l_t (detached), with behaviour logprobs from the rollout engine
and `old_logp` the trainer's pre-update (proximal) logprobs:

- `tis`: truncated importance sampling, w = min(exp(old - behav), C) (Yao et al. 2025): fixes
  the rollout/trainer numerical mismatch and mild staleness.
- `decoupled`: decoupled PPO (Hilton et al. 2022; AReaL): clip against the proximal policy and
  weight by w = exp(prox - behav); tokens with w > C are dropped from the loss (AReaL's cap).

KL to a reference policy, log rho = ref_logp - logp (Schulman's estimators):

    k1 = -log rho        k2 = (log rho)^2 / 2        k3 = rho - 1 - log rho
    low_var_kl = clamp(k3, -10, 10)                  (verl's clamped k3)

Entropy bonus: l_t -= entropy_coef * H_t. Value loss (clipped, PPO):

    0.5 * max((V - R)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - R)^2)

Aggregation over a mini-batch (mask m, |o_i| = sum_t m_it, `norm_len` a constant):

    token-mean:              sum_it l_it m_it / sum_it m_it
    seq-mean-token-mean:     mean_i (sum_t l_it m_it / |o_i|)
    seq-mean-token-sum:      mean_i (sum_t l_it m_it)
    seq-mean-token-sum-norm: mean_i (sum_t l_it m_it / norm_len)           (Dr.GRPO)

`denominator` is the whole mini-batch's normaliser, so that micro-batches accumulate to the
gradient of the unsplit loss.
"""

from __future__ import annotations

import torch

POLICY_LOSSES = ("clipped", "reinforce", "gspo", "cispo")
OFF_POLICY = ("none", "tis", "decoupled")
KL_ESTIMATORS = ("k1", "k2", "k3", "low_var_kl")
LOSS_AGG = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def off_policy_weights(
    old_logp: torch.Tensor, behav_logp: torch.Tensor, mask: torch.Tensor, mode: str, cap: float
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Per-token weights (None for `none`) and the mask to use (`decoupled` drops tokens)."""
    if mode == "none":
        return None, mask
    w = torch.exp((old_logp - behav_logp).detach())
    if mode == "tis":
        return torch.clamp(w, max=cap), mask
    if mode == "decoupled":
        keep = (w <= cap).to(mask.dtype)
        return w * keep, mask * keep
    raise ValueError(f"unknown off-policy correction '{mode}' (use one of {', '.join(OFF_POLICY)})")


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    kind: str = "clipped",
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    weights: torch.Tensor | None = None,
    seq_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token policy loss and per-token clipped indicator, both [B, T], zero where masked.
    `seq_ids` [B, T] (integers, any device) names each token's sequence, for `gspo` on packed
    rows that hold several sequences; None: each row is one sequence."""
    # Zero the masked positions first (where(), not a product) so that they get exactly zero
    # gradient even when their logprob is inf/NaN (padding).
    keep = mask > 0
    logp = torch.where(keep, logp, torch.zeros_like(logp))
    old_logp = torch.where(keep, old_logp, torch.zeros_like(old_logp))
    advantages = torch.where(keep, advantages, torch.zeros_like(advantages))
    if kind == "reinforce":
        loss = -advantages * logp
        clipped = torch.zeros_like(loss)
    elif kind == "cispo":
        ratio = torch.exp(logp - old_logp).detach()
        w = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
        loss = -advantages * w * logp
        clipped = (w != ratio).float()
    elif kind in ("clipped", "gspo"):
        if kind == "clipped":
            ratio = torch.exp(logp - old_logp)
        else:
            ratio = sequence_ratio(logp, old_logp, keep, seq_ids)
        pg1 = -advantages * ratio
        pg2 = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
        loss = torch.maximum(pg1, pg2)
        clipped = (pg2 > pg1).float()
        if dual_clip is not None:
            if dual_clip <= 1.0:
                raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
            pg3 = -advantages * dual_clip
            capped = (advantages < 0) & (loss > pg3)
            loss = torch.where(capped, pg3, loss)
            clipped = torch.where(capped, torch.ones_like(clipped), clipped)
    else:
        raise ValueError(f"unknown policy loss '{kind}' (use one of {', '.join(POLICY_LOSSES)})")
    if weights is not None:
        loss = loss * weights.detach()
    zero = torch.zeros_like(loss)
    return torch.where(keep, loss, zero), torch.where(keep, clipped, zero)


def sequence_ratio(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    keep: torch.Tensor,
    seq_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """GSPO-token ratio [B, T]: exp(sg[mean_t (logp - old_logp)] + logp - sg[logp]), the mean
    over the kept tokens of each token's sequence: its row, or the tokens sharing its
    `seq_ids` (`logp` and `old_logp` already zero where not kept)."""
    d = (logp - old_logp).detach()
    if seq_ids is None:
        n = keep.sum(dim=-1, keepdim=True).clamp(min=1)
        log_s = d.sum(dim=-1, keepdim=True) / n
    else:
        ids = seq_ids.reshape(-1).to(d.device, torch.long)  # moved only when used
        size = int(ids.max()) + 1 if ids.numel() else 1
        sums = d.new_zeros(size).index_add_(0, ids, d.reshape(-1))
        n = d.new_zeros(size).index_add_(0, ids, keep.reshape(-1).to(d.dtype))
        log_s = (sums / n.clamp(min=1))[ids].reshape(d.shape)
    return torch.exp(torch.clamp(log_s + logp - logp.detach(), max=10.0))


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate from sampled-token logprobs."""
    log_rho = ref_logp - logp
    if estimator == "k1":
        return -log_rho
    if estimator == "k2":
        return 0.5 * log_rho**2
    if estimator in ("k3", "low_var_kl"):
        k3 = torch.exp(log_rho) - 1.0 - log_rho
        return torch.clamp(k3, -10.0, 10.0) if estimator == "low_var_kl" else k3
    raise ValueError(f"unknown KL estimator '{estimator}' (use one of {', '.join(KL_ESTIMATORS)})")


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None = 0.2,
) -> torch.Tensor:
    """Per-token clipped value loss [B, T], zero where masked."""
    loss = (values - returns) ** 2
    if clip is not None:
        v_clip = old_values + torch.clamp(values - old_values, -clip, clip)
        loss = torch.maximum(loss, (v_clip - returns) ** 2)
    return torch.where(mask > 0, 0.5 * loss, torch.zeros_like(loss))


def aggregate(
    loss: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    denominator: float,
    norm_len: float | None = None,
) -> torch.Tensor:
    """Reduce a masked [B, T] per-token loss; `denominator` is the mini-batch's token count
    (token-mean) or sequence count (seq-mean-*), see `denominator()`."""
    if mode == "token-mean":
        return loss.sum() / denominator
    per_seq = loss.sum(dim=-1)
    if mode == "seq-mean-token-mean":
        per_seq = per_seq / mask.sum(dim=-1).clamp(min=1)
    elif mode == "seq-mean-token-sum-norm":
        if not norm_len:
            raise ValueError("seq-mean-token-sum-norm needs norm_len (e.g. max_new_tokens)")
        per_seq = per_seq / norm_len
    elif mode != "seq-mean-token-sum":
        raise ValueError(f"unknown loss aggregation '{mode}' (use one of {', '.join(LOSS_AGG)})")
    return per_seq.sum() / denominator


def denominator(mask: torch.Tensor, mode: str) -> float:
    """The normaliser `aggregate` expects for a whole mini-batch `mask` [B, T]."""
    if mode == "token-mean":
        return max(float(mask.sum()), 1.0)
    return float(max(int((mask.sum(dim=-1) > 0).sum()), 1))


def token_weights(mask: torch.Tensor, mode: str, norm_len: float | None = None) -> torch.Tensor:
    """Per-token weights w [B, T] with sum(l * w) == aggregate(l, mask, mode, ...) for the
    whole mini-batch `mask`; layout-free, so packed and padded micro-batches share them."""
    n_seqs = float(max(int((mask.sum(dim=-1) > 0).sum()), 1))
    if mode == "token-mean":
        return mask / max(float(mask.sum()), 1.0)
    if mode == "seq-mean-token-mean":
        return mask / mask.sum(dim=-1, keepdim=True).clamp(min=1) / n_seqs
    if mode == "seq-mean-token-sum":
        return mask / n_seqs
    if mode == "seq-mean-token-sum-norm":
        if not norm_len:
            raise ValueError("seq-mean-token-sum-norm needs norm_len (e.g. max_new_tokens)")
        return mask / norm_len / n_seqs
    raise ValueError(f"unknown loss aggregation '{mode}' (use one of {', '.join(LOSS_AGG)})")


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019): move beta so the observed KL tracks a
    target, proportionally and clipped to +-20% per update:

        beta <- beta * (1 + clip((kl - target) / target, -0.2, 0.2) * n / horizon)
    """

    def __init__(self, init: float, target: float, horizon: int) -> None:
        self.value, self.target, self.horizon = init, target, horizon

    def update(self, kl: float, n_steps: int) -> float:
        err = max(min((kl - self.target) / self.target, 0.2), -0.2)
        self.value *= 1.0 + err * n_steps / self.horizon
        return self.value
