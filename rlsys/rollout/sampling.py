"""Batched token sampling with per-row temperature / top-k / top-p / greedy and per-row seeds.

Every row draws its uniform number from its own `torch.Generator` (one per sample), and the
token is picked by inverse-CDF over that row's (filtered) distribution. So a row's token
depends only on its own logits and its own generator, never on the other rows of the batch.

The returned logprob is `log_softmax(logits / T)[token]` of the raw logits (no top-k/top-p
renormalisation): the quantity the trainer recomputes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Nucleus candidates: top-p rows first try the 1024 most likely tokens and fall back to a full
# sort only when those hold less than top_p of the mass. torch.topk(k=1024) over [64, 49152]
# fp32 is several times cheaper than torch.sort over the same rows on this CPU, and for a
# trained LM the top 1024 tokens almost always hold > 0.99 of the mass.
NUCLEUS_CANDIDATES = 1024


@dataclass
class RowParams:
    """Per-row sampling settings for a batch of B rows (rebuilt when the batch changes)."""

    temperature: torch.Tensor  # [B] float32, the logprob temperature (>0)
    greedy: torch.Tensor  # [B] bool
    top_k: list[int]  # 0 = off
    top_p: torch.Tensor  # [B] float32, 1 = off
    plain: list[int]  # rows that sample from the full tempered distribution
    filtered: list[int]  # rows that sample with top-k or top-p
    size: int

    @classmethod
    def build(
        cls,
        temperature: list[float],
        greedy: list[bool],
        top_k: list[int],
        top_p: list[float],
        device: torch.device,
    ) -> RowParams:
        top_k = [max(k, 0) for k in top_k]
        filtered = [
            i
            for i, (g, k, p) in enumerate(zip(greedy, top_k, top_p, strict=True))
            if not g and (k or p < 1)
        ]
        skip = set(filtered)
        plain = [i for i, g in enumerate(greedy) if not g and i not in skip]
        return cls(
            temperature=torch.tensor(temperature, dtype=torch.float32, device=device),
            greedy=torch.tensor(greedy, dtype=torch.bool, device=device),
            top_k=top_k,
            top_p=torch.tensor(top_p, dtype=torch.float32, device=device),
            plain=plain,
            filtered=filtered,
            size=len(greedy),
        )


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index i with cdf[i-1] <= u * total < cdf[i], per row; weights [R, K] >= 0, u [R]."""
    cdf = weights.cumsum(dim=-1)
    target = (u * cdf[:, -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return idx.clamp_(max=weights.shape[-1] - 1)


def sample(
    logits: torch.Tensor, rp: RowParams, u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row. logits [B, V] fp32 (raw), u [B] uniforms in [0, 1).
    Returns (tokens [B] int64, logprobs [B] fp32)."""
    scaled = logits / rp.temperature[:, None]
    lse = torch.logsumexp(scaled, dim=-1)  # [B]
    # Greedy rows keep the argmax; sampled rows overwrite theirs below.
    tokens = logits.argmax(dim=-1)
    if rp.plain or rp.filtered:
        probs = torch.exp(scaled - lse[:, None])  # [B, V], the tempered distribution
        if len(rp.plain) == rp.size:
            tokens = _inverse_cdf(probs, u)
        elif rp.plain:
            rows = torch.tensor(rp.plain, device=logits.device)
            tokens[rows] = _inverse_cdf(probs[rows], u[rows])
        if rp.filtered:
            rows = torch.tensor(rp.filtered, device=logits.device)
            tokens[rows] = _sample_filtered(
                probs[rows], [rp.top_k[i] for i in rp.filtered], rp.top_p[rows], u[rows]
            )
    logprobs = scaled.gather(1, tokens[:, None]).squeeze(1) - lse
    return tokens, logprobs


def _sample_filtered(
    probs: torch.Tensor, top_k: list[int], top_p: torch.Tensor, u: torch.Tensor
) -> torch.Tensor:
    """Top-k then top-p (nucleus: keep the most likely tokens while the mass before them is
    < top_p; the most likely token always stays), then inverse-CDF over what is kept."""
    vocab = probs.shape[-1]
    k_cap = min(vocab, max(k if k else NUCLEUS_CANDIDATES for k in top_k))
    vals, idx = torch.topk(probs, k_cap, dim=-1)  # sorted descending
    short = (vals.sum(-1) < top_p) & torch.tensor([k == 0 for k in top_k], device=probs.device)
    if bool(short.any()):  # nucleus wider than the candidates: sort those rows fully
        full_vals, full_idx = torch.sort(probs[short], dim=-1, descending=True)
        out = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
        out[short] = _pick(full_vals, full_idx, None, top_p[short], u[short])
        keep = ~short
        if bool(keep.any()):
            ks = [k for k, s in zip(top_k, short.tolist(), strict=True) if not s]
            out[keep] = _pick(vals[keep], idx[keep], ks, top_p[keep], u[keep])
        return out
    return _pick(vals, idx, top_k, top_p, u)


def _pick(vals, idx, top_k: list[int] | None, top_p, u) -> torch.Tensor:
    rank = torch.arange(vals.shape[-1], device=vals.device)
    keep = (vals.cumsum(-1) - vals) < top_p[:, None]
    if top_k is not None:
        k = torch.tensor([k if k else vals.shape[-1] for k in top_k], device=vals.device)
        keep &= rank[None, :] < k[:, None]
    choice = _inverse_cdf(vals * keep, u)
    return idx.gather(1, choice[:, None]).squeeze(1)
