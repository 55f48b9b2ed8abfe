"""The trainer's attention for packed micro-batches, plugged into transformers' models.

A packed micro-batch is one row of several samples back to back (`buffer/packing.py`). The
model is loaded with attention implementation `rlsys_packed` (registered here with
transformers' `AttentionInterface`): a forward that carries `cu_seq_lens_q` (the standard
varlen keyword transformers passes down to every attention call) runs
`rlsys.kernels.packed_attention` on it, which attends inside each sample only: the Triton
varlen kernel on a GPU, length-grouped batched SDPA on CPU. Either way the cost is that of
the diagonal blocks, not of the row's full L x L scores that SDPA with the dense
block-diagonal mask computes (and then throws away); on the default model's 2048-token rows
that was half of a trainer step. Any other forward (padded micro-batches, no `cu_seq_lens_q`)
is transformers' own SDPA with its mask, unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

NAME = "rlsys_packed"


def packed_sdpa_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: query [B, Hq, L, D], key/value
    [B, Hkv, L, D] -> ([B, L, Hq, D], None). With `cu_seq_lens_q` (packed, B = 1): causal
    attention inside each of the row's samples; otherwise transformers' SDPA forward."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    from rlsys.kernels import packed_attention

    if query.shape[0] != 1 or dropout:
        raise ValueError("packed attention takes one packed row per forward and no dropout")
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [N, H, D]
    out = packed_attention(
        q, k, v, cu, causal=True, scale=scaling, max_seqlen=kwargs.get("max_length_q")
    )
    return out.unsqueeze(0), None


def use_packed_attention(model: nn.Module) -> nn.Module:
    """Register `rlsys_packed` (once per process) and switch `model` to it; returns it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, packed_sdpa_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # the padded path keeps SDPA's masks
    model.set_attn_implementation(NAME)
    return model


def varlen_kwargs(cu_seqlens: torch.Tensor | None) -> dict:
    """The keywords a model forward passes down to `packed_sdpa_forward` (none if unpacked)."""
    if cu_seqlens is None:
        return {}
    longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return dict(
        cu_seq_lens_q=cu_seqlens,
        cu_seq_lens_k=cu_seqlens,
        max_length_q=longest,
        max_length_k=longest,
    )
