"""Attention over packed sequences: the trainer's varlen attention.

Tokens of n sequences are concatenated into one [N, heads, head_dim] batch with no padding;
cu_seqlens [n+1] int32 (0, l_0, l_0 + l_1, ..., N) marks where each starts. Query i attends
key j only inside its own sequence (and j <= i when causal): a block-diagonal causal mask.
GQA: k and v carry Hkv heads with Hkv | Hq; q head h reads kv head h // (Hq / Hkv).

Backends: the Triton FlashAttention-2 kernel (`attention_triton.py`), which visits only the
diagonal blocks; on CPU (and as `backend="torch"`) `grouped_attention`: the sequences sorted by
length in groups of similar length, each group right-padded to its longest and run as one
batched causal SDPA (`is_causal`, no mask), so the cost is that of the diagonal blocks plus
at most `PAD_SLACK` - 1 of padding. PyTorch SDPA over the dense block-diagonal mask
(`reference.py`) computes all N^2 scores: it is the reference and the baseline in
`benchmarks/kernels.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlsys.kernels.backend import resolve

# A group's padded size may be this many times its real tokens (the native engine's prefill
# groups the same way).
PAD_SLACK = 1.5
# CPU SDPA (flash kernel) forward + backward, [4096 / L rows, 9 q / 3 kv heads, L, 64], 2
# threads, ms, fp32 vs bf16: L=32 5.8 vs 24.1, 64 8.1 vs 24.5, 128 13.3 vs 26.3, 256 21.1 vs
# 19.5, 512 35.3 vs 25.2. Shorter bf16/fp16 groups run in fp32 on CPU (cast in and out).
CPU_LOWP_MIN_LEN = 256


def packed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    causal: bool = True,
    backend: str = "auto",
    scale: float | None = None,
    max_seqlen: int | None = None,
) -> torch.Tensor:
    """softmax(scale q k^T + block-diagonal (causal) mask) v for packed sequences.

    q [N, Hq, D], k/v [N, Hkv, D], cu_seqlens [n+1] int32 with cu_seqlens[-1] = N ->
    [N, Hq, D] in q's dtype. scale defaults to 1/sqrt(D); max_seqlen (Triton grid size)
    is read from cu_seqlens when not given. backend: "auto" (Triton on CUDA, grouped SDPA on
    CPU), "triton" or "torch".
    """
    _check(q, k, v, cu_seqlens)
    if resolve(backend, q.device) == "triton":
        from rlsys.kernels.attention_triton import triton_packed_attention

        return triton_packed_attention(q, k, v, cu_seqlens, causal, scale, max_seqlen)
    return grouped_attention(q, k, v, cu_seqlens, causal, scale)


def length_groups(lengths: list[int], slack: float = PAD_SLACK) -> list[list[int]]:
    """Indices of `lengths` in groups of similar length, longest first: a sequence joins the
    current group while (members + 1) x the group's first (longest) length stays within
    `slack` x the group's real tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    real = 0
    for i in order:
        n = lengths[i]
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= slack * (real + n):
            groups[-1].append(i)
            real += n
        else:
            groups.append([i])
            real = n
    return groups


def _attention_dtype(q: torch.Tensor) -> torch.dtype:
    """What SDPA would compute in here: the autocast dtype inside an autocast region."""
    if torch.is_autocast_enabled(q.device.type) and q.dtype == torch.float32:
        return torch.get_autocast_dtype(q.device.type)
    return q.dtype


def grouped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
) -> torch.Tensor:
    """`packed_attention` by batched SDPA over length groups (module docstring); gradients
    are SDPA's own.

    Every token has one slot in a flat padded layout: group after group, each group c rows
    of its longest length P, [c, P] row-major; the layout's other slots are zero padding.
    q, k and v move to their slots, each group is one [c, heads, P, D] SDPA, and the outputs
    move back (`_ToSlots` / `_FromSlots`: one index copy each way, forward and backward).
    Right padding with `is_causal` keeps every real query off the padded keys (they come
    after it), and without `causal` a key mask does. Padded query rows are computed and
    dropped."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    groups = [g for g in length_groups(lengths) if lengths[g[0]] > 0]
    if not groups:
        return q.new_zeros(q.shape)
    # each sequence's first slot; token t of sequence i goes to slot base[i] + (t - start[i])
    base = [0] * len(lengths)
    shapes, n_slots = [], 0
    for group in groups:
        width = lengths[group[0]]
        for row, i in enumerate(group):
            base[i] = n_slots + row * width
        shapes.append((len(group), width))
        n_slots += len(group) * width
    shift = torch.tensor(base, dtype=torch.long) - cu_seqlens[:-1].long().cpu()
    slot = (torch.arange(q.shape[0]) + shift.repeat_interleave(torch.tensor(lengths))).to(q.device)
    qs, ks, vs = (_ToSlots.apply(x, slot, n_slots) for x in (q, k, v))
    dt_sdpa = _attention_dtype(q)
    upcast_short = q.device.type == "cpu" and dt_sdpa != torch.float32
    outs, off = [], 0
    for group, (c, width) in zip(groups, shapes, strict=True):
        dt = torch.float32 if upcast_short and width < CPU_LOWP_MIN_LEN else dt_sdpa
        qg, kg, vg = (
            x[off : off + c * width].view(c, width, *x.shape[1:]).transpose(1, 2).to(dt)
            for x in (qs, ks, vs)
        )  # [c, H, P, D]
        mask = None
        if not causal:  # keys past each row's length are padding
            lens = torch.tensor([lengths[i] for i in group], device=q.device)
            mask = (torch.arange(width, device=q.device) < lens[:, None])[:, None, None, :]
        with torch.autocast(q.device.type, enabled=False):  # autocast would recast to bf16
            o = F.scaled_dot_product_attention(
                qg, kg, vg, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True
            )
        outs.append(o.transpose(1, 2).reshape(c * width, *q.shape[1:]).to(q.dtype))
        off += c * width
    return _FromSlots.apply(torch.cat(outs), slot)


class _ToSlots(torch.autograd.Function):
    """x [N, ...] -> [S, ...]: row i to slot[i] (distinct slots), the other S - N rows zero."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, slot: torch.Tensor, n_slots: int) -> torch.Tensor:
        ctx.save_for_backward(slot)
        return x.new_zeros((n_slots, *x.shape[1:])).index_copy_(0, slot, x)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (slot,) = ctx.saved_tensors
        return g.index_select(0, slot), None, None


class _FromSlots(torch.autograd.Function):
    """y [S, ...] -> [N, ...]: row i from slot[i]; the inverse of `_ToSlots`."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(slot)
        ctx.n_slots = y.shape[0]
        return y.index_select(0, slot)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (slot,) = ctx.saved_tensors
        return g.new_zeros((ctx.n_slots, *g.shape[1:])).index_copy_(0, slot, g), None


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor) -> None:
    if q.dim() != 3 or k.shape != v.shape or k.dim() != 3:
        raise ValueError(
            f"expected q [N, Hq, D], k = v [N, Hkv, D]; got {q.shape}, {k.shape}, {v.shape}"
        )
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError("q, k and v need the same token count and head_dim")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"kv heads ({k.shape[1]}) must divide q heads ({q.shape[1]}) for GQA")
    if cu.dim() != 1 or cu.numel() < 2 or cu.dtype not in (torch.int32, torch.int64):
        raise ValueError("cu_seqlens must be a 1-D int32 tensor of n+1 offsets, n >= 1")
