"""Fused LM head + log-softmax gather + entropy, without materialising the [T, V] logits.

For hidden states h [T, H], LM-head weight W [V, H], targets y [T] and temperature tau:

    z_t  = W h_t / tau                              (never stored whole)
    lse_t = log sum_v exp z_tv                      (online over vocabulary chunks)
    lp_t = z_t[y_t] - lse_t
    H_t  = lse_t - E_p[z_t] = log s_t - u_t / s_t,  s = sum e^{z - m}, u = sum e^{z - m}(z - m)

The online update for a new chunk with running max m -> m' (alpha = e^{m - m'}):

    s' = alpha s + sum e^{z - m'},   u' = alpha (u + (m - m') s) + sum e^{z - m'} (z - m')

Backward, with incoming g_lp, g_H and p = softmax(z_t), E_t = E_p[z_t] = lse_t - H_t:

    dL/dz_tv = g_lp (1[v = y_t] - p_v) - g_H p_v (z_tv - E_t)
    dL/dh_t  = (1/tau) sum_v dz_tv W_v,     dL/dW_v = (1/tau) sum_t dz_tv h_t

The backward recomputes z chunk by chunk from (h, W, lse, E), so the saved state is O(T).

Backends: Triton (`logprob_triton.py`, CUDA or TRITON_INTERPRET=1), hybrid (cuBLAS GEMMs and
Triton row kernels, `logprob_hybrid.py`) and a chunked torch path here (CPU). All accumulate
in float32 whatever the input dtype (bf16 allowed); gradients come back in the inputs' dtypes.

GEMM operands follow autocast: under bf16 autocast (the trainer's default) the operands of
every tile GEMM (h, W, and dz in the backward) are rounded to bf16, as autocast does for the
naive path's `lm_head` linear, but products are accumulated and the logits kept in fp32 (the
naive path also rounds its logits to bf16). On CPU that is oneDNN's bf16 math mode for fp32
matmuls where the CPU has bf16 matmuls (AMX here: 2-5x the fp32 GEMM rate; torch keeps tiny
GEMMs in fp32), on GPU Triton's bf16 tensor-core dot. bf16 inputs take the same GEMMs outside
autocast (rounding them is a no-op).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from rlsys.kernels.backend import BACKENDS, resolve
from rlsys.kernels.grad_into import grad_buffer
from rlsys.kernels.reference import compute_dtype

NEG = -1.0e30  # running-max start: finite, so (m - m') * s and e^{m - m'} never make NaN

# Tile [CHUNK_T, CHUNK_V] fp32 = 32 MiB; the backward holds 2 tiles plus a [CHUNK_V, H] fp32
# gradient chunk. fwd+bwd at T=2048, H=576, V=49152 fp32 on the shared 2-core Xeon (load
# average 4-8, so +-15%): 256 x 2048 32.8 s, 512 x 4096 11.5 s, 512 x 16384 11.7 s,
# 1024 x 8192 9.9 s, 2048 x 4096 9.6 s. Small tiles lose to per-call overhead; past 1024 x
# 8192 the gain is within noise while memory grows.
CHUNK_T = 1024
CHUNK_V = 8192
# What backend="auto" runs on a GPU: the hybrid path (cuBLAS GEMMs + Triton row kernels), not
# the all-Triton kernels, whose backward adds dW with T/BLOCK_T x V x H fp32 atomics (14.5 GB
# of read-modify-write at T=8192, H=576, V=49152; 320 GB at H=4096, V=151936) where the
# hybrid path does the GEMMs on cuBLAS with no atomics. Measured on an H200 (2026-12-04,
# `benchmarks/kernels.py --gpu`, forward + backward, bf16, T=8192): hybrid 4.4 / 69 ms, Triton
# 20.7 / 573 ms at H=576, V=49152 / H=4096, V=151936.
AUTO_ON_GPU = "hybrid"


def fused_logprob_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    backend: str = "auto",
    grad_into: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of `targets` and entropy under softmax(hidden @ weight.T / temperature).

    hidden [T, H] float32/bfloat16, weight [V, H], targets [T] int -> (logprob [T] float32,
    entropy [T] float32), both differentiable w.r.t. hidden and weight. backend: "auto"
    (`AUTO_ON_GPU` on CUDA, chunked torch on CPU), "triton" (`logprob_triton.py`), "hybrid"
    (cuBLAS GEMMs + Triton row kernels, `logprob_hybrid.py`; both CUDA or the interpreter) or
    "torch". Under autocast the GEMM operands are rounded to its dtype (module docstring).
    `grad_into` (a float32 leaf weight): the backward adds dL/dweight into `weight.grad`
    where it computes it, instead of returning it through autograd (`rlsys.kernels.grad_into`).
    """
    _check(hidden, weight, targets, temperature)
    lowp = operand_dtype(hidden, weight)
    if backend not in (*BACKENDS, "hybrid"):
        raise ValueError(
            f"unknown backend '{backend}', expected one of auto, triton, hybrid, torch"
        )
    # hybrid needs what triton needs (CUDA or the interpreter): `resolve` checks both alike
    kind = resolve("triton" if backend == "hybrid" else backend, hidden.device)
    if kind == "triton" and backend != "triton":
        kind = AUTO_ON_GPU if backend == "auto" else "hybrid"
    if kind in ("triton", "hybrid"):
        from rlsys.kernels.logprob_hybrid import hybrid_logprob_entropy
        from rlsys.kernels.logprob_triton import triton_logprob_entropy

        param = weight if grad_into else None
        if lowp is not None:  # differentiable casts: gradients come back in fp32
            hidden, weight = hidden.to(lowp), weight.to(lowp)
        fn = triton_logprob_entropy if kind == "triton" else hybrid_logprob_entropy
        return fn(hidden, weight, targets, temperature, grad_into=param)
    return chunked_logprob_entropy(
        hidden, weight, targets, temperature, lowp=lowp, grad_into=grad_into
    )


