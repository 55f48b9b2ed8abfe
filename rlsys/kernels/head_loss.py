"""LM head + logprob + entropy + a per-token loss, with the gradient made in the forward.

`fused_logprob_entropy` cannot know dL/dlogprob and dL/dentropy in its forward: they exist
only once the policy loss has run on every token's logprob, so its backward recomputes each
chunk's logits (four [T, V, H] GEMMs: forward, recompute, dh, dW). Liger-Kernel's fused
linear cross-entropy runs three, because cross-entropy is its own final loss. This module
does the same for any loss that is a sum of per-token terms,

    L = sum_t l_t(logprob_t, entropy_t),

where l_t may depend on token t's own logprob and entropy and on constants (advantages, old
and reference logprobs, token weights) but not on other tokens' values. That holds for the
clipped PPO loss, REINFORCE, CISPO, k1/k2/k3 KL, the entropy bonus and every `loss_agg` (whose
normalisers are fixed per mini-batch), not for GSPO (one ratio per sequence). Token chunk by
chunk, in the forward:

    z = h_c W^T / tau                                  [C, V] fp32 (one GEMM)
    logprob_c, entropy_c, lse, E_p[z] from z           (Triton rows on a GPU, torch on CPU)
    g_lp, g_H = d token_loss(c, logprob_c, entropy_c) / d(logprob_c, entropy_c)   (autograd)
    dz = (g_lp (1[v = y] - p) - g_H p (z - E)) / tau   (as `logprob.py`'s backward)
    dh_c = dz W,   dW += dz^T h_c                       (two GEMMs)

and the backward only scales the stored dh and dW by dL_out/dL (the engine's loss scale, or 0
for a padded micro-batch). Memory: one fp32 [C, V] logits tile and its dz, plus dh [T, H] and
dW [V, H] in fp32 held from the forward to the backward (the unfused path makes them in its
backward instead). Numerics as `fused_logprob_entropy` on the same device: GEMM operands in
the autocast / input dtype (bf16 on tensor cores on a GPU, oneDNN's bf16 mode on a CPU) with
fp32 accumulation, dz rounded to the operand dtype on a GPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlsys.kernels.grad_into import grad_buffer
from rlsys.kernels.logprob import (
    AUTO_ON_GPU,
    _check,
    _gemm_precision,
    _spans,
    operand_dtype,
)
from rlsys.kernels.reference import compute_dtype

# token_loss(rows, logprob, entropy) -> scalar: the loss of tokens `rows` (a slice of the T
# tokens) given their logprob [C] and entropy [C] (fp32 leaves that require grad)
TokenLoss = Callable[[slice, torch.Tensor, torch.Tensor], torch.Tensor]

# fp32 logits rows per CPU chunk: 512 rows at V=49152 (two such tiles live). Each chunk reads
# and writes the fp32 dW once: T / rows passes over it.
CPU_CHUNK_BYTES = 128 << 20


def fused_head_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_loss: TokenLoss,
    temperature: float = 1.0,
    backend: str = "auto",
    grad_into: bool = False,
    chunk_bytes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L, logprob [T], entropy [T]): L = sum over token chunks of `token_loss(rows,
    logprob[rows], entropy[rows])` for logits hidden @ weight.T / temperature, differentiable
    w.r.t. hidden and weight; logprob and entropy (float32) carry no gradient.

    `token_loss` must be a sum of per-token terms (module docstring): it is called once per
    chunk, under autograd, with autocast off. backend: "auto" (`AUTO_ON_GPU`'s row kernels on
    CUDA: "hybrid"; torch rows on CPU), "hybrid" (Triton row kernels: CUDA or
    TRITON_INTERPRET=1) or "torch". `grad_into` (a float32 leaf weight): the backward adds
    dL/dweight into `weight.grad` instead of returning it (`rlsys.kernels.grad_into`).
    `chunk_bytes`: the fp32 logits tile (rows x V x 4 bytes; default 1 GiB on CUDA,
    CPU_CHUNK_BYTES elsewhere)."""
    from rlsys.kernels.logprob_hybrid import CHUNK_BYTES, chunk_rows

    _check(hidden, weight, targets, temperature)
    if backend not in ("auto", "hybrid", "torch"):
        raise ValueError(f"unknown backend '{backend}' for the fused loss: auto, hybrid, torch")
    triton_rows = backend == "hybrid" or (
        backend == "auto" and hidden.is_cuda and AUTO_ON_GPU == "hybrid"
    )
    if triton_rows:
        from rlsys.kernels.backend import check_launchable
        from rlsys.kernels.logprob_hybrid import _row_stats_kernel

        check_launchable(_row_stats_kernel, hidden.device)
    if grad_into and not (weight.is_leaf and weight.dtype == compute_dtype(hidden, weight)):
        raise ValueError("grad_into needs a float32 (or float64) leaf weight")
    if chunk_bytes is None:
        chunk_bytes = CHUNK_BYTES if hidden.is_cuda else CPU_CHUNK_BYTES
    rows = chunk_rows(hidden.shape[0], weight.shape[0], chunk_bytes)
    lowp = operand_dtype(hidden, weight)
    return _HeadLoss.apply(
        hidden, weight, targets, temperature, token_loss, rows, triton_rows, lowp, grad_into
    )


