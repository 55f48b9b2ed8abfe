"""Per-token logprobs of a batch under the policy, from hidden states.

The LM head is applied only at positions whose next token is a response token, so the
[tokens x vocab] logits cover response tokens only (not prompts or padding):

    logp_t = log_softmax(W h_{t-1} / T)[x_t],   H_t = -sum_v p_v log p_v   (entropy, no grad)
"""

from __future__ import annotations

import torch
from torch import nn


def token_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    temperature: float = 1.0,
    position_ids: torch.Tensor | None = None,
    fused: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    grad_into: bool = False,
    backend: str = "auto",
    token_loss=None,
) -> tuple[torch.Tensor, ...]:
    """Returns (logp, entropy), each [B, L] with values at response positions, 0 elsewhere.
    `attention_mask` is a [B, L] padding mask, or a [B, 1, L, L] boolean mask for packed rows
    (then `position_ids` must restart per sample). `fused` computes the LM head, log-softmax
    and entropy chunk by chunk (`rlsys.kernels.fused_logprob_entropy`: cuBLAS + Triton on GPU,
    chunked torch on CPU), never holding the [N, V] logits; entropy then carries a gradient.
    `cu_seqlens` (packed rows): the samples' offsets, for a model on the `rlsys_packed`
    attention (`trainer/attention.py`), which then ignores the dense mask. `grad_into`
    (with `fused`): the LM head's weight gradient goes straight into its `.grad`
    (`rlsys.kernels.grad_into`). `backend`: the fused kernel's (`fused_logprob_entropy`).

    `token_loss(idx, logp, entropy) -> scalar` (with `fused`; a sum of per-token terms, see
    `rlsys.kernels.head_loss`): the loss of the response tokens at flat positions `idx` of the
    [B, L] layout given their logp and entropy [n]. Then the LM head computes the loss's
    gradient in its forward, and the result is (logp, entropy, loss): loss differentiable,
    logp and entropy not."""
    from rlsys.trainer.attention import varlen_kwargs

    if position_ids is None:
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    hidden = model.get_decoder()(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        **varlen_kwargs(cu_seqlens),
    ).last_hidden_state  # [B, L, H]
    sel = response_mask[:, 1:] > 0  # next token is a response token
    h = hidden[:, :-1][sel]  # [N, H]
    targets = input_ids[:, 1:][sel]  # [N]
    loss = None
    if token_loss is not None:
        if not fused:
            raise ValueError("token_loss needs fused=True")
        from rlsys.kernels.head_loss import fused_head_loss

        b, length = response_mask.shape
        flat = torch.arange(b * length, device=h.device).view(b, length)[:, 1:][sel]  # [N]
        loss, lp, ent = _as_forward(
            model.get_output_embeddings(),
            lambda w: fused_head_loss(
                h,
                w,
                targets,
                lambda rows, lp_c, ent_c: token_loss(flat[rows], lp_c, ent_c),
                temperature,
                backend,  # auto, hybrid or torch (the all-Triton kernels have no fused loss)
                grad_into,
            ),
        )
    elif fused:
        from rlsys.kernels import fused_logprob_entropy

        head = model.get_output_embeddings()
        lp, ent = _as_forward(
            head,
            lambda w: fused_logprob_entropy(
                h, w, targets, temperature, backend=backend, grad_into=grad_into
            ),
        )
    else:
        logits = model.get_output_embeddings()(h).float() / temperature  # [N, V]
        logsm = torch.log_softmax(logits, dim=-1)
        lp = logsm.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        ent = -(logsm.exp() * logsm).sum(-1)
    logp = torch.zeros(response_mask.shape, dtype=lp.dtype, device=lp.device)
    entropy = torch.zeros_like(logp)
    logp[:, 1:][sel] = lp
    entropy[:, 1:][sel] = ent
    return (logp, entropy) if loss is None else (logp, entropy, loss)


def _as_forward(module: torch.nn.Module, fn):
    """fn(module.weight), run as `module`'s forward so that the hooks around the module's
    forward and backward still fire: DeepSpeed ZeRO-3 gathers the sharded weight there (and
    releases it after), which a direct read of `module.weight` would bypass."""
    module.forward = lambda: fn(module.weight)
    try:
        return module()
    finally:
        del module.forward


class TokenLogprobs(nn.Module):
    """`token_logprobs` of the wrapped causal LM as one module forward, so that an engine
    wrapping this module (DeepSpeed) sees each micro-batch as one top-level forward: its
    per-forward bookkeeping (ZeRO-3 gathers, gradient-accumulation counters) runs."""

    def __init__(
        self, lm: nn.Module, temperature: float, fused: bool, backend: str = "auto"
    ) -> None:
        super().__init__()
        self.lm = lm
        self.temperature = temperature
        self.fused = fused
        self.backend = backend
        self.grad_into = False  # set by `fuse_vocab_grads`

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        response_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        token_loss=None,
    ) -> tuple[torch.Tensor, ...]:
        return token_logprobs(
            self.lm,
            input_ids,
            attention_mask,
            response_mask,
            self.temperature,
            position_ids,
            self.fused,
            cu_seqlens,
            self.grad_into,
            self.backend,
            token_loss,
        )


def fuse_vocab_grads(module: nn.Module, lm: nn.Module) -> bool:
    """Send `lm`'s input-embedding gradient, and with `module` a fused `TokenLogprobs` also
    the LM head's, straight into `.grad` (`rlsys.kernels.grad_into`). The caller checks that
    nothing hooks gradient accumulation (ZeRO stage 0, fp32 weights). Returns whether
    anything was fused."""
    from rlsys.kernels.grad_into import fuse_embedding_grad

    emb = lm.get_input_embeddings()
    if not isinstance(emb, nn.Embedding) or emb.weight.dtype != torch.float32:
        return False
    fuse_embedding_grad(emb)
    if isinstance(module, TokenLogprobs) and module.fused:
        module.grad_into = lm.get_output_embeddings().weight.dtype == torch.float32
    return True