def operand_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    """The dtype the GEMM operands are rounded to: autocast's (bf16/fp16) when it is on for
    this device, bf16 when both inputs are bf16, else None (fp32 / fp64 GEMMs)."""
    if torch.float64 in (hidden.dtype, weight.dtype):
        return None
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    if hidden.dtype == weight.dtype == torch.bfloat16:
        return torch.bfloat16
    return None


def chunked_logprob_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    chunk_t: int = CHUNK_T,
    chunk_v: int = CHUNK_V,
    lowp: torch.dtype | None = None,
    grad_into: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch path: peak extra memory O(chunk_t x chunk_v + chunk_v x H + T x H).
    `lowp` (from `operand_dtype`): bf16 lets the tile GEMMs round their operands to bf16 and
    accumulate in fp32 where the CPU has bf16 matmuls (`_gemm_precision`); otherwise fp32 GEMMs.
    `grad_into`: dL/dweight goes into `weight.grad` (`grad_buffer`), not back to autograd."""
    if grad_into and (weight.dtype != compute_dtype(hidden, weight) or not weight.is_leaf):
        raise ValueError("grad_into needs a float32 (or float64) leaf weight")
    return _ChunkedLogprobEntropy.apply(
        hidden, weight, targets, temperature, chunk_t, chunk_v, lowp, grad_into
    )


def _check(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, tau: float) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"expected hidden [T, H] and weight [V, H], got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets {tuple(targets.shape)} must be [T] = [{hidden.shape[0]}]")
    if not tau > 0:
        raise ValueError(f"temperature must be > 0, got {tau}")


def _spans(n: int, chunk: int) -> list[tuple[int, int]]:
    return [(i, min(i + chunk, n)) for i in range(0, n, chunk)]


def _target_cols(targets: torch.Tensor, v0: int, v1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows whose target lies in [v0, v1) and its column inside the chunk."""
    inside = (targets >= v0) & (targets < v1)
    return inside, (targets - v0).clamp(0, v1 - v0 - 1)