class _HeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, token_loss, rows, triton_rows, lowp,
                grad_into):  # fmt: skip
        with torch.autocast(hidden.device.type, enabled=False):
            out = _forward(
                hidden.detach(), weight.detach(), targets, temperature, token_loss, rows,
                triton_rows, lowp, ctx.needs_input_grad[:2],
            )  # fmt: skip
        loss, lp, ent, dh, dw = out
        ctx.mark_non_differentiable(lp, ent)
        ctx.grads = (dh, dw)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        ctx.grad_into = weight if grad_into else None
        return loss, lp, ent

    @staticmethod
    def backward(ctx, g_loss, _g_lp, _g_ent):
        dh, dw = ctx.grads  # used once: scaled in place
        ctx.grads = None
        if dh is not None:
            dh = dh.mul_(g_loss).to(ctx.dtypes[0])
        if dw is not None:
            if ctx.grad_into is not None:
                grad_buffer(ctx.grad_into).add_(dw.mul_(g_loss))
                dw = None
            else:
                dw = dw.mul_(g_loss).to(ctx.dtypes[1])
        return dh, dw, None, None, None, None, None, None, None


def _forward(h, w, y, temperature, token_loss, rows, triton_rows, lowp, need):
    """The chunk loop (module docstring): (L, logprob, entropy, dh or None, dW or None)."""
    dt = compute_dtype(h, w)
    t_len, hid = h.shape
    v_len = w.shape[0]
    dev = h.device
    inv_tau = 1.0 / temperature
    on_gpu = h.is_cuda
    if on_gpu or triton_rows:  # GEMM operands in the low-precision dtype, fp32 products
        if lowp is not None:
            h, w = h.to(lowp), w.to(lowp)
        elif h.dtype != w.dtype:
            h, w = h.to(dt), w.to(dt)
        dz_dtype = h.dtype
    else:  # CPU: fp32 operands; `_gemm_precision` rounds them inside oneDNN's bf16 mode
        h, w = h.to(dt), w.to(dt)
        dz_dtype = dt
    y = y.long().contiguous()
    lp, ent, lse, ez = (torch.empty(t_len, dtype=dt, device=dev) for _ in range(4))
    dh = torch.empty(t_len, hid, dtype=dt, device=dev) if need[0] else None
    dw = torch.zeros(v_len, hid, dtype=dt, device=dev) if need[1] else None
    z_buf = torch.empty(min(rows, t_len) * v_len, dtype=dt, device=dev)
    if triton_rows:  # dz in the operand dtype (fp32 operands: in place in z)
        dz_buf = z_buf if dz_dtype == dt else torch.empty_like(z_buf, dtype=dz_dtype)
    else:  # torch rows: dz in place in z, a second tile for exp()
        e_buf = torch.empty_like(z_buf)
    loss = torch.zeros((), dtype=dt, device=dev)
    with _gemm_precision(None if on_gpu else lowp, dev):
        for t0, t1 in _spans(t_len, rows):
            n = t1 - t0
            z = _mm(h[t0:t1], w.T, z_buf[: n * v_len].view(n, v_len))
            rows_c = slice(t0, t1)
            if triton_rows:
                _triton_stats(z, y, lp, ent, lse, ez, t0, inv_tau)
            else:
                e = e_buf[: n * v_len].view(n, v_len)
                _torch_stats(z, e, y[rows_c], lp[rows_c], ent[rows_c], lse[rows_c], ez[rows_c],
                             inv_tau)  # fmt: skip
            g_lp, g_ent, loss_c = _token_grads(token_loss, rows_c, lp[rows_c], ent[rows_c])
            loss += loss_c
            if not (need[0] or need[1]):
                continue
            if triton_rows:
                dz = dz_buf[: n * v_len].view(n, v_len)
                _triton_dz(z, dz, y[rows_c], lse[rows_c], ez[rows_c], g_lp, g_ent, inv_tau)
            else:
                dz = _torch_dz(z, e, y[rows_c], lse[rows_c], ez[rows_c], g_lp, g_ent, inv_tau)
            if need[0]:
                _mm(dz, w, dh[t0:t1])
            if need[1]:
                _addmm(dw, dz.T, h[t0:t1])
    return loss, lp.float(), ent.float(), dh, dw


