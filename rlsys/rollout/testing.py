"""Helpers for the engine tests: how far an engine's logprobs are from transformers'."""

from __future__ import annotations

import torch

from rlsys.rollout.engine import GenerationRequest, RolloutEngine, SamplingParams


@torch.no_grad()
def reference_logprobs(
    hf, prompt: list[int], tokens: list[int], temperature: float
) -> torch.Tensor:
    """log_softmax(logits / T) of each of `tokens` after `prompt` under the HF model `hf`,
    in float64 over its logits."""
    logits = hf(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1]
    lp = torch.log_softmax(logits.double() / temperature, dim=-1)
    return lp.gather(1, torch.tensor(tokens)[:, None])[:, 0]


def worst_logprob_gap(
    engine: RolloutEngine,
    hf,
    prompts: list[list[int]],
    temperature: float = 0.7,
    n: int = 2,
    max_new_tokens: int = 24,
    seed: int = 3,
) -> float:
    """Sample `n` x `max_new_tokens` tokens per prompt (EOS ignored, so every sample has its
    full length) and return the largest |engine - transformers| logprob over all of them."""
    params = SamplingParams(
        temperature=temperature, seed=seed, max_new_tokens=max_new_tokens, ignore_eos=True
    )
    reqs = [GenerationRequest(f"r{i}", p, params, n=n) for i, p in enumerate(prompts)]
    worst = 0.0
    for req, res in zip(reqs, engine.generate(reqs), strict=True):
        assert res.error is None, res.error
        for c in res.completions:
            assert len(c.token_ids) == len(c.logprobs) == max_new_tokens
            ref = reference_logprobs(hf, req.prompt_ids, c.token_ids, temperature)
            got = torch.tensor(c.logprobs, dtype=torch.float64)
            worst = max(worst, (got - ref).abs().max().item())
    return worst


@torch.no_grad()
def reference_greedy(hf, prompt: list[int], max_new_tokens: int, eos: list[int]) -> list[int]:
    """transformers' greedy continuation of `prompt` (stops at any of `eos`)."""
    out = hf.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=eos[0] if eos else 0,
    )
    return out[0, len(prompt) :].tolist()
