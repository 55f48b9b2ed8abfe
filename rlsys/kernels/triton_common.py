"""Pieces shared by the Triton kernels (imports triton; only the *_triton modules use it)."""

from __future__ import annotations

import triton
import triton.language as tl

from rlsys.kernels.backend import interpreting

# The interpreter multiplies bfloat16 bit patterns in tl.dot (triton-lang/triton#11584,
# "we just don't support it yet"): under TRITON_INTERPRET=1 the operands are cast to fp32
# first. bf16 -> fp32 is exact and tl.dot accumulates in fp32 either way, so this computes
# the same products as the GPU's bf16 MMA, only slower.
UPCAST_DOT = interpreting()


@triton.jit
def dot(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b with fp32 accumulation. fp32 operands use "ieee" products on the GPU, not
    the tf32 default (10-bit mantissa: ~1e-3 relative error on logits of O(10), which moves
    log-ratios by ~1e-2); bf16/fp16 operands take the tensor-core path unchanged. Operands
    of two dtypes (bf16 hidden states with an fp32 LM head) are both taken to fp32: tl.dot
    takes one dtype, and the compiler rejects the pair (the interpreter would not)."""
    if UPCAST or a.dtype != b.dtype:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if a.dtype == tl.float32:  # decided at compile time
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc
