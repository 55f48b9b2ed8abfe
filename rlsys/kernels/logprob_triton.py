"""Triton backend of `fused_logprob_entropy` (math in `logprob.py`).

Forward: program (i, k) takes BLOCK_T tokens and the k-th of `splits` vocabulary ranges,
walks it in BLOCK_V tiles (each tile's logits a BLOCK_H-chunked `tl.dot` over the hidden
size) and writes its partial online statistics (m, s, u, z_y) [splits, T]; torch merges them:

    M = max_k m_k,  s = sum_k e^{m_k - M} s_k,  u = sum_k e^{m_k - M} (u_k + (m_k - M) s_k)

Splitting the vocabulary gives T/BLOCK_T x splits programs instead of T/BLOCK_T (128 at
T=8192, fewer than an H100's 132 SMs). Saves lse and E_p[z] per token: 8 bytes/token.

Backward: one program per (BLOCK_T, BLOCK_V) tile recomputes the logits tile, forms dz and
adds dz @ W into dh and dz^T @ h into dW with fp32 atomics (as Cut Cross-Entropy, Wijmans et
al. 2024). That is 3 GEMM-sized passes after the forward's 1 (a non-atomic split into a dh
kernel and a dW kernel would need 4); the price is run-to-run nondeterminism in the last bits
of the gradients, and atomic traffic of (T/BLOCK_T + V/BLOCK_V) x H x (V or T) adds.

Tiles (`Tiles`, one for the forward and one for the backward) depend on the operands:
bf16/fp16 take the tensor cores, fp32 (and a mixed pair, taken to fp32) the "ieee" FMA dot,
whose operand tiles live in registers and need a narrower H chunk. Both were chosen offline
as configurations ptxas compiles for sm_90 without register spills (`python -m
rlsys.kernels.aot`: registers, shared memory and spills of every launch; the defaults before
spilled 448-1352 bytes per thread in the backward). The bf16 tiles are the fastest of the
candidates below on an H200 (`benchmarks/kernels.py --gpu` sweeps them); the fp32 ones are
not timed on a GPU.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from rlsys.kernels.backend import check_launchable
from rlsys.kernels.grad_into import grad_buffer
from rlsys.kernels.triton_common import UPCAST_DOT, dot


class Tiles(NamedTuple):
    """One launch: BLOCK_T tokens x BLOCK_V vocabulary entries per tile, the hidden size in
    BLOCK_H chunks (powers of two >= 16, tl.dot's minimum), and the warps."""

    t: int
    v: int
    h: int
    warps: int = 8


# (forward, backward): bf16/fp16 operands (tensor cores), fp32 or mixed operands. The bf16
# tiles are the winners of the H200 sweep (benchmarks/results/kernels_gpu.json, 2026-12-04,
# Triton 3.6): forward 128x128x32 (1.61 ms at T=8192, H=576, V=49152 against 2.11 for the old
# 64x128x32; within 1% of the best, 64x256x32, at H=4096), backward 64x64x32 (fastest at both
# sizes). The fp32 tiles are not timed on a GPU.
TENSOR_CORE_TILES = (Tiles(128, 128, 32), Tiles(64, 64, 32))
FP32_TILES = (Tiles(64, 64, 16), Tiles(64, 64, 16))
# Timed by `benchmarks/kernels.py --gpu` with bf16 operands (the first is the default): the
# 8-warp tiles that build for sm_90 without spills (4 warps spill at all of these sizes),
# but 128 x 128 x 32 in the backward (8 bytes per thread).
FWD_CANDIDATES = (Tiles(128, 128, 32), Tiles(64, 128, 32), Tiles(128, 64, 32), Tiles(64, 64, 32),
                  Tiles(64, 64, 64), Tiles(64, 256, 32), Tiles(128, 64, 64))  # fmt: skip
BWD_CANDIDATES = (Tiles(64, 64, 32), Tiles(64, 128, 32), Tiles(128, 64, 32), Tiles(64, 64, 64),
                  Tiles(128, 128, 32))  # fmt: skip
# (forward, backward) tiles for every launch when set: tests shrink them to cover partial
# tiles, `rlsys.kernels.tune.override` times candidates.
OVERRIDE: tuple[Tiles, Tiles] | None = None
SPLITS: int | None = None  # vocabulary splits of the forward; None: ~4 programs per SM


@triton.jit
def _logits_tile(H, W, offs_t, mask_t, offs_v, mask_v, HID, stride_h, stride_w,
                 BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                 UPCAST: tl.constexpr):  # fmt: skip
    """[BLOCK_T, BLOCK_V] fp32 tile of h @ W^T (masked rows/cols read as 0)."""
    acc = tl.zeros([BLOCK_T, BLOCK_V], dtype=tl.float32)
    for h0 in range(0, HID, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask_h = offs_h < HID
        h = tl.load(H + offs_t[:, None] * stride_h + offs_h[None, :],
                    mask=mask_t[:, None] & mask_h[None, :], other=0.0)  # fmt: skip
        w = tl.load(W + offs_v[:, None] * stride_w + offs_h[None, :],
                    mask=mask_v[:, None] & mask_h[None, :], other=0.0)  # fmt: skip
        acc = dot(h, tl.trans(w), acc, UPCAST)
    return acc


@triton.jit
def _logprob_fwd_kernel(H, W, Y, M, S, U, ZY, T, V, HID, stride_h, stride_w, inv_tau, v_split,
                        BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                        UPCAST: tl.constexpr):  # fmt: skip
    """Partial statistics of tokens block program_id(0) over vocabulary split program_id(1)
    = [k v_split, (k + 1) v_split), v_split a multiple of BLOCK_V."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    offs_t = offs_t.to(tl.int64)
    v_lo = tl.program_id(1) * v_split
    v_hi = tl.minimum(V, v_lo + v_split)
    y = tl.load(Y + offs_t, mask=mask_t, other=0)
    # -1e30, not -inf: (m - m') * s and exp(m - m') stay finite in masked lanes (interpreter NaN)
    m = tl.full([BLOCK_T], -1.0e30, dtype=tl.float32)
    s = tl.zeros([BLOCK_T], dtype=tl.float32)
    u = tl.zeros([BLOCK_T], dtype=tl.float32)
    zy = tl.zeros([BLOCK_T], dtype=tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        offs_v = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        mask_v = offs_v < v_hi
        z = _logits_tile(H, W, offs_t, mask_t, offs_v, mask_v, HID, stride_h, stride_w,
                         BLOCK_T, BLOCK_V, BLOCK_H, UPCAST) * inv_tau  # fmt: skip
        zy += tl.sum(tl.where(offs_v[None, :] == y[:, None], z, 0.0), axis=1)
        z = tl.where(mask_v[None, :], z, -1.0e30)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        zc = z - m_new[:, None]
        e = tl.exp(zc)
        u = alpha * (u + (m - m_new) * s) + tl.sum(e * zc, axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new
    out = tl.program_id(1) * T + offs_t
    tl.store(M + out, m, mask=mask_t)
    tl.store(S + out, s, mask=mask_t)
    tl.store(U + out, u, mask=mask_t)
    tl.store(ZY + out, zy, mask=mask_t)


@triton.jit
def _logprob_bwd_kernel(H, W, Y, LSE, EZ, GLP, GENT, DH, DW, T, V, HID, stride_h, stride_w,
                        inv_tau, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr,
                        BLOCK_H: tl.constexpr, UPCAST: tl.constexpr):  # fmt: skip
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_t = offs_t < T
    mask_v = offs_v < V
    offs_t = offs_t.to(tl.int64)
    offs_v = offs_v.to(tl.int64)
    z = _logits_tile(H, W, offs_t, mask_t, offs_v, mask_v, HID, stride_h, stride_w,
                     BLOCK_T, BLOCK_V, BLOCK_H, UPCAST) * inv_tau  # fmt: skip
    y = tl.load(Y + offs_t, mask=mask_t, other=0)
    lse = tl.load(LSE + offs_t, mask=mask_t, other=0.0)
    ez = tl.load(EZ + offs_t, mask=mask_t, other=0.0)
    glp = tl.load(GLP + offs_t, mask=mask_t, other=0.0)
    gent = tl.load(GENT + offs_t, mask=mask_t, other=0.0)
    p = tl.exp(z - lse[:, None])
    dz = -p * (glp[:, None] + gent[:, None] * (z - ez[:, None]))
    dz += tl.where(offs_v[None, :] == y[:, None], glp[:, None], 0.0)
    dz = tl.where(mask_t[:, None] & mask_v[None, :], dz * inv_tau, 0.0)
    for h0 in range(0, HID, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask_h = offs_h < HID
        h = tl.load(H + offs_t[:, None] * stride_h + offs_h[None, :],
                    mask=mask_t[:, None] & mask_h[None, :], other=0.0)  # fmt: skip
        w = tl.load(W + offs_v[:, None] * stride_w + offs_h[None, :],
                    mask=mask_v[:, None] & mask_h[None, :], other=0.0)  # fmt: skip
        dh = dot(dz.to(w.dtype), w, tl.zeros([BLOCK_T, BLOCK_H], tl.float32), UPCAST)
        tl.atomic_add(DH + offs_t[:, None] * HID + offs_h[None, :], dh,
                      mask=mask_t[:, None] & mask_h[None, :])  # fmt: skip
        dw = dot(tl.trans(dz.to(h.dtype)), h, tl.zeros([BLOCK_V, BLOCK_H], tl.float32), UPCAST)
        tl.atomic_add(DW + offs_v[:, None] * HID + offs_h[None, :], dw,
                      mask=mask_v[:, None] & mask_h[None, :])  # fmt: skip


def triton_logprob_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    tiles: tuple[Tiles, Tiles] | None = None,
    grad_into: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the Triton kernels: (logprob [T], entropy [T]) float32, differentiable.

    tiles = (forward, backward); None takes `default_tiles` of the operand dtypes.
    `grad_into`: the fp32 leaf parameter whose values `weight` holds (`weight` itself, or its
    detached bf16 copy): the backward's atomics add dL/dW into its `.grad`
    (`rlsys.kernels.grad_into`), and `weight` gets no gradient.
    """
    if hidden.dtype == torch.float64 or weight.dtype == torch.float64:
        raise TypeError("the Triton path takes float32/bfloat16/float16 inputs, not float64")
    check_launchable(_logprob_fwd_kernel, hidden.device)
    tiles = default_tiles(hidden.dtype, weight.dtype) if tiles is None else tiles
    if grad_into is not None:
        if grad_into.dtype != torch.float32 or grad_into.shape != weight.shape:
            raise ValueError("grad_into needs the float32 parameter of the weight's shape")
        weight = weight.detach()
    return _TritonLogprobEntropy.apply(hidden, weight, targets, temperature, tiles, grad_into)


def default_tiles(hidden_dtype: torch.dtype, weight_dtype: torch.dtype) -> tuple[Tiles, Tiles]:
    """(forward, backward) tiles for these operand dtypes (see the module docstring), or
    the module's OVERRIDE when set."""
    if OVERRIDE is not None:
        return OVERRIDE
    low = (torch.bfloat16, torch.float16)
    tensor_cores = hidden_dtype == weight_dtype and hidden_dtype in low
    return TENSOR_CORE_TILES if tensor_cores else FP32_TILES


def _splits(t_blocks: int, v_blocks: int, device: torch.device) -> int:
    if SPLITS is not None:
        return max(1, min(SPLITS, v_blocks))
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(v_blocks, triton.cdiv(4 * sms, t_blocks)))


def merge_partials(
    m: torch.Tensor, s: torch.Tensor, u: torch.Tensor, zy: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """[splits, T] partial statistics -> (logprob, entropy, lse, E_p[z]), each [T]."""
    big = m.max(0).values
    scale = torch.exp(m - big)  # an empty split has m = -1e30, s = u = 0: weight 0, no NaN
    s_all = (scale * s).sum(0)
    u_all = (scale * (u + (m - big) * s)).sum(0)
    log_s = torch.log(s_all)
    lse = big + log_s
    ent = log_s - u_all / s_all
    return zy.sum(0) - lse, ent, lse, lse - ent


class _TritonLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, tiles, grad_into):
        h, w, y = hidden.contiguous(), weight.contiguous(), targets.contiguous()
        (t_len, hid), v_len = h.shape, w.shape[0]
        bt, bv, bh, warps = tiles[0]
        t_blocks, v_blocks = triton.cdiv(t_len, bt), triton.cdiv(v_len, bv)
        splits = _splits(t_blocks, v_blocks, h.device)
        v_split = triton.cdiv(v_blocks, splits) * bv
        part = torch.empty(4, splits, t_len, dtype=torch.float32, device=h.device)
        _logprob_fwd_kernel[(t_blocks, splits)](
            h, w, y, part[0], part[1], part[2], part[3], t_len, v_len, hid, h.stride(0),
            w.stride(0), 1.0 / temperature, v_split, BLOCK_T=bt, BLOCK_V=bv, BLOCK_H=bh,
            UPCAST=UPCAST_DOT, num_warps=warps,
        )  # fmt: skip
        lp, ent, lse, ez = merge_partials(*part)
        ctx.save_for_backward(h, w, y, lse, ez)
        ctx.inv_tau, ctx.bwd, ctx.grad_into = 1.0 / temperature, tiles[1], grad_into
        return lp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        h, w, y, lse, ez = ctx.saved_tensors
        (t_len, hid), v_len = h.shape, w.shape[0]
        bt, bv, bh, warps = ctx.bwd
        g_lp = torch.zeros_like(lse) if g_lp is None else g_lp.float().contiguous()
        g_ent = torch.zeros_like(lse) if g_ent is None else g_ent.float().contiguous()
        dh = torch.zeros(t_len, hid, dtype=torch.float32, device=h.device)
        if ctx.grad_into is not None:  # the atomics add into the parameter's fp32 .grad
            dw = grad_buffer(ctx.grad_into)
            assert dw.is_contiguous(), "the kernel indexes dW as a contiguous [V, H]"
        else:
            dw = torch.zeros(v_len, hid, dtype=torch.float32, device=h.device)
        grid = (triton.cdiv(t_len, bt), triton.cdiv(v_len, bv))
        _logprob_bwd_kernel[grid](
            h, w, y, lse, ez, g_lp, g_ent, dh, dw, t_len, v_len, hid, h.stride(0),
            w.stride(0), ctx.inv_tau, BLOCK_T=bt, BLOCK_V=bv, BLOCK_H=bh, UPCAST=UPCAST_DOT,
            num_warps=warps,
        )  # fmt: skip
        if ctx.grad_into is not None:
            return dh.to(h.dtype), None, None, None, None, None
        return dh.to(h.dtype), dw.to(w.dtype), None, None, None, None
