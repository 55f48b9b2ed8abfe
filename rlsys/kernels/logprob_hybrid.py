"""Hybrid backend of `fused_logprob_entropy` (math in `logprob.py`): cuBLAS GEMMs, Triton rows.

The Triton backend (`logprob_triton.py`) does every GEMM in Triton tiles and adds dh and dW
with fp32 atomics: T/BLOCK_T x V x H atomic adds for dW alone (3.6e9 at T=8192, H=576,
V=49152). This backend is Liger-Kernel's fused linear cross-entropy, with the entropy and
without needing the upstream gradient in the forward. Tokens go in chunks of C rows, each
with its whole vocabulary row:

    forward, per chunk:   z = h_c W^T / tau                [C, V] fp32 (cuBLAS)
                          one Triton program per row: m, s, u, z_y online over the row
                          -> logprob, entropy, and lse, E_p[z] saved for the backward
    backward, per chunk:  z recomputed;
                          dz = (g_lp (1[v = y] - p) - g_H p (z - E)) / tau   (Triton, 2-D grid)
                          dh_c = dz W,  dW += dz^T h_c                        (cuBLAS)

The four GEMMs of the Triton path (forward, recompute, dh, dW), no atomics; each [C, V] tile
is written by cuBLAS and read once by a row kernel (forward) or read and written once as dz
(backward). Memory: one fp32 [C, V] tile and one dz tile in the operand dtype, with C the
largest power of two (>= 16) with C x V x 4 <= CHUNK_BYTES.

Numerics as the Triton path: GEMM operands in the inputs' dtype (bf16 on the tensor cores),
fp32 accumulation and fp32 logits (`torch.mm(..., out_dtype=torch.float32)`), dz rounded to
the operand dtype before the gradient GEMMs, dh and dW accumulated in fp32 (dW across chunks
in place, or in `weight.grad` with grad_into). Off the GPU (tests, TRITON_INTERPRET=1) the
GEMMs take their operands to fp32, which gives the same products exactly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlsys.kernels.backend import check_launchable
from rlsys.kernels.grad_into import grad_buffer

CHUNK_BYTES = 1 << 30  # fp32 logits tile: 1024 rows at V=151936, 4096 at V=49152 (capped at T)
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
def _row_grad_kernel(Z, DZ, Y, LSE, EZ, GLP, GENT, V, stride_z, stride_dz, row0, inv_tau,
                     BLOCK_V: tl.constexpr):  # fmt: skip
    """dz for row program_id(0), vocabulary block program_id(1); DZ may be Z itself."""
    r = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = offs < V
    t = row0 + r
    z = tl.load(Z + r.to(tl.int64) * stride_z + offs, mask=mask, other=0.0) * inv_tau
    y = tl.load(Y + t)
    lse = tl.load(LSE + t)
    ez = tl.load(EZ + t)
    glp = tl.load(GLP + t)
    gent = tl.load(GENT + t)
    p = tl.exp(z - lse)
    dz = -p * (glp + gent * (z - ez)) + tl.where(offs == y, glp, 0.0)
    tl.store(DZ + r.to(tl.int64) * stride_dz + offs, (dz * inv_tau).to(DZ.dtype.element_ty),
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
    rows = chunk_rows(hidden.shape[0], weight.shape[0], chunk_bytes)
    return _HybridLogprobEntropy.apply(hidden, weight, targets, temperature, rows, grad_into)


def _chunks(t_len: int, rows: int) -> list[tuple[int, int]]:
    return [(t0, min(t0 + rows, t_len)) for t0 in range(0, t_len, rows)]


class _HybridLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, rows, grad_into):
        h, w, y = hidden.contiguous(), weight.contiguous(), targets.contiguous()
        t_len, v_len = h.shape[0], w.shape[0]
        lp, ent, lse, ez = (
            torch.empty(t_len, dtype=torch.float32, device=h.device) for _ in range(4)
        )
        z_buf = torch.empty(min(rows, t_len) * v_len, dtype=torch.float32, device=h.device)
        for t0, t1 in _chunks(t_len, rows):
            z = _mm_f32(h[t0:t1], w.T, out=z_buf[: (t1 - t0) * v_len].view(t1 - t0, v_len))
            _row_stats_kernel[(t1 - t0,)](
                z, y, lp, ent, lse, ez, v_len, z.stride(0), t0, 1.0 / temperature,
                BLOCK_V=ROW_BLOCK, num_warps=NUM_WARPS,
            )  # fmt: skip
        ctx.save_for_backward(h, w, y, lse, ez)
        ctx.inv_tau, ctx.rows, ctx.grad_into = 1.0 / temperature, rows, grad_into
        return lp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        h, w, y, lse, ez = ctx.saved_tensors
        (t_len, hid), v_len = h.shape, w.shape[0]
        g_lp = torch.zeros_like(lse) if g_lp is None else g_lp.float().contiguous()
        g_ent = torch.zeros_like(lse) if g_ent is None else g_ent.float().contiguous()
        dh = torch.empty(t_len, hid, dtype=torch.float32, device=h.device)
        if ctx.grad_into is not None:
            dw = grad_buffer(ctx.grad_into)
        else:
            dw = torch.zeros(v_len, hid, dtype=torch.float32, device=h.device)
        size = min(ctx.rows, t_len) * v_len
        z_buf = torch.empty(size, dtype=torch.float32, device=h.device)
        # dz in the operand dtype (the gradient GEMMs' operands); fp32 operands: in place in z
        dz_buf = (
            z_buf if h.dtype == torch.float32 else torch.empty(size, dtype=h.dtype, device=h.device)
        )
        for t0, t1 in _chunks(t_len, ctx.rows):
            n = t1 - t0
            z = _mm_f32(h[t0:t1], w.T, out=z_buf[: n * v_len].view(n, v_len))
            dz = dz_buf[: n * v_len].view(n, v_len)
            _row_grad_kernel[(n, triton.cdiv(v_len, GRAD_BLOCK))](
                z, dz, y, lse, ez, g_lp, g_ent, v_len, z.stride(0), dz.stride(0), t0,
                ctx.inv_tau, BLOCK_V=GRAD_BLOCK, num_warps=NUM_WARPS,
            )  # fmt: skip
            _mm_f32(dz, w, out=dh[t0:t1])
            _addmm_f32(dw, dz.T, h[t0:t1])
        if ctx.grad_into is not None:
            return dh.to(h.dtype), None, None, None, None, None
        return dh.to(h.dtype), dw.to(w.dtype), None, None, None, None
