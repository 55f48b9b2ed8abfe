"""Plain-torch references of every fused kernel in `rlsys.kernels`.

One copy, shared by the tests (correctness oracle), `benchmarks/kernels.py` (the naive
baseline) and the public entries (the fallback where Triton cannot run). Each function is the
textbook formula with autograd doing the backward; none of them is memory-efficient.

Computation happens in float32, or float64 when an input is float64 (the tests' oracle).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

LOSS_AGG_MODES = (
    "token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)
LOG_RATIO_CLAMP = 20.0  # verl clamps log(ratio) to [-20, 20]: exp(20) = 4.9e8 stays finite


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (bf16/fp16 inputs accumulate in fp32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# --------------------------------------------------------------------------- logprob + entropy


def logprob_entropy_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Naive LM-head log-probability and entropy; materialises the [T, V] logits.

    hidden [T, H], weight [V, H], targets [T] int -> (logprob [T], entropy [T]):

        z_t   = W h_t / tau
        lp_t  = z_t[y_t] - logsumexp(z_t)
        H_t   = -sum_v p_tv log p_tv,   p_t = softmax(z_t)
    """
    dt = compute_dtype(hidden, weight)
    logits = hidden.to(dt) @ weight.to(dt).T / temperature  # [T, V]
    logsm = torch.log_softmax(logits, dim=-1)
    logprob = logsm.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    entropy = -(logsm.exp() * logsm).sum(-1)
    return logprob, entropy


# --------------------------------------------------------------------------- policy loss


class PolicyLoss(NamedTuple):
    """Output of the policy loss. Only `loss` carries gradient; the rest are statistics over the
    masked-in tokens of the call (sums, so micro-batches add up)."""

    loss: torch.Tensor  # [] aggregated loss
    clipped: torch.Tensor  # [] tokens whose ratio clip or dual-clip cap was active
    kl: torch.Tensor  # [] sum of the k3 KL over tokens (0 without ref_logp)
    tokens: torch.Tensor  # [] number of masked-in tokens


def policy_loss_ref(
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
) -> PolicyLoss:
    """Per-token clipped policy loss with dual clip, k3 KL and entropy bonus, aggregated.

    All tensors [B, L] (advantages may be [B, 1] or [B]); mask is 1 for trained tokens.

        r    = exp(clamp(logp - old_logp, -20, 20))
        pg   = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))
        pg   = min(pg, -c A)              where A < 0 and dual_clip = c  (verl dual-clip)
        k3   = exp(ref - logp) - (ref - logp) - 1
        l    = pg + kl_coef * k3 - entropy_coef * H

    Aggregation (m the mask, |o_i| = sum_t m_it, n the number of sequences with a token, or
    `denominator` when given so that micro-batches can share a mini-batch normaliser):

        token-mean:               sum_it l m / (sum_it m   or denominator)
        seq-mean-token-sum:       sum_i (sum_t l m) / n
        seq-mean-token-mean:      sum_i (sum_t l m / |o_i|) / n
        seq-mean-token-sum-norm:  sum_i (sum_t l m / norm_len) / n    (Dr.GRPO; norm_len
                                  a constant, default L)
    """
    dt = compute_dtype(logp, old_logp)
    valid = mask > 0

    def masked(x: torch.Tensor) -> torch.Tensor:
        # zero masked positions first (where, not *) so padding with inf/NaN logprobs gets
        # exactly zero gradient, as in rlsys.trainer.losses
        return torch.where(valid, x.to(dt), torch.zeros((), dtype=dt, device=x.device))

    logp, adv = masked(logp), masked(broadcast_advantages(advantages, logp))
    log_ratio = torch.clamp(logp - masked(old_logp), -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg = torch.maximum(pg1, pg2)
    clipped = pg2 > pg1
    if dual_clip is not None:
        capped = (adv < 0) & (pg > -dual_clip * adv)
        clipped = clipped | capped
        pg = torch.where(adv < 0, torch.minimum(pg, -dual_clip * adv), pg)
    loss = pg
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        d = masked(ref_logp) - logp
        kl = torch.exp(d) - d - 1.0
        loss = loss + kl_coef * kl
    if entropy is not None:
        loss = loss - entropy_coef * masked(entropy)
    loss = torch.where(valid, loss, torch.zeros_like(loss))

    n_tok = valid.sum().to(dt)
    if loss_agg == "token-mean":
        agg = loss.sum() / (denominator if denominator is not None else n_tok.clamp(min=1))
    else:
        per_seq = loss.sum(-1)
        if loss_agg == "seq-mean-token-mean":
            per_seq = per_seq / valid.sum(-1).clamp(min=1)
        elif loss_agg == "seq-mean-token-sum-norm":
            per_seq = per_seq / float(norm_len if norm_len is not None else mask.shape[-1])
        elif loss_agg != "seq-mean-token-sum":
            raise ValueError(f"unknown loss_agg '{loss_agg}', expected one of {LOSS_AGG_MODES}")
        n_seq = (valid.sum(-1) > 0).sum().clamp(min=1).to(dt)
        agg = per_seq.sum() / (denominator if denominator is not None else n_seq)
    return PolicyLoss(
        loss=agg,
        clipped=(clipped & valid).sum().to(dt),
        kl=kl.detach().sum(),
        tokens=n_tok,
    )


def broadcast_advantages(advantages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] or [B, 1] or [B, L] -> [B, L]."""
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    return advantages.expand_as(like)


# --------------------------------------------------------------------------- packed attention


def block_diagonal_mask(cu_seqlens: torch.Tensor, total: int, causal: bool = True) -> torch.Tensor:
    """[total, total] bool, True where query i may attend key j (same sequence, j <= i)."""
    seq_id = torch.repeat_interleave(
        torch.arange(cu_seqlens.numel() - 1, device=cu_seqlens.device),
        (cu_seqlens[1:] - cu_seqlens[:-1]).long(),
        output_size=total,
    )
    mask = seq_id[:, None] == seq_id[None, :]
    if causal:
        pos = torch.arange(total, device=cu_seqlens.device)
        mask &= pos[None, :] <= pos[:, None]
    return mask


def packed_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention over packed sequences with PyTorch SDPA and a block-diagonal mask.

    q [N, Hq, D], k/v [N, Hkv, D] with Hkv | Hq (GQA: q head h reads kv head h // (Hq/Hkv)),
    cu_seqlens [n+1] int32 cumulative lengths with cu_seqlens[-1] = N. Returns [N, Hq, D]:

        o_i = sum_j softmax_j(scale q_i . k_j + mask_ij) v_j,   mask_ij = 0 if i, j in the
        same sequence and (not causal or j <= i), else -inf;   scale = 1/sqrt(D) by default.

    The mask costs N^2 bytes (64 MiB at N = 8192) and SDPA computes all N^2 scores, including
    the off-diagonal blocks it throws away.
    """
    n, hq, _ = q.shape
    group = hq // k.shape[1]
    mask = block_diagonal_mask(cu_seqlens, n, causal)
    qh, kh, vh = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # [1, H, N, D]
    if group > 1:
        kh = kh.repeat_interleave(group, dim=1)
        vh = vh.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
    return out.squeeze(0).transpose(0, 1)
