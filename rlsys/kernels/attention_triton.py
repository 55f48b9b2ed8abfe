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

Each kernel walks its streamed blocks in two ranges, as the Triton tutorial's causal
"stages": the blocks on the causal diagonal (and, in the forward and dQ, a partial key
block at the sequence's end) go through a loop body compiled with the mask, the others through the
same body without its compare and select. Rows past a sequence's end load as zeros; the
forward and dQ mask such keys, while dK/dV needs no mask for queries past the end, which add
nothing (see the kernels).

Tiles: the forward and the backward have their own (`Tiles`, `BwdTiles`); candidates that
ptxas compiles for sm_90 without spills are timed by `benchmarks/kernels.py --gpu`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from rlsys.kernels.backend import check_launchable
from rlsys.kernels.triton_common import UPCAST_DOT, dot


class Tiles(NamedTuple):
    """Forward launch: BLOCK_M queries per program, BLOCK_N keys per step, warps."""

    m: int
    n: int
    warps: int = 8


class BwdTiles(NamedTuple):
    """Backward launches: each program owns `own` rows and streams `stream` rows per step
    (dK/dV: owns keys, streams queries; dQ: owns queries, streams keys), warps."""

    own: int
    stream: int
    warps: int = 8


# By head dim (<= 64, wider: measured at 128). The backward owns more rows than it streams,
# as the Triton tutorial's. Head dim 64: the winners of the H200 sweep (benchmarks/results/kernels_gpu.json, 2026-12-04,
# Triton 3.6; 8192 packed tokens, 9 / 3 heads): forward 128 x 64 (0.112 ms against 0.162 for
# 64 x 64), backward own 128 / stream 32 (forward + backward 0.757 ms against 1.017 for own 64
# / stream 32), although its dK/dV spills (96 bytes per thread with Triton 3.9, 440 with 3.6):
# 128 keys per program halve the passes over the queries. Head dim 128: not timed on a GPU;
# the tiles ptxas builds for sm_90 without spills (`python -m rlsys.kernels.aot`), where only
# 32 x 32 does in the backward.
FWD_TILES = {64: Tiles(128, 64), 128: Tiles(64, 32)}
BWD_TILES = {64: BwdTiles(128, 32), 128: BwdTiles(32, 32)}
# Timed by `benchmarks/kernels.py --gpu` at head_dim 64, bf16 (the first is the default):
# spill-free on sm_90 (regs <= 255, no local memory), except the tutorial's own 128 x
# stream 32 and 64 x 64, whose dK/dV spill 96 and 24 bytes per thread.
FWD_CANDIDATES = (Tiles(128, 64), Tiles(64, 64), Tiles(64, 128), Tiles(128, 128), Tiles(128, 32))
BWD_CANDIDATES = (BwdTiles(128, 32), BwdTiles(64, 32), BwdTiles(32, 64), BwdTiles(32, 32),
                  BwdTiles(64, 64))  # fmt: skip
# (forward, backward) tiles for every launch when set: tests shrink them, and
# `rlsys.kernels.tune.override` times candidates.
OVERRIDE: tuple[Tiles, BwdTiles] | None = None


def default_tiles(head_dim: int) -> tuple[Tiles, BwdTiles]:
    """(forward, backward) tiles for queries/keys of `head_dim` (the module's OVERRIDE when
    set)."""
    if OVERRIDE is not None:
        return OVERRIDE
    key = 64 if head_dim <= 64 else 128
    return FWD_TILES[key], BWD_TILES[key]


LOG2E = 1.4426950408889634


@triton.jit
def _rows(PTR, rows, stride_t, head_off, offs_d, row_mask, mask_d):
    """[len(rows), BLOCK_D] rows of one head; masked rows and columns read as 0."""
    ptrs = PTR + rows[:, None] * stride_t + head_off + offs_d[None, :]
    return tl.load(ptrs, mask=row_mask[:, None] & mask_d[None, :], other=0.0)


@triton.jit
def _kv_block(K, V, start, n, cols, offs_d, mask_d, kv_head, stride_kt, stride_kh, stride_vt,
              stride_vh):  # fmt: skip
    """Keys and values of sequence positions `cols` of one kv head (past n: zeros), with
    `cols` and their mask."""
    mask_n = cols < n
    kv_rows = (start + cols).to(tl.int64)
    k = _rows(K, kv_rows, stride_kt, kv_head * stride_kh, offs_d, mask_n, mask_d)
    v = _rows(V, kv_rows, stride_vt, kv_head * stride_vh, offs_d, mask_n, mask_d)
    return cols, mask_n, k, v


@triton.jit
def _fwd_steps(acc, m_i, l_i, q, K, V, start, n, offs_m, offs_n, offs_d, mask_d, lo, hi,
               kv_head, qk_scale, stride_kt, stride_kh, stride_vt, stride_vh,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
               UPCAST: tl.constexpr):  # fmt: skip
    """Online softmax over the key blocks [lo, hi); MASKED: keys past n and (CAUSAL) keys
    after the query are dropped, else every key of every block is visible to every query."""
    for n0 in range(lo, hi, BLOCK_N):
        cols, mask_n, k, v = _kv_block(K, V, start, n, n0 + offs_n, offs_d, mask_d, kv_head,
                                       stride_kt, stride_kh, stride_vt, stride_vh)  # fmt: skip
        s = dot(q, tl.trans(k), tl.zeros([q.shape[0], BLOCK_N], tl.float32), UPCAST) * qk_scale
        if MASKED:
            keep = mask_n[None, :]
            if CAUSAL:
                keep = keep & (cols[None, :] <= offs_m[:, None])
            s = tl.where(keep, s, -1.0e30)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        if MASKED:
            p = tl.where(keep, p, 0.0)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = dot(p.to(v.dtype), v, acc * alpha[:, None], UPCAST)
        m_i = m_new
    return acc, m_i, l_i


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
        q = _rows(Q, rows, stride_qt, head * stride_qh, offs_d, mask_m, mask_d)
        kv_head = head // GROUP
        # -1e30, not -inf: padded rows see only masked keys; exp2(-inf - -inf) would be NaN
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        if CAUSAL:  # keys before `full` precede every query of the block (and end before n)
            hi = tl.minimum(n, m0 + BLOCK_M)
            full = (m0 // BLOCK_N) * BLOCK_N
        else:  # whole key blocks inside the sequence
            hi = n
            full = (n // BLOCK_N) * BLOCK_N
        acc, m_i, l_i = _fwd_steps(acc, m_i, l_i, q, K, V, start, n, offs_m, offs_n, offs_d,
                                   mask_d, 0, full, kv_head, qk_scale, stride_kt, stride_kh,
                                   stride_vt, stride_vh, False, CAUSAL, BLOCK_N, UPCAST)  # fmt: skip
        acc, m_i, l_i = _fwd_steps(acc, m_i, l_i, q, K, V, start, n, offs_m, offs_n, offs_d,
                                   mask_d, full, hi, kv_head, qk_scale, stride_kt, stride_kh,
                                   stride_vt, stride_vh, True, CAUSAL, BLOCK_N, UPCAST)  # fmt: skip
        l_i = tl.where(mask_m, l_i, 1.0)  # rows past the sequence end: never stored
        out = acc / l_i[:, None]
        tl.store(OUT + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
                 out.to(OUT.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])  # fmt: skip
        tl.store(LSE + head * total + rows, m_i + tl.log2(l_i), mask=mask_m)


@triton.jit
def _q_block(Q, DO, LSE, DELTA, start, n, rows_m, offs_d, mask_d, head, total, stride_qt,
             stride_qh):  # fmt: skip
    """q, dO, lse2 and delta of sequence positions `rows_m` of one q head (past n: zeros)."""
    mask_m = rows_m < n
    q_rows = (start + rows_m).to(tl.int64)
    q = _rows(Q, q_rows, stride_qt, head * stride_qh, offs_d, mask_m, mask_d)
    do = _rows(DO, q_rows, stride_qt, head * stride_qh, offs_d, mask_m, mask_d)
    lse = tl.load(LSE + head * total + q_rows, mask=mask_m, other=0.0)
    delta = tl.load(DELTA + head * total + q_rows, mask=mask_m, other=0.0)
    return q, do, lse, delta


@triton.jit
def _dkdv_steps(dk, dv, k, v, Q, DO, LSE, DELTA, head, start, n, offs_n, offs_m, offs_d, mask_d,
                lo, hi, total, qk_scale, stride_qt, stride_qh, CAUSAL: tl.constexpr,
                BLOCK_M: tl.constexpr, UPCAST: tl.constexpr):  # fmt: skip
    """dK, dV of one key block from the query blocks [lo, hi) of one q head; CAUSAL: drop
    the scores of queries before their key."""
    for m0 in range(lo, hi, BLOCK_M):
        rows_m = m0 + offs_m
        q, do, lse, delta = _q_block(Q, DO, LSE, DELTA, start, n, rows_m, offs_d, mask_d, head,
                                     total, stride_qt, stride_qh)  # fmt: skip
        s_t = dot(k, tl.trans(q), tl.zeros([k.shape[0], BLOCK_M], tl.float32), UPCAST)
        p_t = tl.exp2(s_t * qk_scale - lse[None, :])  # [N, M]
        if CAUSAL:
            p_t = tl.where(rows_m[None, :] >= offs_n[:, None], p_t, 0.0)
        dv = dot(p_t.to(do.dtype), do, dv, UPCAST)
        dp_t = dot(v, tl.trans(do), tl.zeros([k.shape[0], BLOCK_M], tl.float32), UPCAST)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = dot(ds_t.to(q.dtype), q, dk, UPCAST)
    return dk, dv


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
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        offs_n, mask_n, k, v = _kv_block(K, V, start, n, n0 + tl.arange(0, BLOCK_N), offs_d,
                                         mask_d, kv_head, stride_kt, stride_kh, stride_vt,
                                         stride_vh)  # fmt: skip
        kv_rows = (start + offs_n).to(tl.int64)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        # query blocks: [lo, mid) the causal diagonal (masked), [mid, n) queries that see every
        # key of the block. Rows past n need no mask in the scores: they load q = dO = 0 and
        # lse = delta = 0, so they add nothing to dK or dV, and padded keys are never stored.
        if CAUSAL:  # queries before the block's first key see none of it
            lo = n0
            mid = tl.minimum(n0 + tl.cdiv(BLOCK_N, BLOCK_M) * BLOCK_M, n)
        else:
            lo = 0
            mid = 0
        for g in range(GROUP):
            head = kv_head * GROUP + g
            dk, dv = _dkdv_steps(dk, dv, k, v, Q, DO, LSE, DELTA, head, start, n, offs_n,
                                 offs_m, offs_d, mask_d, lo, mid, total, qk_scale, stride_qt,
                                 stride_qh, CAUSAL, BLOCK_M, UPCAST)  # fmt: skip
            dk, dv = _dkdv_steps(dk, dv, k, v, Q, DO, LSE, DELTA, head, start, n, offs_n,
                                 offs_m, offs_d, mask_d, mid, n, total, qk_scale, stride_qt,
                                 stride_qh, False, BLOCK_M, UPCAST)  # fmt: skip
        kv_mask = mask_n[:, None] & mask_d[None, :]
        tl.store(DK + kv_rows[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :],
                 (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)  # fmt: skip
        tl.store(DV + kv_rows[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :],
                 dv.to(DV.dtype.element_ty), mask=kv_mask)  # fmt: skip


@triton.jit
def _dq_steps(dq, q, do, lse, delta, K, V, start, n, offs_m, offs_n, offs_d, mask_d, lo, hi,
              kv_head, qk_scale, stride_kt, stride_kh, stride_vt, stride_vh,
              MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
              UPCAST: tl.constexpr):  # fmt: skip
    """dQ of one query block from the key blocks [lo, hi) (MASKED as in `_fwd_steps`: a key
    past n loads as 0 but its P = 2^-lse2 need not be finite, and inf x 0 is NaN)."""
    for n0 in range(lo, hi, BLOCK_N):
        cols, mask_n, k, v = _kv_block(K, V, start, n, n0 + offs_n, offs_d, mask_d, kv_head,
                                       stride_kt, stride_kh, stride_vt, stride_vh)  # fmt: skip
        s = dot(q, tl.trans(k), tl.zeros([q.shape[0], BLOCK_N], tl.float32), UPCAST)
        p = tl.exp2(s * qk_scale - lse[:, None])
        if MASKED:
            keep = mask_n[None, :]
            if CAUSAL:
                keep = keep & (cols[None, :] <= offs_m[:, None])
            p = tl.where(keep, p, 0.0)
        dp = dot(do, tl.trans(v), tl.zeros([q.shape[0], BLOCK_N], tl.float32), UPCAST)
        ds = p * (dp - delta[:, None])
        dq = dot(ds.to(k.dtype), k, dq, UPCAST)
    return dq


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
        # padded rows (past n) read lse = delta = 0 and q = dO = 0: finite, and never stored
        q, do, lse, delta = _q_block(Q, DO, LSE, DELTA, start, n, offs_m, offs_d, mask_d, head,
                                     total, stride_qt, stride_qh)  # fmt: skip
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        if CAUSAL:  # key ranges as in the forward
            hi = tl.minimum(n, m0 + BLOCK_M)
            full = (m0 // BLOCK_N) * BLOCK_N
        else:
            hi = n
            full = (n // BLOCK_N) * BLOCK_N
        kv_head = head // GROUP
        dq = _dq_steps(dq, q, do, lse, delta, K, V, start, n, offs_m, offs_n, offs_d, mask_d,
                       0, full, kv_head, qk_scale, stride_kt, stride_kh, stride_vt, stride_vh,
                       False, CAUSAL, BLOCK_N, UPCAST)  # fmt: skip
        dq = _dq_steps(dq, q, do, lse, delta, K, V, start, n, offs_m, offs_n, offs_d, mask_d,
                       full, hi, kv_head, qk_scale, stride_kt, stride_kh, stride_vt, stride_vh,
                       True, CAUSAL, BLOCK_N, UPCAST)  # fmt: skip
        tl.store(DQ + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                 (dq * sm_scale).to(DQ.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])  # fmt: skip


def triton_packed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    max_seqlen: int | None = None,
    tiles: tuple[Tiles, BwdTiles] | None = None,
) -> torch.Tensor:
    """Launch the Triton kernels: [N, Hq, D] in q's dtype, differentiable w.r.t. q, k, v.

    max_seqlen sizes the grid; None reads it from cu_seqlens (one device sync). tiles =
    (forward, backward); None takes `default_tiles(head_dim)`.
    """
    check_launchable(_attn_fwd_kernel, q.device)
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    tiles = default_tiles(q.shape[-1]) if tiles is None else tiles
    return _TritonPackedAttention.apply(q, k, v, cu_seqlens, causal, scale, max_seqlen, tiles)


class _TritonPackedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, causal, scale, max_seqlen, tiles):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
        (total, hq, d), hkv = q.shape, k.shape[1]
        fwd = tiles[0]
        o = torch.empty_like(q)
        lse = torch.empty(hq, total, dtype=torch.float32, device=q.device)
        grid = (triton.cdiv(max_seqlen, fwd.m), cu.numel() - 1, hq)
        if total > 0 and max_seqlen > 0:
            _attn_fwd_kernel[grid](
                q, k, v, o, lse, cu, scale * LOG2E, q.stride(0), q.stride(1), k.stride(0),
                k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1), total, d,
                GROUP=hq // hkv, CAUSAL=causal, BLOCK_M=fwd.m, BLOCK_N=fwd.n,
                BLOCK_D=max(16, triton.next_power_of_2(d)), UPCAST=UPCAST_DOT,
                num_warps=fwd.warps,
            )  # fmt: skip
        ctx.save_for_backward(q, k, v, o, lse, cu)
        ctx.causal, ctx.scale, ctx.max_seqlen, ctx.bwd = causal, scale, max_seqlen, tiles[1]
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu = ctx.saved_tensors
        (total, hq, d), hkv = q.shape, k.shape[1]
        bwd = ctx.bwd
        do = do.contiguous()
        delta = (do.float() * o.float()).sum(-1).T.contiguous()  # [Hq, N]
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        if total == 0 or ctx.max_seqlen == 0:
            return dq, dk, dv, None, None, None, None, None
        n_seq = cu.numel() - 1
        meta = dict(
            GROUP=hq // hkv, CAUSAL=ctx.causal, BLOCK_D=max(16, triton.next_power_of_2(d)),
            UPCAST=UPCAST_DOT, num_warps=bwd.warps,
        )  # fmt: skip
        common = (ctx.scale * LOG2E, ctx.scale, q.stride(0), q.stride(1), k.stride(0),
                  k.stride(1), v.stride(0), v.stride(1), total, d)  # fmt: skip
        _attn_bwd_dkdv_kernel[(triton.cdiv(ctx.max_seqlen, bwd.own), n_seq, hkv)](
            q, k, v, do, lse, delta, dk, dv, cu, *common, BLOCK_M=bwd.stream, BLOCK_N=bwd.own,
            **meta,
        )  # fmt: skip
        _attn_bwd_dq_kernel[(triton.cdiv(ctx.max_seqlen, bwd.own), n_seq, hq)](
            q, k, v, do, lse, delta, dq, cu, *common, BLOCK_M=bwd.own, BLOCK_N=bwd.stream,
            **meta,
        )  # fmt: skip
        return dq, dk, dv, None, None, None, None, None
