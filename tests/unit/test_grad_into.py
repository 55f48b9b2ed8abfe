"""Gradient-accumulation fusion (`rlsys/kernels/grad_into.py`): the [V, H] embedding and LM-head
gradients added straight into `.grad` equal autograd's, over several micro-batches, for tied
and untied vocabularies.

Tolerances: float64 pieces are exact sums in another order (1e-12); the fp32 models differ
only in the order the vocabulary gradients' fp32 contributions are summed (~1e-7 relative of
the largest entry) -> 1e-5 (testing.assert_close, relative to the largest |expected|).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rlsys.kernels.grad_into import embedding_grad_into, fuse_embedding_grad
from rlsys.kernels.logprob import chunked_logprob_entropy
from rlsys.kernels.reference import logprob_entropy_ref
from rlsys.kernels.testing import assert_close


def test_embedding_grad_into_equals_autograd_with_padding_and_repeats() -> None:
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(50, 8, generator=g, dtype=torch.float64)
    ids = [torch.randint(0, 50, (3, 17), generator=g) for _ in range(2)]
    ids[0][0, :4] = 7  # repeated ids add up
    ids[1][1, :5] = 3  # the padding id gets no gradient
    up = [torch.randn(3, 17, 8, generator=g, dtype=torch.float64) for _ in range(2)]
    ref = w0.clone().requires_grad_()
    fused = w0.clone().requires_grad_()
    for x, u in zip(ids, up, strict=True):  # two micro-batches: create, then accumulate
        (F.embedding(x, ref, padding_idx=3) * u).sum().backward()
        out = embedding_grad_into(x, fused, 3)
        assert torch.equal(out, F.embedding(x, w0, padding_idx=3))
        (out * u).sum().backward()
    assert fused.grad is not None and ref.grad is not None
    assert ref.grad[3].abs().sum() == 0 and ref.grad[7].abs().sum() > 0
    assert_close(fused.grad, ref.grad, 1e-12, "embedding grad")


def test_logprob_grad_into_accumulates_the_reference_weight_gradient() -> None:
    """Two calls (micro-batches) with grad_into: weight.grad = the sum of the float64
    reference's weight gradients; hidden gradients come back through autograd as before."""
    g = torch.Generator().manual_seed(1)
    w = (0.3 * torch.randn(300, 40, generator=g)).requires_grad_()
    expected_w = torch.zeros(300, 40, dtype=torch.float64)
    for t in (37, 5):
        h = torch.randn(t, 40, generator=g).requires_grad_()
        y = torch.randint(0, 300, (t,), generator=g)
        g_lp, g_ent = torch.randn(t, generator=g), torch.randn(t, generator=g)
        lp, ent = chunked_logprob_entropy(h, w, y, 0.7, 16, 64, grad_into=True)
        (lp * g_lp + ent * g_ent).sum().backward()
        h64 = h.detach().double().requires_grad_()
        w64 = w.detach().double().requires_grad_()
        lp64, ent64 = logprob_entropy_ref(h64, w64, y, 0.7)
        (lp64 * g_lp.double() + ent64 * g_ent.double()).sum().backward()
        expected_w += w64.grad
        assert_close(h.grad, h64.grad, 2e-5, f"hidden grad, T={t}")
    assert_close(w.grad, expected_w, 2e-5, "weight grad")


def test_logprob_grad_into_rejects_a_non_leaf_or_low_precision_weight() -> None:
    h, y = torch.randn(4, 8), torch.randint(0, 20, (4,))
    w = torch.randn(20, 8, requires_grad=True)
    with pytest.raises(ValueError, match="leaf"):
        chunked_logprob_entropy(h, w * 2, y, grad_into=True)
    with pytest.raises(ValueError, match="float32"):
        chunked_logprob_entropy(h, w.detach().bfloat16().requires_grad_(), y, grad_into=True)


def test_fuse_embedding_grad_rejects_max_norm() -> None:
    with pytest.raises(ValueError, match="plain embeddings"):
        fuse_embedding_grad(nn.Embedding(10, 4, max_norm=1.0))


