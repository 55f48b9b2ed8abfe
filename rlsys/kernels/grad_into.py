"""Gradient-accumulation fusion for the vocabulary-sized weights ([V, H] embedding, LM head).

Autograd hands a leaf its gradient once, after every use of the leaf has contributed, and
each contribution is a full-size tensor. For the [V, H] vocabulary weights that costs:

- a tied embedding (SmolLM2, Qwen2.5 <= 3B, Llama 3.2): the LM head's [V, H] gradient is
  computed at the start of backward and waits in autograd's input buffer until the input
  embedding's contribution arrives at the very end, through the whole backward;
- the embedding's own backward builds a dense [V, H] gradient from its [T, H] rows before
  autograd adds it into `.grad`.

Megatron-LM's `gradient_accumulation_fusion` writes such gradients straight into the
parameter's gradient buffer instead; so does this module: `grad_buffer` is the weight's
`.grad` (created as zeros on the first micro-batch), the fused logprob backward
(`fused_logprob_entropy(..., grad_into=True)`) adds into it (chunked torch: vocabulary chunk
by chunk; Triton: its fp32 atomics, with no bf16 round trip of dW under autocast), and
`embedding_grad_into` adds its rows (`index_add_`), returning no gradient to autograd. The
sum is the same; only the fp32 summation order of the contributions changes. Saving: one
[V, H] gradient at the micro-batch's peak (49,152 x 576 fp32 = 108 MiB for SmolLM2-135M;
0.93 GB for a 151,936 x 1,536 vocabulary).

Only valid where nothing else watches the weight's gradient: DeepSpeed ZeRO stages 1-3 and
its bf16 optimizer reduce or copy gradients in hooks on autograd's accumulation, which a
direct write bypasses, so the trainer uses it at stage 0 with fp32 weights only
(`trainer.vocab_grad_fusion`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def grad_buffer(weight: torch.Tensor) -> torch.Tensor:
    """`weight.grad`, created as zeros if absent: the buffer a fused backward adds into."""
    if not (weight.is_leaf and weight.requires_grad):
        raise ValueError("grad_into needs a leaf weight that requires grad (a parameter)")
    if weight.grad is None:
        weight.grad = torch.zeros_like(weight)
    return weight.grad


def embedding_grad_into(
    ids: torch.Tensor, weight: torch.Tensor, padding_idx: int | None = None
) -> torch.Tensor:
    """`F.embedding(ids, weight, padding_idx)` whose backward adds dL/dweight into
    `weight.grad` row by row, dL/dW[v] += sum_{t: ids_t = v, v != padding_idx} dL/dout_t,
    without building the dense [V, H] gradient; autograd receives no gradient for `weight`."""
    return _EmbeddingGradInto.apply(ids, weight, padding_idx)


class _EmbeddingGradInto(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight, padding_idx):
        ctx.save_for_backward(ids, weight)
        ctx.padding_idx = padding_idx
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, g):
        ids, weight = ctx.saved_tensors
        idx = ids.reshape(-1)
        rows = g.reshape(idx.numel(), -1).to(weight.dtype)
        if ctx.padding_idx is not None:
            keep = idx != ctx.padding_idx
            idx, rows = idx[keep], rows[keep]
        grad_buffer(weight).index_add_(0, idx, rows)
        return None, None, None


def fuse_embedding_grad(embedding: nn.Embedding) -> None:
    """Route `embedding`'s forward through `embedding_grad_into` (its hooks still run)."""
    if embedding.max_norm is not None or embedding.scale_grad_by_freq or embedding.sparse:
        raise ValueError("embedding_grad_into supports plain embeddings only")
    embedding.forward = lambda ids: embedding_grad_into(
        ids, embedding.weight, embedding.padding_idx
    )
