"""The trainer's old logprobs on the default model under bf16 autocast: computed in the
update's own micro-batches, so the first mini-batch's ratios are exactly 1 (the whole batch's
packing gave SmolLM2 logprobs up to 0.09 apart, 0.026 on average, from the mini-batch's).

The trainer runs in a fresh child process: it joins a process group and picks a DeepSpeed
accelerator, which must not leak into the tests that run after this one in pytest's process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _child(out: str) -> None:
    """Run in a child process: one GSPO step (two mini-batches) on SmolLM2 with bf16
    autocast, recording what the policy loss saw in each mini-batch; results to `out`."""
    from conftest import _synthetic_groups

    import rlsys.trainer.worker as tw
    from rlsys import models
    from rlsys.config import load_recipe, to_dict

    cfg = load_recipe(
        None,
        [
            "model.path=smollm2-135m-instruct",
            "trainer.autocast_bf16=true",
            "trainer.mini_batches=2",
            "trainer.lr=1e-3",
            "trainer.micro_batch_tokens=256",
            "algorithm.policy_loss=gspo",
            "algorithm.loss_agg=seq-mean-token-mean",
            "algorithm.clip_low=3e-4",
            "algorithm.clip_high=4e-4",
        ],
    )
    w = tw.TrainerWorker(to_dict(cfg), models.resolve(models.SMOLLM2))
    seen: list = []
    real_loss, real_step = tw.policy_loss, w.policy.step

    def record(logp, old, adv, mask, *a, **k):
        keep = mask > 0
        seen.append((logp.detach()[keep].clone(), old[keep].clone()))
        return real_loss(logp, old, adv, mask, *a, **k)

    def step():
        seen.append("step")
        return real_step()

    tw.policy_loss = record
    w.policy.step = step
    m = w.train_step(_synthetic_groups(8, 8, 0))
    torch.save({"seen": seen, "clip_frac": m["train/clip_frac"]}, out)


def test_first_mini_batch_ratio_is_exactly_one_under_bf16(tmp_path: Path) -> None:
    """Under bf16 autocast a sample's logprobs depend on the row packing (SDPA over padded
    length groups, GEMM kernels chosen by row count): old logprobs from the whole batch's
    packing gave the first mini-batch (policy unchanged) ratios != 1, which GSPO's 4e-4 clip
    turned into spurious clipping."""
    out = tmp_path / "seen.pt"
    path = [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p))
    code = f"from integration.test_old_logprobs import _child; _child({json.dumps(str(out))})"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    res = torch.load(out, weights_only=False)
    seen = res["seen"]
    first = seen[: seen.index("step")]
    second = seen[seen.index("step") + 1 : -1]
    assert first and second
    for logp, old in first:
        assert torch.equal(logp, old)  # bit for bit
    # the second mini-batch sees the first update
    assert any(not torch.equal(lp, o) for lp, o in second)
    assert res["clip_frac"] > 0
