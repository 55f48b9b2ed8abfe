"""`rlsys train` with `trainer.lora` on real Ray actors (tiny model, native engine, fp32): the
engines generate with the merged adapters after every push (also after a resume, where they
start from the base checkpoint), the KL reference stays the base model, and the exported
model is the merged one with the frozen weights untouched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlsys.config import load_recipe
from rlsys.controller import train

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_lora_run_pushes_merged_weights_and_resumes(tmp_path: Path, tiny_model_path) -> None:
    from safetensors.torch import load_file

    run = tmp_path / "run"
    overrides = [
        "model.path=tiny-llama",
        "rollout.prompts_per_step=4",
        "rollout.n_samples_per_prompt=4",
        "rollout.max_new_tokens=16",
        "rollout.dtype=float32",
        "trainer.autocast_bf16=false",
        "trainer.lr=1e-2",
        "trainer.lora.rank=8",
        "algorithm.kl.mode=loss",
        "algorithm.kl.coef=0.05",
        f"reward.fn={ROOT}/tests/assets/rewards.py:length_reward",  # dense: updates
        "checkpoint.every=2",
        "logging.wandb.mode=disabled",
        "logging.plot=false",
        f"logging.run_dir={run}",
    ]
    recipe = ROOT / "recipes" / "quickstart.yaml"
    train(load_recipe(recipe, ["steps=2", *overrides]))
    train(load_recipe(recipe, ["steps=3", "resume=auto", *overrides]))
    rows = _rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["train/grad_norm"] > 0 for r in rows)
    # the engines sampled with the trainer's (merged) policy at every step: fp32 on both
    # sides, so the only gap is summation order (~1e-7); engines pushed the base weights
    # instead of the merged ones fail this from step 2 on (tried)
    assert all(r["train/rollout_logprob_diff"] < 1e-5 for r in rows), rows
    assert abs(rows[0]["train/kl"]) < 1e-7 < rows[2]["train/kl"]  # B = 0 at the start

    final = load_file(str(run / "final" / "model.safetensors"))
    base = load_file(str(Path(tiny_model_path) / "model.safetensors"))
    assert set(final) == set(base)
    adapted = [k for k in base if k.endswith("_proj.weight")]
    frozen = [k for k in base if k not in adapted]
    assert adapted and frozen
    assert all(torch.equal(final[k], base[k]) for k in frozen)
    assert min((final[k] - base[k]).abs().max() for k in adapted) > 1e-3
    # the PEFT adapter beside the merged model is the same policy, and `rlsys export` of the
    # step-3 checkpoint carries it too
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rlsys.trainer.checkpoint import export

    exported = export(run / "checkpoints", tmp_path / "export")
    ids = torch.randint(5, 300, (2, 9))
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(str(run / "final"))(input_ids=ids).logits
        for adapter in (run / "final" / "adapter", exported / "adapter"):
            plain = AutoModelForCausalLM.from_pretrained(tiny_model_path)
            peft = PeftModel.from_pretrained(plain, str(adapter)).eval()
            assert torch.allclose(peft(input_ids=ids).logits, merged, atol=1e-5), adapter
