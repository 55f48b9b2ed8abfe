"""Hybrid backend of `fused_logprob_entropy` (math in `logprob.py`): cuBLAS GEMMs, Triton rows.

The Triton backend (`logprob_triton.py`) does every GEMM in Triton tiles and adds dh and dW
with fp32 atomics: T/BLOCK_T x V x H atomic adds for dW alone (3.6e9 at T=8192, H=576,
V=49152). This backend is Liger-Kernel's fused linear cross-entropy, with the entropy and
without needing the upstream gradient in the forward. The forward goes over chunks of C
tokens, each with its whole vocabulary row; the backward, which has each row's lse and E_p[z]
from the forward, goes over chunks of N vocabulary columns, each with every token:

    forward, per C rows:      z = h_c W^T / tau                [C, V] fp32 (cuBLAS)
                              one Triton program per row: m, s, u, z_y online over the row
                              -> logprob, entropy, and lse, E_p[z] saved for the backward
    backward, per N columns:  z = h W_n^T / tau                [T, N] fp32, recomputed
                              dz = (g_lp (1[v = y] - p) - g_H p (z - E)) / tau   (Triton)
                              dW_n = dz^T h   (written once),  dh += dz W_n      (cuBLAS)

The backward's split is by columns because dW is the large gradient: [V, H] fp32 is 2.5 GB
at V=151936, H=4096, and splitting by tokens would read and write all of it once per chunk;
by columns each block of dW is written once and only dh [T, H] is accumulated.

The four GEMMs of the Triton path (forward, recompute, dh, dW), no atomics; each logits tile
is written by cuBLAS and read once by a row kernel (forward) or read and written once as dz
(backward). Memory: one fp32 logits tile of at most CHUNK_BYTES and one dz tile in the operand
dtype: C is the largest power of two (>= 16) with C x V x 4 <= CHUNK_BYTES, N the largest
multiple of COL_ALIGN with T x N x 4 <= CHUNK_BYTES (at least COL_ALIGN).

Numerics as the Triton path: GEMM operands in the inputs' dtype (bf16 on the tensor cores),
fp32 accumulation and fp32 logits (`torch.mm(..., out_dtype=torch.float32)`), dz rounded to
the operand dtype before the gradient GEMMs, dh and dW accumulated in fp32 (dh across column
chunks in place; dW added into `weight.grad` with grad_into). Off the GPU (tests,
TRITON_INTERPRET=1) the GEMMs take their operands to fp32, which gives the same products
exactly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlsys.kernels.backend import check_launchable
from rlsys.kernels.grad_into import grad_buffer
from rlsys.kernels.logprob import _spans

CHUNK_BYTES = 1 << 30  # fp32 logits tile: 1024 rows at V=151936, 4096 at V=49152 (capped at T)
COL_ALIGN = 128  # the backward's vocabulary chunks are multiples of this (32768 at T=8192)
ROW_BLOCK = 2048  # vocabulary entries per step of a row program
GRAD_BLOCK = 1024  # vocabulary entries per program of the gradient kernel
NUM_WARPS = 8


@triton.jit
def _row_stats_kernel(Z, Y, LP, ENT, LSE, EZ, V, stride_z, row0, inv_tau,
                      BLOCK_V: tl.constexpr):  # fmt: skip
    """Row r of the tile: online (m, s, u, z_y) over its V logits (see logprob.py)."""
    r = tl.program_id(0)
    z_row = Z + r.to(tl.int64) * stride_z
    y = tl.load(Y + row0 + r)
    # -1e30, not -inf: (m - m') * s and e^{m - m'} stay finite (as the other kernels)
    m = -1.0e30
    s = 0.0
    u = 0.0
    zy = 0.0
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        mask = offs < V
        z = tl.load(z_row + offs, mask=mask, other=0.0) * inv_tau
        zy += tl.sum(tl.where(offs == y, z, 0.0))
        z = tl.where(mask, z, -1.0e30)
        m_new = tl.maximum(m, tl.max(z))
        alpha = tl.exp(m - m_new)
        zc = z - m_new
        e = tl.exp(zc)
        u = alpha * (u + (m - m_new) * s) + tl.sum(e * zc)
        s = alpha * s + tl.sum(e)
        m = m_new
    log_s = tl.log(s)
    lse = m + log_s
    ent = log_s - u / s
    tl.store(LP + row0 + r, zy - lse)
    tl.store(ENT + row0 + r, ent)
    tl.store(LSE + row0 + r, lse)
    tl.store(EZ + row0 + r, lse - ent)


@triton.jit
def _row_grad_kernel(Z, DZ, Y, LSE, EZ, GLP, GENT, N, stride_z, stride_dz, col0, inv_tau,
                     BLOCK_V: tl.constexpr):  # fmt: skip
    """dz of token program_id(0) over columns col0 + [0, N) of the vocabulary (a [T, N] tile),
    block program_id(1) of them; DZ may be Z itself."""
    t = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = offs < N
    z = tl.load(Z + t.to(tl.int64) * stride_z + offs, mask=mask, other=0.0) * inv_tau
    y = tl.load(Y + t)
    lse = tl.load(LSE + t)
    ez = tl.load(EZ + t)
    glp = tl.load(GLP + t)
    gent = tl.load(GENT + t)
    p = tl.exp(z - lse)
    dz = -p * (glp + gent * (z - ez)) + tl.where(col0 + offs == y, glp, 0.0)
    tl.store(DZ + t.to(tl.int64) * stride_dz + offs, (dz * inv_tau).to(DZ.dtype.element_ty),
             mask=mask)  # fmt: skip


# Whether this torch takes `out_dtype` in mm / addmm on the GPU (torch >= 2.8); set to False
# the first time it refuses, after which the GEMMs take their operands to fp32 (exact, slower).
OUT_DTYPE_GEMMS = {"mm": True, "addmm": True}


def _low_precision_cuda(a: torch.Tensor, op: str) -> bool:
    return a.is_cuda and a.dtype != torch.float32 and OUT_DTYPE_GEMMS[op]


def _mm_f32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = a @ b in fp32: low-precision operands on the GPU's tensor cores with fp32
    accumulation and output; elsewhere the operands taken to fp32 (the same products)."""
    if _low_precision_cuda(a, "mm"):
        try:
            return torch.mm(a, b, out_dtype=torch.float32, out=out)
        except (RuntimeError, TypeError):
            OUT_DTYPE_GEMMS["mm"] = False
    return torch.mm(a.float(), b.float(), out=out)


