"""Triton backend of `packed_attention`: FlashAttention-2 (Dao 2023) over packed sequences.

Grid (query block, sequence, head); a program reads its sequence's [start, end) from
cu_seqlens and never looks outside it, so the block-diagonal mask costs nothing and the
off-diagonal blocks are not computed (SDPA with a dense mask computes all N^2 scores).
Scores live in the log2 domain (qk_scale = scale * log2 e, exp2) and the forward saves
lse2 = log2 sum_j 2^{s_ij} per (head, token): 4 bytes, instead of the [N, N] probabilities.

Backward (Dao 2023, Alg. 2), with delta_i = sum_d dO_id O_id (computed in torch):

    P_ij = 2^{s_ij - lse2_i},  dV_j = sum_i P_ij dO_i,  dP_ij = dO_i . v_j,
    dS_ij = P_ij (dP_ij - delta_i),  dQ_i = scale sum_j dS_ij k_j,  dK_j = scale sum_i dS_ij q_i

split in two kernels so that no two programs write the same rows (deterministic, no
atomics): dK/dV per key block and kv head (looping over the q heads of its GQA group and
the query blocks), and dQ per query block and q head.

Block sizes are untuned (no GPU when written; checked in the interpreter); tune with
`benchmarks/kernels.py --gpu`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from rlsys.kernels.backend import check_launchable
from rlsys.kernels.triton_common import UPCAST_DOT, dot

# (BLOCK_M, BLOCK_N) by head dim, 8 warps: the configurations ptxas compiles for sm_90 without
# register spills (`python -m rlsys.kernels.aot`; 64 x 64 with 4 warps spilled 160 bytes per
# thread in the dK/dV backward at D=64 and 600-1300 in all three kernels at D=128). Not yet
# timed on a GPU.
BLOCKS_HEAD_DIM_64 = (64, 64)  # head_dim <= 64
BLOCKS_WIDER = (64, 32)  # head_dim > 64 (measured at 128)
NUM_WARPS = 8
BLOCK_M: int | None = None  # set both to override the table (tests use small tiles)
BLOCK_N: int | None = None


def default_blocks(head_dim: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) for queries/keys of `head_dim`."""
    return BLOCKS_HEAD_DIM_64 if head_dim <= 64 else BLOCKS_WIDER


LOG2E = 1.4426950408889634


