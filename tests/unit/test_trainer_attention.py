"""The trainer's packed attention (`rlsys_packed`) inside transformers' models: a packed row
with `cu_seqlens` gives each sample what it gets alone, through the grouped path in every layer
(not the dense L x L mask); rows without `cu_seqlens` are transformers' SDPA, unchanged. fp32,
tolerance 1e-5 (different summation orders of the same fp32 attention)."""

from __future__ import annotations

import pytest
import torch

from rlsys import models
from rlsys.buffer.packing import packed_micro_batch
from rlsys.trainer.attention import NAME, use_packed_attention
from rlsys.trainer.logprobs import token_logprobs


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-qwen3"])
def model_pair(request):
    from transformers import AutoModelForCausalLM

    path = models.resolve(request.param)
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    packed = use_packed_attention(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
    return plain, packed.eval()


def test_packed_row_equals_each_sample_alone(model_pair, monkeypatch) -> None:
    import rlsys.kernels.attention as attention

    plain, packed = model_pair
    assert packed.config._attn_implementation == NAME
    calls = []
    grouped = attention.grouped_attention
    monkeypatch.setattr(
        attention, "grouped_attention", lambda *a, **k: calls.append(1) or grouped(*a, **k)
    )
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([7, 19, 3, 19, 11])
    ids = torch.randint(3, plain.config.vocab_size, (5, 19), generator=g)
    mb = packed_micro_batch(lengths, list(range(5)), ids)
    assert mb.cu_seqlens.tolist() == [0, 7, 26, 29, 48, 59]
    resp = torch.ones_like(mb.input_ids)
    lp, ent = token_logprobs(
        packed,
        mb.input_ids,
        mb.attention_mask,
        resp,
        0.8,
        mb.position_ids,
        cu_seqlens=mb.cu_seqlens,
    )
    assert len(calls) == plain.config.num_hidden_layers  # every layer took the grouped path
    for i, n in enumerate(lengths.tolist()):
        start = int(mb.cu_seqlens[i])
        alone = ids[i : i + 1, :n]
        ref_lp, ref_ent = token_logprobs(
            plain, alone, torch.ones_like(alone), torch.ones_like(alone), 0.8
        )
        torch.testing.assert_close(lp[0, start + 1 : start + n], ref_lp[0, 1:], atol=1e-5, rtol=0)
        torch.testing.assert_close(ent[0, start + 1 : start + n], ref_ent[0, 1:], atol=1e-5, rtol=0)


def test_rows_without_cu_seqlens_are_plain_sdpa(model_pair) -> None:
    """A padded micro-batch (2-D mask, no cu_seqlens) on the rlsys_packed model: the same
    logprobs as the stock SDPA model, padding masked as before."""
    plain, packed = model_pair
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, plain.config.vocab_size, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    mask[2, 5:] = 0
    resp = mask.clone()
    a = token_logprobs(plain, ids, mask, resp, 1.0)
    b = token_logprobs(packed, ids, mask, resp, 1.0)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x * resp, y * resp, atol=1e-6, rtol=0)


def test_grouped_attention_gradients_match_the_dense_reference() -> None:
    """fp32 forward and backward of the CPU grouped path against SDPA with the dense
    block-diagonal mask, causal and not, GQA, lengths from 1 to 64 (several groups)."""
    from rlsys.kernels.attention import grouped_attention, length_groups
    from rlsys.kernels.reference import packed_attention_ref

    lengths = [5, 1, 37, 12, 12, 40, 3, 64, 2]
    assert len(length_groups(lengths)) > 2
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    n = int(cu[-1])
    g = torch.Generator().manual_seed(2)
    for causal in (True, False):
        leaves = [torch.randn(n, h, 16, generator=g).requires_grad_() for h in (6, 2, 2)]
        grad_out = torch.randn(n, 6, 16, generator=g)
        results = []
        for fn in (grouped_attention, packed_attention_ref):
            out = fn(*leaves, cu, causal)
            grads = torch.autograd.grad((out * grad_out).sum(), leaves)
            results.append((out, *grads))
        for got, want in zip(*results, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
