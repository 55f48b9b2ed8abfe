"""GRPO advantages, the clipped loss and logprobs-from-hidden-states against references."""

from __future__ import annotations

import pytest
import torch

from rlsys.trainer.advantages import grpo
from rlsys.trainer.logprobs import token_logprobs
from rlsys.trainer.losses import aggregate, denominator, policy_loss


def test_grpo_by_hand() -> None:
    # group [1, 0, 0, 1]: mean 0.5, unbiased std sqrt(1/3) = 0.57735 -> +-0.866025
    a = grpo(torch.tensor([[1.0, 0.0, 0.0, 1.0]]), eps=0.0)
    assert torch.allclose(a, torch.tensor([[0.866025, -0.866025, -0.866025, 0.866025]]), atol=1e-5)
    d = grpo(torch.tensor([[3.0, 1.0]]), norm_by_std=False)  # Dr.GRPO: r - mean
    assert d.tolist() == [[1.0, -1.0]]
    assert torch.allclose(grpo(torch.rand(5, 8)).sum(1), torch.zeros(5), atol=1e-5)


def test_grpo_rejects_bad_groups() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        grpo(torch.tensor([[1.0], [0.0]]))
    with pytest.raises(ValueError, match="non-finite"):
        grpo(torch.tensor([[1.0, float("nan")]]))


def test_clipped_loss_by_hand() -> None:
    # ratio e^{0.5}=1.6487 with A=+1 clips at 1.2 -> loss -1.2; ratio e^{-0.5}=0.6065 with
    # A=-1 clips at 0.8 -> min(-0.6065, -0.8) = -0.8 -> loss 0.8; masked token -> 0.
    logp = torch.tensor([[0.5, -0.5, 0.3]])
    old = torch.zeros(1, 3)
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, clipped = policy_loss(logp, old, adv, mask, "clipped", 0.2, 0.2)
    assert torch.allclose(loss, torch.tensor([[-1.2, 0.8, 0.0]]), atol=1e-6)
    assert clipped.tolist() == [[1.0, 1.0, 0.0]]


def test_aggregation_modes_and_micro_batch_split() -> None:
    torch.manual_seed(0)
    loss = torch.randn(4, 6)
    mask = (torch.rand(4, 6) > 0.3).float()
    mask[:, 0] = 1
    loss = loss * mask
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        full = aggregate(loss, mask, mode, denominator(mask, mode))
        den = denominator(mask, mode)
        split = aggregate(loss[:2], mask[:2], mode, den) + aggregate(loss[2:], mask[2:], mode, den)
        assert torch.allclose(full, split, atol=1e-6), mode
    tm = aggregate(loss, mask, "token-mean", denominator(mask, "token-mean"))
    assert torch.allclose(tm, loss.sum() / mask.sum())
    sm = aggregate(loss, mask, "seq-mean-token-mean", denominator(mask, "seq-mean-token-mean"))
    assert torch.allclose(sm, (loss.sum(1) / mask.sum(1)).mean())


def test_token_logprobs_match_full_logits(tiny_model_path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    torch.manual_seed(0)
    ids = torch.randint(5, model.config.vocab_size, (3, 9))
    attn = torch.ones_like(ids)
    attn[2, 7:] = 0  # right padding
    resp = torch.zeros(3, 9)
    resp[:, 4:] = 1
    resp[2, 7:] = 0
    temp = 0.7
    lp, ent = token_logprobs(model, ids, attn, resp, temperature=temp)
    ref_logits = model(input_ids=ids, attention_mask=attn).logits.double() / temp
    ref_lsm = torch.log_softmax(ref_logits[:, :-1], -1)
    ref = ref_lsm.gather(-1, ids[:, 1:, None]).squeeze(-1)
    ref_ent = -(ref_lsm.exp() * ref_lsm).sum(-1)
    m = resp[:, 1:] > 0
    assert torch.allclose(lp[:, 1:][m].double(), ref[m], atol=1e-5)
    assert torch.allclose(ent[:, 1:][m].double(), ref_ent[m], atol=1e-5)
    assert (lp[:, 1:][~m] == 0).all() and (lp[:, 0] == 0).all()
    lp[:, 1:][m].sum().backward()  # differentiable
    assert model.get_output_embeddings().weight.grad.abs().sum() > 0


def test_token_logprobs_module_passes_its_kernel_backend(tiny_model_path, monkeypatch) -> None:
    # trainer.logprob_backend reaches the fused kernel: "torch" gives the auto (CPU) result,
    # "triton" asks for the Triton kernels, which refuse CPU tensors outside the interpreter
    from transformers import AutoModelForCausalLM

    from rlsys.trainer.logprobs import TokenLogprobs

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    ids = torch.randint(
        5, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1)
    )
    attn, resp = torch.ones_like(ids), torch.ones(2, 8)
    auto = TokenLogprobs(model, 0.9, fused=True)(ids, attn, resp)
    torch_ = TokenLogprobs(model, 0.9, fused=True, backend="torch")(ids, attn, resp)
    assert all(torch.equal(a, b) for a, b in zip(auto, torch_, strict=True))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        TokenLogprobs(model, 0.9, fused=True, backend="triton")(ids, attn, resp)
