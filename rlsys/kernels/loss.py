"""Fused per-token policy loss: one pass computes the aggregated loss and its gradient.

Per token (r = exp(clamp(logp - old, -20, 20)), A the advantage, k3 with d = ref - logp):

    pg  = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))
    pg  = min(pg, -c A)            if A < 0 and dual_clip c is set (verl dual-clip)
    l   = pg + beta (e^d - d - 1) - alpha H

Aggregation is linear in l: loss = sum_it w_it l_it with weights w from the mask and mode
(`token_weights`; the formulas are in `reference.policy_loss_ref`). The gradient is
elementwise, so the forward stores it and the backward only scales it:

    dl/dlogp = [pg unclipped and not dual-capped] (-A r) [|logp - old| <= 20] + beta (1 - e^d)
    dl/dH    = -alpha
    dloss/dlogp_it = w_it dl/dlogp_it,   dloss/dH_it = -alpha w_it

Saved for backward: one [B, L] tensor (the autograd reference keeps ~10). Gradients flow to
logp and entropy only; old_logp, advantages and ref_logp are constants.

Against `rlsys.trainer.losses` (policy_loss + kl_penalty + aggregate), which it can replace:
- log(ratio) is clamped to [-20, 20] (verl): equal for |logp - old| <= 20, finite beyond.
- the KL term is plain k3 (issue 9), not `low_var_kl`'s k3 clamped to [-10, 10].
- no off-policy importance weights (tis / decoupled) yet; `clipped` counts ratio clips and
  dual-clip caps alike, as the trainer does; masked tokens read as 0, as the trainer does.
"""

from __future__ import annotations

import torch

from rlsys.kernels.backend import resolve
from rlsys.kernels.reference import (
    LOG_RATIO_CLAMP,
    LOSS_AGG_MODES,
    PolicyLoss,
    broadcast_advantages,
    compute_dtype,
)


def fused_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    kl_coef: float = 0.0,
    entropy_coef: float = 0.0,
    loss_agg: str = "token-mean",
    norm_len: int | None = None,
    denominator: float | None = None,
    backend: str = "auto",
) -> PolicyLoss:
    """Aggregated clipped policy loss (+ k3 KL, entropy bonus) and its statistics.

    Same arguments and result as `reference.policy_loss_ref`; inputs [B, L] (advantages also
    [B] or [B, 1]), mask > 0 marks trained tokens. backend: "auto" (Triton on CUDA, fused
    torch on CPU), "triton" or "torch".
    """
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    if entropy is None and entropy_coef != 0.0:
        raise ValueError("entropy_coef needs the entropy tensor")
    if ref_logp is None and kl_coef != 0.0:
        raise ValueError("kl_coef needs ref_logp")
    dt = compute_dtype(logp, old_logp)
    w = token_weights(mask, loss_agg, norm_len, denominator, dt)
    adv = broadcast_advantages(advantages, logp)
    consts = (clip_low, clip_high, dual_clip, kl_coef, entropy_coef)
    if resolve(backend, logp.device) == "triton":
        from rlsys.kernels.loss_triton import TritonPolicyLoss as fn
    else:
        fn = _TorchPolicyLoss
    loss, clipped, kl = fn.apply(logp, entropy, old_logp, adv, ref_logp, mask, w, consts)
    return PolicyLoss(loss=loss, clipped=clipped, kl=kl, tokens=(mask > 0).sum().to(dt))


