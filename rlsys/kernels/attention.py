"""Attention over packed sequences: the trainer's varlen attention.

Tokens of n sequences are concatenated into one [N, heads, head_dim] batch with no padding;
cu_seqlens [n+1] int32 (0, l_0, l_0 + l_1, ..., N) marks where each starts. Query i attends
key j only inside its own sequence (and j <= i when causal): a block-diagonal causal mask.
GQA: k and v carry Hkv heads with Hkv | Hq; q head h reads kv head h // (Hq / Hkv).

Backends: the Triton FlashAttention-2 kernel (`attention_triton.py`), which visits only the
diagonal blocks; and PyTorch SDPA with a dense block-diagonal mask (`reference.py`), the
fallback on CPU and the baseline in `benchmarks/kernels.py`.
"""

from __future__ import annotations

import torch

from rlsys.kernels.backend import resolve
from rlsys.kernels.reference import packed_attention_ref


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
    is read from cu_seqlens when not given. backend: "auto" (Triton on CUDA, SDPA on CPU),
    "triton" or "torch".
    """
    _check(q, k, v, cu_seqlens)
    if resolve(backend, q.device) == "triton":
        from rlsys.kernels.attention_triton import triton_packed_attention

        return triton_packed_attention(q, k, v, cu_seqlens, causal, scale, max_seqlen)
    return packed_attention_ref(q, k, v, cu_seqlens, causal, scale)


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
