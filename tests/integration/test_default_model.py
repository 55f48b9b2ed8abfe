"""The zoo's default model is a real, working SmolLM2-135M-Instruct built offline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow


def test_smollm2_folder_loads_and_answers(smollm_path: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (Path(smollm_path) / "model.safetensors").is_file()
    tok = AutoTokenizer.from_pretrained(smollm_path)
    model = AutoModelForCausalLM.from_pretrained(smollm_path, dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    assert 130e6 < n_params < 140e6
    assert len(tok) == 49152 and tok.chat_template
    msgs = [{"role": "user", "content": "What is 2 + 3?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")
    if not isinstance(ids, torch.Tensor):
        ids = ids["input_ids"]
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "5" in text, text
