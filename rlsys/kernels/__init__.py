"""Fused kernels for the trainer (issue 9).

| entry                    | what                                             | CPU path          |
| ------------------------ | ------------------------------------------------ | ----------------- |
| `fused_logprob_entropy`  | LM head + log-softmax gather + entropy, no [T, V] | chunked torch     |
| `fused_head_loss`        | the same + a per-token loss, gradient in forward | torch row chunks  |
| `fused_policy_loss`      | clipped / dual-clip PG + k3 KL + entropy, agg.   | fused torch       |
| `packed_attention`       | varlen causal attention over cu_seqlens, GQA     | length-grouped SDPA |

Each has Triton kernels + launcher + autograd.Function (`*_triton.py`, `logprob_hybrid.py`;
used on CUDA; on CPU only under TRITON_INTERPRET=1, for tests; `fused_head_loss` uses the
hybrid path's row kernels), one torch reference in `reference.py` shared by
tests, benchmarks and fallbacks, and `benchmarks/kernels.py` figures in benchmarks/RESULTS.md.
Importing this package does not import triton.
"""

from rlsys.kernels.attention import packed_attention
from rlsys.kernels.head_loss import fused_head_loss
from rlsys.kernels.logprob import fused_logprob_entropy
from rlsys.kernels.loss import fused_policy_loss, token_weights
from rlsys.kernels.reference import PolicyLoss

__all__ = [
    "PolicyLoss",
    "fused_head_loss",
    "fused_logprob_entropy",
    "fused_policy_loss",
    "packed_attention",
    "token_weights",
]
