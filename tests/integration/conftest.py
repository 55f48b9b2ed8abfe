"""Fixtures shared by the engine tests on the default model (SmolLM2-135M-Instruct, fp32)."""

from __future__ import annotations

import pytest
import torch

QUESTIONS = [
    "What is 2 + 3?",
    "What is 7 * 8? Answer with just the number.",
    "Write one sentence about the sea.",
    "You are a careful assistant. Explain in two short sentences why the sky looks blue "
    "during the day and red at sunset, then give the answer to 12 + 30.",
]


@pytest.fixture(scope="module")
def tok(smollm_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm_path)


@pytest.fixture(scope="module")
def hf(smollm_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm_path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompts(tok) -> list[list[int]]:
    """QUESTIONS through the chat template (generation prompt on), as token ids."""
    out = []
    for q in QUESTIONS:
        msgs = [{"role": "user", "content": q}]
        text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        out.append(tok(text, add_special_tokens=False)["input_ids"])
    return out