def token_weights(
    mask: torch.Tensor,
    loss_agg: str,
    norm_len: int | None = None,
    denominator: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """[B, L] weights w with loss = sum_it w_it l_it for the aggregation `loss_agg`."""
    m = (mask > 0).to(dtype)
    if loss_agg == "token-mean":
        return m / (denominator if denominator is not None else m.sum().clamp(min=1))
    if loss_agg not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss_agg '{loss_agg}', expected one of {LOSS_AGG_MODES}")
    lens = m.sum(-1, keepdim=True)
    n_seq = denominator if denominator is not None else (lens > 0).sum().clamp(min=1)
    if loss_agg == "seq-mean-token-mean":
        return m / (lens.clamp(min=1) * n_seq)
    if loss_agg == "seq-mean-token-sum-norm":
        return m / (float(norm_len if norm_len is not None else mask.shape[-1]) * n_seq)
    return m / n_seq  # seq-mean-token-sum


def token_terms(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    ref_logp: torch.Tensor | None,
    entropy: torch.Tensor | None,
    consts: tuple,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token (loss l, dl/dlogp, clip active, k3) with the analytic gradient; the torch
    twin of the Triton kernel's body."""
    clip_low, clip_high, dual_clip, kl_coef, entropy_coef = consts
    d = logp - old_logp
    ratio = torch.exp(d.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    pg = torch.maximum(pg1, pg2)
    dpg = torch.where(pg1 >= pg2, -adv, 0.0)  # d pg / d ratio; ties sit inside the clip range
    clipped = pg2 > pg1
    if dual_clip is not None:
        capped = (adv < 0) & (pg > -dual_clip * adv)
        pg = torch.where(capped, -dual_clip * adv, pg)
        dpg = torch.where(capped, 0.0, dpg)
        clipped = clipped | capped
    dlp = dpg * ratio * (d.abs() <= LOG_RATIO_CLAMP)
    k3 = torch.zeros_like(pg)
    if ref_logp is not None:
        dr = ref_logp - logp
        er = torch.exp(dr)
        k3 = er - dr - 1.0
        pg = pg + kl_coef * k3
        dlp = dlp + kl_coef * (1.0 - er)
    if entropy is not None:
        pg = pg - entropy_coef * entropy
    return pg, dlp, clipped, k3


class StoredGradientLoss(torch.autograd.Function):
    """Shared backward of both backends: the forward stored w * dl/dlogp via `stash`."""

    @staticmethod
    def stash(ctx, dlogp: torch.Tensor, w: torch.Tensor, consts: tuple, logp, entropy) -> None:
        ctx.save_for_backward(dlogp, w)
        ctx.entropy_coef = consts[4]
        ctx.dtypes = (logp.dtype, None if entropy is None else entropy.dtype)

    @staticmethod
    def backward(ctx, g, _g_clipped, _g_kl):
        dlogp, w = ctx.saved_tensors
        lp_dtype, ent_dtype = ctx.dtypes
        g_lp = (g * dlogp).to(lp_dtype) if ctx.needs_input_grad[0] else None
        g_ent = (-ctx.entropy_coef * g * w).to(ent_dtype) if ctx.needs_input_grad[1] else None
        return g_lp, g_ent, None, None, None, None, None, None


class _TorchPolicyLoss(StoredGradientLoss):
    """CPU path: torch ops with the analytic gradient (one [B, L] tensor saved)."""

    @staticmethod
    def forward(ctx, logp, entropy, old_logp, adv, ref_logp, mask, w, consts):
        dt = w.dtype
        valid = mask > 0
        zero = torch.zeros((), dtype=dt, device=w.device)

        def masked(x: torch.Tensor | None) -> torch.Tensor | None:
            # masked tokens read as 0: padding with inf/NaN logprobs cannot leak in
            return None if x is None else torch.where(valid, x.detach().to(dt), zero)

        lt, dlp, clipped, k3 = token_terms(
            *(masked(x) for x in (logp, old_logp, adv, ref_logp, entropy)), consts
        )
        StoredGradientLoss.stash(ctx, torch.where(valid, dlp, zero) * w, w, consts, logp, entropy)
        stats = ((clipped & valid).sum().to(dt), torch.where(valid, k3, zero).sum())
        ctx.mark_non_differentiable(*stats)
        return (torch.where(valid, lt, zero) * w).sum(), *stats