def _token_grads(token_loss: TokenLoss, rows: slice, lp: torch.Tensor, ent: torch.Tensor):
    """(dL_c/dlogprob, dL_c/dentropy, L_c) of one chunk, by autograd on [C] leaves."""
    with torch.enable_grad():
        lp_c = lp.detach().float().requires_grad_()
        ent_c = ent.detach().float().requires_grad_()
        loss_c = token_loss(rows, lp_c, ent_c)
        if loss_c.dim() != 0:
            raise ValueError(f"token_loss must return a scalar, got shape {tuple(loss_c.shape)}")
        g_lp, g_ent = (
            torch.autograd.grad(loss_c, (lp_c, ent_c), allow_unused=True)
            if loss_c.requires_grad
            else (None, None)
        )
    g_lp = torch.zeros_like(lp) if g_lp is None else g_lp.to(lp.dtype).contiguous()
    g_ent = torch.zeros_like(ent) if g_ent is None else g_ent.to(ent.dtype).contiguous()
    return g_lp, g_ent, loss_c.detach().to(lp.dtype)


def _mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = a @ b with fp32 (or fp64) accumulation and output."""
    from rlsys.kernels.logprob_hybrid import _mm_f32

    if a.dtype == out.dtype:
        return torch.mm(a, b, out=out)
    return _mm_f32(a, b, out=out)


def _addmm(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    from rlsys.kernels.logprob_hybrid import _addmm_f32

    if a.dtype == c.dtype:
        c.addmm_(a, b)
    else:
        _addmm_f32(c, a, b)


def _torch_stats(z, e, y, lp, ent, lse, ez, inv_tau) -> None:
    """Row statistics of raw logits z [C, V], in place: z becomes z / tau - m (m its row
    max) and `e` a scratch tile; `lse` and `ez` get log-sum-exp and E_p[z] in those shifted
    units (what `_torch_dz` reads)."""
    z.mul_(inv_tau)
    m = z.amax(1)
    z.sub_(m[:, None])
    torch.exp(z, out=e)
    s = e.sum(1)
    u = e.mul_(z).sum(1)  # sum_v e_v (z_v - m)
    log_s = torch.log(s)
    lse.copy_(log_s)
    ez.copy_(u / s)
    ent.copy_(log_s - u / s)
    lp.copy_(z.gather(1, y[:, None]).squeeze(1) - log_s)


def _torch_dz(z, e, y, lse, ez, g_lp, g_ent, inv_tau) -> torch.Tensor:
    """dz = (g_lp (1[v = y] - p) - g_H p (z - E)) / tau, in z's buffer (z, lse and ez in
    `_torch_stats`'s shifted units); `e` is scratch."""
    p = torch.sub(z, lse[:, None], out=e).exp_()
    dz = z.sub_(ez[:, None]).mul_(g_ent[:, None]).add_(g_lp[:, None]).mul_(p).neg_()
    dz.scatter_add_(1, y[:, None], g_lp[:, None])
    return dz.mul_(inv_tau)


def _triton_stats(z, y, lp, ent, lse, ez, t0, inv_tau) -> None:
    from rlsys.kernels.logprob_hybrid import NUM_WARPS, ROW_BLOCK, _row_stats_kernel

    _row_stats_kernel[(z.shape[0],)](
        z, y, lp, ent, lse, ez, z.shape[1], z.stride(0), t0, inv_tau,
        BLOCK_V=ROW_BLOCK, num_warps=NUM_WARPS,
    )  # fmt: skip


def _triton_dz(z, dz, y, lse, ez, g_lp, g_ent, inv_tau) -> None:
    import triton

    from rlsys.kernels.logprob_hybrid import GRAD_BLOCK, NUM_WARPS, _row_grad_kernel

    n, v_len = z.shape
    _row_grad_kernel[(n, triton.cdiv(v_len, GRAD_BLOCK))](
        z, dz, y, lse, ez, g_lp, g_ent, v_len, z.stride(0), dz.stride(0), 0, inv_tau,
        BLOCK_V=GRAD_BLOCK, num_warps=NUM_WARPS,
    )  # fmt: skip
