"""Native engine on the default model (SmolLM2-135M-Instruct): exact against transformers in
fp32, and the bf16 logprob error it trades for speed."""

from __future__ import annotations

import pytest
import torch

from rlsys.rollout.engine import GenerationRequest, SamplingParams
from rlsys.rollout.native import NativeEngine
from rlsys.rollout.testing import reference_greedy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small ops, one at a time: with 2 OpenMP threads on a shared 2-core machine (load ~5)
    every small matmul waits for a descheduled thread; this file took 7.7 min with 2 threads
    and 83 s with 1. HF and native run in the same process, so comparisons stay like for like."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def engine(hf, tok) -> NativeEngine:
    return NativeEngine.from_hf_model(hf, tok, NativeEngine.Config(max_batch=8, max_seq_len=256))


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(greedy=True, max_new_tokens=n, **kw)


@torch.no_grad()
def hf_logprobs(model, prompt: list[int], tokens: list[int], temperature: float) -> torch.Tensor:
    logits = model(torch.tensor([prompt + tokens])).logits[0].float()
    lp = torch.log_softmax(logits[len(prompt) - 1 : -1] / temperature, dim=-1)
    return lp.gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)


def test_prompts_have_different_lengths(prompts):
    assert len({len(p) for p in prompts}) == len(prompts)


def test_greedy_matches_hf_generate(hf, engine, prompts):
    eos = sorted(engine.eos_token_ids)
    results = engine.generate(
        [GenerationRequest(f"g{i}", p, greedy(24)) for i, p in enumerate(prompts)]
    )
    for p, res in zip(prompts, results, strict=True):
        assert res.completions[0].token_ids == reference_greedy(hf, p, 24, eos)


def test_logprobs_match_hf_forward_fp32(hf, engine, prompts):
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=0, max_new_tokens=32)
    results = engine.generate(
        [GenerationRequest(f"s{i}", p, params, n=2) for i, p in enumerate(prompts)]
    )
    worst = 0.0
    for p, res in zip(prompts, results, strict=True):
        for c in res.completions:
            ref = hf_logprobs(hf, p, c.token_ids, 0.8)
            worst = max(worst, (ref - torch.tensor(c.logprobs)).abs().max().item())
    print(f"fp32 max |logprob delta| vs HF forward: {worst:.2e}")
    assert worst < 1e-4


def test_bf16_logprob_error(smollm_path, tok, prompts):
    """bf16 engine vs a bf16 HF forward over the same tokens (and vs fp32 HF): reported."""
    from transformers import AutoModelForCausalLM

    hf16 = AutoModelForCausalLM.from_pretrained(smollm_path, dtype=torch.bfloat16).eval()
    hf32 = AutoModelForCausalLM.from_pretrained(smollm_path, dtype=torch.float32).eval()
    eng = NativeEngine.from_hf_model(
        hf16, tok, NativeEngine.Config(dtype="bfloat16", max_batch=8, max_seq_len=256)
    )
    params = SamplingParams(temperature=1.0, seed=0, max_new_tokens=32)
    results = eng.generate([GenerationRequest(f"b{i}", p, params) for i, p in enumerate(prompts)])
    d16, d32 = [], []
    for p, res in zip(prompts, results, strict=True):
        c = res.completions[0]
        lp = torch.tensor(c.logprobs)
        d16.append((hf_logprobs(hf16, p, c.token_ids, 1.0) - lp).abs())
        d32.append((hf_logprobs(hf32, p, c.token_ids, 1.0) - lp).abs())
    a16, a32 = torch.cat(d16), torch.cat(d32)
    print(
        f"bf16 |logprob delta| vs HF bf16: max {a16.max():.3f} mean {a16.mean():.4f}; "
        f"vs HF fp32: max {a32.max():.3f} mean {a32.mean():.4f}"
    )
    assert a16.mean() < 0.05 and a32.mean() < 0.05


def test_abort_then_continue_equals_uninterrupted(engine, prompts):
    p = prompts[2]
    (full,) = engine.generate([GenerationRequest("full", p, greedy(40, ignore_eos=True))])
    engine.add_request(GenerationRequest("a", p, greedy(40, ignore_eos=True)))
    for _ in range(15):
        engine.step()
    (part,) = engine.abort(["a"])
    toks = part.completions[0].token_ids
    assert toks == full.completions[0].token_ids[:15]
    cont = GenerationRequest("c", p, greedy(25, ignore_eos=True), response_ids=toks)
    (rest,) = engine.generate([cont])
    assert toks + rest.completions[0].token_ids == full.completions[0].token_ids


def test_long_and_short_batch_equals_alone(engine, prompts):
    long = GenerationRequest("long", prompts[3], greedy(48, ignore_eos=True))
    short = [GenerationRequest(f"s{i}", prompts[i % 3], greedy(3 + 3 * i)) for i in range(6)]
    together = engine.generate([long, *short])
    for req, res in zip([long, *short], together, strict=True):
        (alone,) = engine.generate(
            [GenerationRequest("x" + req.request_id, req.prompt_ids, req.params)]
        )
        assert res.completions[0].token_ids == alone.completions[0].token_ids


def test_weight_update_switches_outputs(hf, engine, prompts, smollm_path):
    from transformers import AutoModelForCausalLM

    state = hf.state_dict()
    g = torch.Generator().manual_seed(0)
    new = {
        k: v + 0.2 * v.std() * torch.randn(v.shape, generator=g)
        for k, v in state.items()
        if k != "lm_head.weight"
    }
    other = AutoModelForCausalLM.from_pretrained(smollm_path, dtype=torch.float32).eval()
    other.load_state_dict(new, strict=False)
    p = prompts[0]
    (before,) = engine.generate([GenerationRequest("b", p, greedy(16))])
    engine.update_weights(new, version=engine.version + 1)
    try:
        (after,) = engine.generate([GenerationRequest("a", p, greedy(16))])
        eos = sorted(engine.eos_token_ids)
        ref = other.generate(
            torch.tensor([p]),
            max_new_tokens=16,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos[0],
        )
        assert after.completions[0].token_ids == ref[0, len(p) :].tolist()
        assert after.completions[0].token_ids != before.completions[0].token_ids
        assert after.version == engine.version
    finally:
        engine.update_weights(state, version=engine.version + 1)
    (back,) = engine.generate([GenerationRequest("r", p, greedy(16))])
    assert back.completions[0].token_ids == before.completions[0].token_ids