def _grads(path: str, fuse: bool, batches) -> dict[str, torch.Tensor]:
    """Every parameter's gradient after the micro-batches' backward passes (fp32)."""
    from transformers import AutoModelForCausalLM

    from rlsys.trainer.logprobs import TokenLogprobs, fuse_vocab_grads

    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    module = TokenLogprobs(lm, temperature=0.9, fused=True)
    if fuse:
        assert fuse_vocab_grads(module, lm) and module.grad_into
    for ids, mask, resp, coef in batches:
        logp, ent = module(ids, mask, resp)
        ((logp * coef).sum() + 0.01 * (ent * resp).sum()).backward()
    return {n: p.grad.clone() for n, p in lm.named_parameters()}


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3"])  # tied, untied vocabulary
def test_fused_vocab_grads_equal_autograd_on_a_model(name: str) -> None:
    from rlsys import models

    path = models.resolve(name)
    g = torch.Generator().manual_seed(2)
    batches = []
    for rows in (3, 2):  # two micro-batches: the second adds into existing gradients
        ids = torch.randint(1, 512, (rows, 20), generator=g)
        mask = torch.ones(rows, 20, dtype=torch.long)
        mask[0, 15:] = 0  # a padded row
        resp = torch.zeros(rows, 20)
        resp[:, 8:] = 1.0
        resp *= mask
        batches.append((ids, mask, resp, torch.randn(rows, 20, generator=g) * resp))
    ref = _grads(path, False, batches)
    got = _grads(path, True, batches)
    assert ref.keys() == got.keys()
    emb = "model.embed_tokens.weight"
    assert ref[emb].abs().max() > 0
    for n in ref:
        assert_close(got[n], ref[n], 1e-5, n)


def test_ppo_trainer_step_is_the_same_with_and_without_the_fusion(
    tiny_model_path, synthetic_groups
) -> None:
    """The trainer fuses the policy's and the critic's vocabulary gradients by default (stage 0,
    fp32); a PPO step (two mini-batches of several micro-batches, gradient checkpointing)
    matches the unfused one: losses and gradient norm to fp32 summation order, and the updated
    policy and critic weights (AdamW's first steps move each weight by ~lr * sign(g): see
    test_trainer_step for why a few weights may differ by more than 1e-6)."""
    from rlsys.config import load_recipe, to_dict
    from rlsys.trainer.worker import TrainerWorker

    runs = []
    for fuse in (False, True):
        cfg = load_recipe(
            None,
            [
                "model.path=tiny-llama",
                "trainer.autocast_bf16=false",
                "trainer.lr=1e-3",
                "trainer.mini_batches=2",
                "trainer.micro_batch_tokens=40",
                "trainer.gradient_checkpointing=true",
                "algorithm.advantage=gae",
                "algorithm.critic.lr=1e-3",
                f"trainer.vocab_grad_fusion={str(fuse).lower()}",
            ],
        )
        w = TrainerWorker(to_dict(cfg), tiny_model_path)
        assert w.policy.module.grad_into is fuse
        emb = w.critic.module.backbone.get_input_embeddings()
        assert ("forward" in vars(emb)) is fuse  # the critic's embedding is routed too
        m = w.train_step(synthetic_groups())
        flat = [
            torch.cat([p.detach().flatten() for p in e.module.parameters()])
            for e in (w.policy, w.critic)
        ]
        runs.append((m, flat))
    (m0, p0), (m1, p1) = runs
    assert m0["train/micro_batches"] >= 2  # per mini-batch: gradients accumulate
    for k in ("train/loss", "train/grad_norm", "train/value_loss"):
        assert m1[k] == pytest.approx(m0[k], rel=1e-5, abs=1e-7), k
    for a, b in zip(p0, p1, strict=True):
        d = (a - b).abs()
        assert d.max().item() < 3e-5
        assert int((d > 1e-6).sum()) <= 20