@triton.jit
def _attn_fwd_kernel(Q, K, V, OUT, LSE, CU, qk_scale, stride_qt, stride_qh, stride_kt, stride_kh,
                     stride_vt, stride_vh, stride_ot, stride_oh, total, D,
                     GROUP: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):  # fmt: skip
    seq, head = tl.program_id(1), tl.program_id(2)
    start = tl.load(CU + seq)
    n = tl.load(CU + seq + 1) - start
    m0 = tl.program_id(0) * BLOCK_M
    if m0 < n:
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        mask_m = offs_m < n
        mask_d = offs_d < D
        rows = (start + offs_m).to(tl.int64)
        q = tl.load(Q + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                    mask=mask_m[:, None] & mask_d[None, :], other=0.0)  # fmt: skip
        kv_head = head // GROUP
        # -1e30, not -inf: padded rows see only masked keys; exp2(-inf - -inf) would be NaN
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        hi = tl.minimum(n, m0 + BLOCK_M) if CAUSAL else n
        for n0 in range(0, hi, BLOCK_N):
            cols = n0 + offs_n
            mask_n = cols < n
            kv_rows = (start + cols).to(tl.int64)
            k = tl.load(K + kv_rows[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :],
                        mask=mask_n[:, None] & mask_d[None, :], other=0.0)  # fmt: skip
            v = tl.load(V + kv_rows[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :],
                        mask=mask_n[:, None] & mask_d[None, :], other=0.0)  # fmt: skip
            s = dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), UPCAST) * qk_scale
            keep = mask_n[None, :]
            if CAUSAL:
                keep = keep & (cols[None, :] <= offs_m[:, None])
            s = tl.where(keep, s, -1.0e30)
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.where(keep, tl.exp2(s - m_new[:, None]), 0.0)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = dot(p.to(v.dtype), v, acc * alpha[:, None], UPCAST)
            m_i = m_new
        l_i = tl.where(mask_m, l_i, 1.0)  # rows past the sequence end: never stored
        out = acc / l_i[:, None]
        tl.store(OUT + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
                 out.to(OUT.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])  # fmt: skip
        tl.store(LSE + head * total + rows, m_i + tl.log2(l_i), mask=mask_m)


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, CU, qk_scale, sm_scale,
                          stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                          total, D, GROUP: tl.constexpr, CAUSAL: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):  # fmt: skip
    """One key block of one kv head; dO/dQ/dK/dV share q's/k's strides (made contiguous)."""
    seq, kv_head = tl.program_id(1), tl.program_id(2)
    start = tl.load(CU + seq)
    n = tl.load(CU + seq + 1) - start
    n0 = tl.program_id(0) * BLOCK_N
    if n0 < n:
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask_n = offs_n < n
        mask_d = offs_d < D
        kv_rows = (start + offs_n).to(tl.int64)
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(K + kv_rows[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :],
                    mask=kv_mask, other=0.0)  # fmt: skip
        v = tl.load(V + kv_rows[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :],
                    mask=kv_mask, other=0.0)  # fmt: skip
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        lo = n0 if CAUSAL else 0  # causal: queries before the block's first key see none of it
        for g in range(GROUP):
            head = kv_head * GROUP + g
            for m0 in range(lo, n, BLOCK_M):
                rows_m = m0 + offs_m
                mask_m = rows_m < n
                q_rows = (start + rows_m).to(tl.int64)
                q_mask = mask_m[:, None] & mask_d[None, :]
                q = tl.load(Q + q_rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                            mask=q_mask, other=0.0)  # fmt: skip
                do = tl.load(DO + q_rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                             mask=q_mask, other=0.0)  # fmt: skip
                lse = tl.load(LSE + head * total + q_rows, mask=mask_m, other=0.0)
                delta = tl.load(DELTA + head * total + q_rows, mask=mask_m, other=0.0)
                s_t = dot(k, tl.trans(q), tl.zeros([BLOCK_N, BLOCK_M], tl.float32), UPCAST)
                keep = mask_n[:, None] & mask_m[None, :]
                if CAUSAL:
                    keep = keep & (rows_m[None, :] >= offs_n[:, None])
                p_t = tl.where(keep, tl.exp2(s_t * qk_scale - lse[None, :]), 0.0)  # [N, M]
                dv = dot(p_t.to(do.dtype), do, dv, UPCAST)
                dp_t = dot(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], tl.float32), UPCAST)
                ds_t = p_t * (dp_t - delta[None, :])
                dk = dot(ds_t.to(q.dtype), q, dk, UPCAST)
        tl.store(DK + kv_rows[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :],
                 (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)  # fmt: skip
        tl.store(DV + kv_rows[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :],
                 dv.to(DV.dtype.element_ty), mask=kv_mask)  # fmt: skip


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU, qk_scale, sm_scale,
                        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                        total, D, GROUP: tl.constexpr, CAUSAL: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        UPCAST: tl.constexpr):  # fmt: skip
    seq, head = tl.program_id(1), tl.program_id(2)
    start = tl.load(CU + seq)
    n = tl.load(CU + seq + 1) - start
    m0 = tl.program_id(0) * BLOCK_M
    if m0 < n:
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        mask_m = offs_m < n
        mask_d = offs_d < D
        rows = (start + offs_m).to(tl.int64)
        q_mask = mask_m[:, None] & mask_d[None, :]
        q = tl.load(Q + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                    mask=q_mask, other=0.0)  # fmt: skip
        do = tl.load(DO + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                     mask=q_mask, other=0.0)  # fmt: skip
        lse = tl.load(LSE + head * total + rows, mask=mask_m, other=0.0)
        delta = tl.load(DELTA + head * total + rows, mask=mask_m, other=0.0)
        kv_head = head // GROUP
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        hi = tl.minimum(n, m0 + BLOCK_M) if CAUSAL else n
        for n0 in range(0, hi, BLOCK_N):
            cols = n0 + offs_n
            mask_n = cols < n
            kv_rows = (start + cols).to(tl.int64)
            k = tl.load(K + kv_rows[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :],
                        mask=mask_n[:, None] & mask_d[None, :], other=0.0)  # fmt: skip
            v = tl.load(V + kv_rows[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :],
                        mask=mask_n[:, None] & mask_d[None, :], other=0.0)  # fmt: skip
            s = dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), UPCAST)
            keep = mask_m[:, None] & mask_n[None, :]
            if CAUSAL:
                keep = keep & (cols[None, :] <= offs_m[:, None])
            p = tl.where(keep, tl.exp2(s * qk_scale - lse[:, None]), 0.0)
            dp = dot(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), UPCAST)
            ds = p * (dp - delta[:, None])
            dq = dot(ds.to(k.dtype), k, dq, UPCAST)
        tl.store(DQ + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                 (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)  # fmt: skip


def triton_packed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    max_seqlen: int | None = None,
    blocks: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Launch the Triton kernels: [N, Hq, D] in q's dtype, differentiable w.r.t. q, k, v.

    max_seqlen sizes the grid; None reads it from cu_seqlens (one device sync). blocks =
    (BLOCK_M, BLOCK_N); None takes the module's BLOCK_M/N when set, else
    `default_blocks(head_dim)`.
    """
    check_launchable(_attn_fwd_kernel, q.device)
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if blocks is None:
        given = (BLOCK_M, BLOCK_N)
        blocks = default_blocks(q.shape[-1]) if None in given else given
    return _TritonPackedAttention.apply(q, k, v, cu_seqlens, causal, scale, max_seqlen, blocks)


class _TritonPackedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, causal, scale, max_seqlen, blocks):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
        (total, hq, d), hkv = q.shape, k.shape[1]
        bm, bn = blocks
        o = torch.empty_like(q)
        lse = torch.empty(hq, total, dtype=torch.float32, device=q.device)
        grid = (triton.cdiv(max_seqlen, bm), cu.numel() - 1, hq)
        if total > 0 and max_seqlen > 0:
            _attn_fwd_kernel[grid](
                q, k, v, o, lse, cu, scale * LOG2E, q.stride(0), q.stride(1), k.stride(0),
                k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1), total, d,
                GROUP=hq // hkv, CAUSAL=causal, BLOCK_M=bm, BLOCK_N=bn,
                BLOCK_D=max(16, triton.next_power_of_2(d)), UPCAST=UPCAST_DOT,
                num_warps=NUM_WARPS,
            )  # fmt: skip
        ctx.save_for_backward(q, k, v, o, lse, cu)
        ctx.causal, ctx.scale, ctx.max_seqlen, ctx.blocks = causal, scale, max_seqlen, blocks
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu = ctx.saved_tensors
        (total, hq, d), hkv = q.shape, k.shape[1]
        bm, bn = ctx.blocks
        do = do.contiguous()
        delta = (do.float() * o.float()).sum(-1).T.contiguous()  # [Hq, N]
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        if total == 0 or ctx.max_seqlen == 0:
            return dq, dk, dv, None, None, None, None, None
        n_seq = cu.numel() - 1
        meta = dict(
            GROUP=hq // hkv, CAUSAL=ctx.causal, BLOCK_M=bm, BLOCK_N=bn,
            BLOCK_D=max(16, triton.next_power_of_2(d)), UPCAST=UPCAST_DOT, num_warps=NUM_WARPS,
        )  # fmt: skip
        common = (ctx.scale * LOG2E, ctx.scale, q.stride(0), q.stride(1), k.stride(0),
                  k.stride(1), v.stride(0), v.stride(1), total, d)  # fmt: skip
        _attn_bwd_dkdv_kernel[(triton.cdiv(ctx.max_seqlen, bn), n_seq, hkv)](
            q, k, v, do, lse, delta, dk, dv, cu, *common, **meta
        )
        _attn_bwd_dq_kernel[(triton.cdiv(ctx.max_seqlen, bm), n_seq, hq)](
            q, k, v, do, lse, delta, dq, cu, *common, **meta
        )
        return dq, dk, dv, None, None, None, None, None
