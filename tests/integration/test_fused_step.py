"""End to end: a training step's loss and gradients with the fused logprob/entropy path equal
the naive path's on the default model (fp32); so do those of the path the trainer runs at ZeRO
stage 0, with the embedding and LM-head gradients added straight into `.grad`
(`rlsys/kernels/grad_into.py`)."""

from __future__ import annotations

import pytest
import torch

from rlsys.kernels.grad_into import fuse_embedding_grad
from rlsys.trainer.logprobs import token_logprobs
from rlsys.trainer.losses import policy_loss, token_weights

pytestmark = pytest.mark.slow
# fp32: both paths do the same fp32 math, chunked vs whole, so only summation order differs.
# Measured (relative L2 error per parameter tensor): 1.2e-5 on the tied embedding / LM head,
# up to 1.3e-4 on layer-norm weights (sums over all tokens with heavy cancellation). A wrong
# kernel (e.g. a missing entropy gradient) gives errors of order 1e-1 to 1.
RTOL = 5e-4


def test_fused_step_matches_naive_on_default_model(smollm_path: str) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm_path, dtype=torch.float32)
    torch.manual_seed(0)
    b, width = 3, 24
    ids = torch.randint(100, 40000, (b, width))
    attn = torch.ones_like(ids)
    attn[1, 17:] = 0
    resp = attn.float().clone()
    resp[:, :6] = 0
    adv = torch.randn(b, width)
    out = []
    for fused, into in ((False, False), (True, False), (True, True)):
        model.zero_grad(set_to_none=True)
        if into:  # from here on the embedding's gradient goes straight into .grad
            fuse_embedding_grad(model.get_input_embeddings())
        logp, ent = token_logprobs(model, ids, attn, resp, 0.9, fused=fused, grad_into=into)
        tok, _ = policy_loss(logp, logp.detach() + 0.05, adv, resp, "clipped", 0.2, 0.28)
        tok = tok - 0.01 * ent * resp  # entropy bonus: its gradient goes through the kernel
        loss = (tok * token_weights(resp, "token-mean")).sum()
        loss.backward()
        grads = {
            n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None
        }
        out.append((loss.detach(), logp.detach(), ent.detach(), grads))
    (l0, lp0, e0, g0) = out[0]
    for l1, lp1, e1, g1 in out[1:]:
        assert torch.allclose(l0, l1, rtol=1e-6, atol=1e-7)
        assert (lp0 - lp1).abs().max() < 1e-4 and (e0 - e1).abs().max() < 1e-4
        assert g0.keys() == g1.keys() and "model.embed_tokens.weight" in g0
        rel = {n: float((g0[n] - g1[n]).norm() / g0[n].norm().clamp(min=1e-30)) for n in g0}
        assert rel["model.embed_tokens.weight"] < 1e-4
        for name, r in rel.items():
            assert r <= RTOL, (name, r)
    # grad_into changes only the order of the tied weight's fp32 sums: to fp32 round-off
    g1, g2 = out[1][3], out[2][3]
    for n in g1:
        assert float((g1[n] - g2[n]).norm() / g1[n].norm()) < 1e-6, n