def _addmm_f32(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """c += a @ b, c fp32, as `_mm_f32`."""
    if _low_precision_cuda(a, "addmm"):
        try:
            torch.addmm(c, a, b, out_dtype=torch.float32, out=c)
            return
        except (RuntimeError, TypeError):
            OUT_DTYPE_GEMMS["addmm"] = False
    if _low_precision_cuda(a, "mm"):
        c.add_(_mm_f32(a, b, out=torch.empty_like(c)))
    else:
        c.addmm_(a.float(), b.float())


def chunk_rows(t_len: int, v_len: int, chunk_bytes: int | None = None) -> int:
    """Rows per chunk: the largest power of two with rows x V x 4 bytes <= chunk_bytes (at
    least 16), capped at T."""
    budget = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    rows = max(16, 1 << max(0, (budget // (4 * v_len)).bit_length() - 1))
    return max(1, min(rows, t_len))


def chunk_cols(t_len: int, v_len: int, chunk_bytes: int | None = None) -> int:
    """Vocabulary columns per backward chunk: the largest multiple of COL_ALIGN with
    T x columns x 4 bytes <= chunk_bytes (at least COL_ALIGN), capped at V."""
    budget = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    cols = max(COL_ALIGN, budget // (4 * max(t_len, 1)) // COL_ALIGN * COL_ALIGN)
    return min(cols, v_len)


def hybrid_logprob_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    grad_into: torch.Tensor | None = None,
    chunk_bytes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprob [T], entropy [T]) float32, differentiable w.r.t. hidden and weight (of one
    dtype: mixed inputs are taken to fp32). `grad_into`: the fp32 leaf parameter whose values
    `weight` holds: the backward adds dL/dW into its `.grad` and `weight` gets no gradient."""
    check_launchable(_row_stats_kernel, hidden.device)
    if hidden.dtype != weight.dtype:
        hidden, weight = hidden.float(), weight.float()
    if grad_into is not None:
        if grad_into.dtype != torch.float32 or grad_into.shape != weight.shape:
            raise ValueError("grad_into needs the float32 parameter of the weight's shape")
        weight = weight.detach()
    t_len, v_len = hidden.shape[0], weight.shape[0]
    chunks = (chunk_rows(t_len, v_len, chunk_bytes), chunk_cols(t_len, v_len, chunk_bytes))
    return _HybridLogprobEntropy.apply(hidden, weight, targets, temperature, chunks, grad_into)


class _HybridLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunks, grad_into):
        h, w, y = hidden.contiguous(), weight.contiguous(), targets.contiguous()
        t_len, v_len = h.shape[0], w.shape[0]
        rows = chunks[0]
        lp, ent, lse, ez = (
            torch.empty(t_len, dtype=torch.float32, device=h.device) for _ in range(4)
        )
        z_buf = torch.empty(min(rows, t_len) * v_len, dtype=torch.float32, device=h.device)
        for t0, t1 in _spans(t_len, rows):
            z = _mm_f32(h[t0:t1], w.T, out=z_buf[: (t1 - t0) * v_len].view(t1 - t0, v_len))
            _row_stats_kernel[(t1 - t0,)](
                z, y, lp, ent, lse, ez, v_len, z.stride(0), t0, 1.0 / temperature,
                BLOCK_V=ROW_BLOCK, num_warps=NUM_WARPS,
            )  # fmt: skip
        ctx.save_for_backward(h, w, y, lse, ez)
        ctx.inv_tau, ctx.cols, ctx.grad_into = 1.0 / temperature, chunks[1], grad_into
        return lp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        h, w, y, lse, ez = ctx.saved_tensors
        (t_len, hid), v_len = h.shape, w.shape[0]
        g_lp = torch.zeros_like(lse) if g_lp is None else g_lp.float().contiguous()
        g_ent = torch.zeros_like(lse) if g_ent is None else g_ent.float().contiguous()
        dh = torch.empty(t_len, hid, dtype=torch.float32, device=h.device)
        into = ctx.grad_into is not None
        dw = (
            grad_buffer(ctx.grad_into)
            if into
            else torch.empty(v_len, hid, dtype=torch.float32, device=h.device)
        )
        size = t_len * min(ctx.cols, v_len)
        z_buf = torch.empty(size, dtype=torch.float32, device=h.device)
        # dz in the operand dtype (the gradient GEMMs' operands); fp32 operands: in place in z
        dz_buf = (
            z_buf if h.dtype == torch.float32 else torch.empty(size, dtype=h.dtype, device=h.device)
        )
        for v0, v1 in _spans(v_len, ctx.cols):
            n = v1 - v0
            z = _mm_f32(h, w[v0:v1].T, out=z_buf[: t_len * n].view(t_len, n))
            dz = dz_buf[: t_len * n].view(t_len, n)
            _row_grad_kernel[(t_len, triton.cdiv(n, GRAD_BLOCK))](
                z, dz, y, lse, ez, g_lp, g_ent, n, z.stride(0), dz.stride(0), v0,
                ctx.inv_tau, BLOCK_V=GRAD_BLOCK, num_warps=NUM_WARPS,
            )  # fmt: skip
            if into:
                _addmm_f32(dw[v0:v1], dz.T, h)
            else:
                _mm_f32(dz.T, h, out=dw[v0:v1])
            if v0 == 0:
                _mm_f32(dz, w[v0:v1], out=dh)
            else:
                _addmm_f32(dh, dz, w[v0:v1])
        if into:
            return dh.to(h.dtype), None, None, None, None, None
        return dh.to(h.dtype), dw.to(w.dtype), None, None, None, None