@contextlib.contextmanager
def _gemm_precision(lowp: torch.dtype | None, device: torch.device) -> Iterator[None]:
    """The tile GEMMs' precision: with `lowp` = bf16 on a CPU with oneDNN bf16 matmuls
    (AVX512-BF16 / AMX), the fp32 GEMMs run in oneDNN's bf16 math mode: operands rounded to
    bf16 inside the GEMM, fp32 accumulation and output; no copy of h or W is made. torch
    routes all but tiny GEMMs to oneDNN (a few tokens x a vocabulary chunk still go; a
    handful of tokens against a 64-column test chunk may not), and those it does not stay
    fp32: at least as accurate. Anywhere else (no `lowp`, fp16, GPU tensors, an older CPU)
    the GEMMs are fp32. Where oneDNN reports bf16 support but does not implement the mode for
    fp32 GEMMs (AVX512-BF16 without AMX: measured on an AMD EPYC), they stay fp32 too."""
    onednn = (
        lowp == torch.bfloat16
        and device.type == "cpu"
        and torch.backends.mkldnn.is_available()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )
    if not onednn:
        yield
        return
    saved = torch.backends.mkldnn.matmul.fp32_precision
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = saved


def _tile(buf: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A contiguous [rows, cols] view at the start of a flat buffer (reused across tiles: a
    fresh 32 MiB tile costs its page faults every time, ~as much as its bf16 GEMM)."""
    return buf[: rows * cols].view(rows, cols)


class _ChunkedLogprobEntropy(torch.autograd.Function):
    """Vocabulary chunks outside (each weight chunk is cast to fp32 once), token chunks inside;
    the backward recomputes each logits tile instead of saving it."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_t, chunk_v, lowp, grad_into):
        # autocast would recast the tiles' GEMMs to bf16 outputs: `_gemm_precision` does it instead
        ctx.grad_into = grad_into
        with torch.autocast(hidden.device.type, enabled=False):
            return _ChunkedLogprobEntropy._forward(
                ctx, hidden, weight, targets, temperature, chunk_t, chunk_v, lowp
            )

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        with torch.autocast(ctx.device_type, enabled=False):
            return (*_ChunkedLogprobEntropy._backward(ctx, g_lp, g_ent), None, None)

    @staticmethod
    def _forward(ctx, hidden, weight, targets, temperature, chunk_t, chunk_v, lowp):
        dt = compute_dtype(hidden, weight)
        t_len, v_len = hidden.shape[0], weight.shape[0]
        inv_tau = 1.0 / temperature
        h = hidden.detach().to(dt)  # [T, H]; a copy only for bf16 inputs
        y = targets.long()
        m = torch.full((t_len,), NEG, dtype=dt, device=h.device)
        s = torch.zeros_like(m)
        u = torch.zeros_like(m)
        zy = torch.zeros_like(m)
        size = min(chunk_t, t_len) * min(chunk_v, v_len)
        z_buf, e_buf = (torch.empty(size, dtype=dt, device=h.device) for _ in range(2))
        with _gemm_precision(lowp, h.device):
            for v0, v1 in _spans(v_len, chunk_v):
                w = weight.detach()[v0:v1].to(dt)  # [Cv, H]
                for t0, t1 in _spans(t_len, chunk_t):
                    z = torch.mm(h[t0:t1], w.T, out=_tile(z_buf, t1 - t0, v1 - v0))
                    z.mul_(inv_tau)  # [Ct, Cv]
                    inside, col = _target_cols(y[t0:t1], v0, v1)
                    zy[t0:t1] += torch.where(inside, z.gather(1, col[:, None]).squeeze(1), 0.0)
                    m_old = m[t0:t1]
                    m_new = torch.maximum(m_old, z.amax(1))
                    alpha = torch.exp(m_old - m_new)
                    z.sub_(m_new[:, None])  # z - m'
                    e = torch.exp(z, out=_tile(e_buf, t1 - t0, v1 - v0))
                    s_add = e.sum(1)
                    u_add = e.mul_(z).sum(1)
                    u[t0:t1] = alpha * (u[t0:t1] + (m_old - m_new) * s[t0:t1]) + u_add
                    s[t0:t1] = alpha * s[t0:t1] + s_add
                    m[t0:t1] = m_new
        log_s = torch.log(s)
        lse = m + log_s
        entropy = log_s - u / s
        logprob = zy - lse
        ctx.save_for_backward(hidden, weight, targets, lse, lse - entropy)
        ctx.inv_tau, ctx.chunk_t, ctx.chunk_v, ctx.lowp = inv_tau, chunk_t, chunk_v, lowp
        ctx.device_type = hidden.device.type
        return logprob, entropy

    @staticmethod
    def _backward(ctx, g_lp, g_ent):
        hidden, weight, targets, lse, ez = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        if not (need_h or need_w):
            return None, None, None, None, None, None
        dt = lse.dtype
        g_lp = torch.zeros_like(lse) if g_lp is None else g_lp.to(dt)
        g_ent = torch.zeros_like(lse) if g_ent is None else g_ent.to(dt)
        inv_tau, t_len, v_len = ctx.inv_tau, hidden.shape[0], weight.shape[0]
        h = hidden.to(dt)
        y = targets.long()
        dh = torch.zeros_like(h) if need_h else None  # fp32 accumulator over vocab chunks
        # fp32 weights: each chunk's gradient accumulates in place in dw's rows
        in_place = weight.dtype == dt
        dw = None
        if need_w and ctx.grad_into:  # fp32 leaf (checked): chunks add into weight.grad
            dw = grad_buffer(weight)
        elif need_w:
            dw = torch.zeros_like(weight) if in_place else torch.empty_like(weight)
        size = min(ctx.chunk_t, t_len) * min(ctx.chunk_v, v_len)
        z_buf, p_buf = (torch.empty(size, dtype=dt, device=h.device) for _ in range(2))
        with _gemm_precision(ctx.lowp, h.device):
            for v0, v1 in _spans(v_len, ctx.chunk_v):
                w = weight[v0:v1].to(dt)
                dw_c = None
                if need_w:
                    dw_c = dw[v0:v1] if in_place else torch.zeros_like(w)
                for t0, t1 in _spans(t_len, ctx.chunk_t):
                    z = torch.mm(h[t0:t1], w.T, out=_tile(z_buf, t1 - t0, v1 - v0))
                    z.mul_(inv_tau)
                    p = torch.sub(z, lse[t0:t1, None], out=_tile(p_buf, t1 - t0, v1 - v0))
                    p.exp_()
                    # dz = -p (g_lp + g_H (z - E)), built in z's buffer to keep two tiles live
                    dz = z.sub_(ez[t0:t1, None]).mul_(g_ent[t0:t1, None])
                    dz = dz.add_(g_lp[t0:t1, None]).mul_(p).neg_()
                    inside, col = _target_cols(y[t0:t1], v0, v1)
                    g_y = torch.where(inside, g_lp[t0:t1], 0.0)[:, None]
                    dz.scatter_add_(1, col[:, None], g_y)
                    dz.mul_(inv_tau)
                    if need_h:
                        dh[t0:t1].addmm_(dz, w)
                    if need_w:
                        dw_c.addmm_(dz.T, h[t0:t1])
                if need_w and not in_place:
                    dw[v0:v1] = dw_c
        if ctx.grad_into:
            dw = None  # already in weight.grad
        return (dh.to(hidden.dtype) if need_h else None), dw, None, None, None, None
