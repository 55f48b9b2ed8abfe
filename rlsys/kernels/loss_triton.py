"""Triton backend of `fused_policy_loss` (math in `loss.py`).

One elementwise pass over the B*L tokens: each program of BLOCK tokens writes w * dl/dlogp
for its tokens and three partial sums (weighted loss, clipped count, k3 sum); torch adds the
[num_blocks, 3] partials, so the result does not depend on scheduling (no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlsys.kernels.backend import check_launchable
from rlsys.kernels.loss import StoredGradientLoss
from rlsys.kernels.reference import LOG_RATIO_CLAMP

BLOCK = 1024  # elementwise: 1024 tokens x 7 fp32 streams per program; untuned (no GPU yet)


@triton.jit
def _policy_loss_kernel(LOGP, OLD, ADV, REF, ENT, MASK, W, DLOGP, PART, N,
                        clip_low, clip_high, dual_c, kl_coef, ent_coef, log_ratio_clamp,
                        HAS_REF: tl.constexpr, HAS_ENT: tl.constexpr, DUAL: tl.constexpr,
                        BLOCK: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inb = offs < N
    valid = tl.load(MASK + offs, mask=inb, other=0.0) > 0.0
    # masked tokens read as 0 (never loaded): padding with inf/NaN logprobs cannot leak in
    w = tl.load(W + offs, mask=valid, other=0.0)
    lp = tl.load(LOGP + offs, mask=valid, other=0.0).to(tl.float32)
    old = tl.load(OLD + offs, mask=valid, other=0.0).to(tl.float32)
    a = tl.load(ADV + offs, mask=valid, other=0.0).to(tl.float32)
    d = lp - old
    ratio = tl.exp(tl.minimum(tl.maximum(d, -log_ratio_clamp), log_ratio_clamp))
    pg1 = -a * ratio
    pg2 = -a * tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
    pg = tl.maximum(pg1, pg2)
    dpg = tl.where(pg1 >= pg2, -a, 0.0)  # d pg / d ratio; ties sit inside the clip range
    clipped = (pg2 > pg1) & valid
    if DUAL:
        capped = (a < 0.0) & (pg > -dual_c * a)
        pg = tl.where(capped, -dual_c * a, pg)
        dpg = tl.where(capped, 0.0, dpg)
        clipped = clipped | (capped & valid)
    dlp = tl.where(tl.abs(d) <= log_ratio_clamp, dpg * ratio, 0.0)
    k3 = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_REF:
        dr = tl.load(REF + offs, mask=valid, other=0.0).to(tl.float32) - lp
        er = tl.exp(dr)
        k3 = er - dr - 1.0
        pg += kl_coef * k3
        dlp += kl_coef * (1.0 - er)
    if HAS_ENT:
        pg -= ent_coef * tl.load(ENT + offs, mask=valid, other=0.0).to(tl.float32)
    tl.store(DLOGP + offs, tl.where(valid, w * dlp, 0.0), mask=inb)
    tl.store(PART + pid * 3, tl.sum(tl.where(valid, w * pg, 0.0), axis=0))
    tl.store(PART + pid * 3 + 1, tl.sum(clipped.to(tl.float32), axis=0))
    tl.store(PART + pid * 3 + 2, tl.sum(tl.where(valid, k3, 0.0), axis=0))


class TritonPolicyLoss(StoredGradientLoss):
    """Launcher + autograd: forward runs the kernel; the backward (shared) scales its gradient."""

    @staticmethod
    def forward(ctx, logp, entropy, old_logp, adv, ref_logp, mask, w, consts):
        check_launchable(_policy_loss_kernel, logp.device)
        clip_low, clip_high, dual_clip, kl_coef, entropy_coef = consts
        flat = [x.detach().reshape(-1).contiguous() for x in (logp, old_logp, adv)]
        n = flat[0].numel()
        ref = flat[0] if ref_logp is None else ref_logp.detach().reshape(-1).contiguous()
        ent = flat[0] if entropy is None else entropy.detach().reshape(-1).contiguous()
        m = mask.reshape(-1).to(torch.float32).contiguous()
        wf = w.reshape(-1).to(torch.float32).contiguous()
        dlogp = torch.empty(n, dtype=torch.float32, device=logp.device)
        grid = triton.cdiv(n, BLOCK)
        part = torch.empty(grid, 3, dtype=torch.float32, device=logp.device)
        _policy_loss_kernel[(grid,)](
            flat[0], flat[1], flat[2], ref, ent, m, wf, dlogp, part, n,
            clip_low, clip_high, 1.0 if dual_clip is None else dual_clip, kl_coef,
            entropy_coef, LOG_RATIO_CLAMP, HAS_REF=ref_logp is not None,
            HAS_ENT=entropy is not None, DUAL=dual_clip is not None, BLOCK=BLOCK,
        )  # fmt: skip
        StoredGradientLoss.stash(ctx, dlogp.view_as(logp), w, consts, logp, entropy)
        loss, clipped, kl = (x.clone() for x in part.sum(0).to(w.dtype).unbind())
        ctx.mark_non_differentiable(clipped, kl)
        return loss, clipped, kl
