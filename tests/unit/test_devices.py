"""The trainer on a GPU (`trainer.device`): a step there equals the same step on the CPU;
a CUDA device asked for where there is none is a clear error (trainer and rollout workers).

Each run is a fresh child process (a process holds one DeepSpeed accelerator and one process
group): it trains two steps on the same synthetic groups and saves the metrics and the
updated weights. Without a GPU only the refusal is tested; `--gpu` runs the comparisons.
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
GPU = "cluster.trainer_resources={CPU: 1, GPU: 1}"
FP32 = ["trainer.autocast_bf16=false", "trainer.lr=1e-3", "trainer.micro_batch_tokens=48"]
# GRPO with a KL loss term (frozen reference model), entropy bonus, packed micro-batches:
# fused logprob (Triton "ieee" fp32 dot on the GPU, chunked torch on the CPU) and packed
# attention (Triton varlen kernel / length-grouped SDPA).
GRPO = ["algorithm.kl.mode=loss", "algorithm.kl.estimator=k3", "algorithm.entropy_coef=0.01"]
# PPO: critic (its own engine and optimizer), GAE, two mini-batches (pre-update logprobs).
PPO = ["algorithm.advantage=gae", "trainer.mini_batches=2", "algorithm.critic.lr=1e-3"]


def _child(overrides: list[str], out: str) -> None:
    """Run in a child process: two trainer steps, metrics and weights to `out`."""
    from conftest import _synthetic_groups

    from rlsys import models
    from rlsys.config import load_recipe, to_dict
    from rlsys.trainer.worker import TrainerWorker

    cfg = load_recipe(None, ["model.path=tiny-llama", *overrides])
    w = TrainerWorker(to_dict(cfg), models.resolve(models.TINY))
    metrics = [w.train_step(_synthetic_groups(3, 4, seed)) for seed in (0, 1)]
    params = {n: p.detach().cpu() for n, p in w.model.named_parameters()}
    if w.critic is not None:
        params.update(
            {f"critic.{n}": p.detach().cpu() for n, p in w.critic.module.named_parameters()}
        )
    torch.save({"metrics": metrics, "params": params, "device": str(w.device)}, out)


def _run(overrides: list[str], tmp_path: Path, name: str) -> dict:
    out = tmp_path / f"{name}.pt"
    path = [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p))
    code = f"from unit.test_devices import _child; _child({json.dumps(overrides)}, {str(out)!r})"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(out, weights_only=False)


def test_cuda_trainer_without_a_gpu_says_so(tiny_model_path, monkeypatch) -> None:
    from rlsys.config import load_recipe, to_dict
    from rlsys.trainer.worker import TrainerWorker

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = load_recipe(None, ["model.path=tiny-llama", GPU])
    with pytest.raises(RuntimeError, match="trainer.device is cuda but this process sees no"):
        TrainerWorker(to_dict(cfg), tiny_model_path)


def test_cuda_rollout_worker_without_a_gpu_says_so(tiny_model_path, monkeypatch) -> None:
    from rlsys.config import load_recipe, to_dict
    from rlsys.rollout.worker import RolloutWorker

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = load_recipe(None, ["model.path=tiny-llama", "cluster.rollout_resources={GPU: 1}"])
    with pytest.raises(RuntimeError, match="rollout.device is cuda but this process sees no"):
        RolloutWorker(to_dict(cfg), tiny_model_path)


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_child_run_reports_its_device(tmp_path: Path, algo: str) -> None:
    """The harness the GPU comparisons use, on the CPU: two steps of each configuration."""
    r = _run([*FP32, *{"grpo": GRPO, "ppo": PPO}[algo]], tmp_path, "cpu")
    assert r["device"] == "cpu"
    assert all(m["train/loss"] == m["train/loss"] for m in r["metrics"])  # not NaN
    assert r["metrics"][1]["train/version"] == 2
    assert any(k.startswith("critic.") for k in r["params"]) == (algo == "ppo")
    assert ("train/value_loss" in r["metrics"][0]) == (algo == "ppo")


def _compare(
    cpu: dict, gpu: dict, loss_rel: float, norm_rel: float, param_abs: float | None
) -> None:
    """Same metrics (within `*_rel`) and, unless `param_abs` is None, the same weights."""
    assert gpu["device"] == "cuda:0" and cpu["device"] == "cpu"
    for mc, mg in zip(cpu["metrics"], gpu["metrics"], strict=True):
        assert mg["train/loss"] == pytest.approx(mc["train/loss"], rel=loss_rel, abs=1e-6)
        assert mg["train/grad_norm"] == pytest.approx(mc["train/grad_norm"], rel=norm_rel)
        if "train/value_loss" in mc:
            assert mg["train/value_loss"] == pytest.approx(mc["train/value_loss"], rel=loss_rel)
    assert cpu["params"].keys() == gpu["params"].keys()
    if param_abs is None:
        return
    worst = max(float((cpu["params"][n] - gpu["params"][n]).abs().max()) for n in cpu["params"])
    assert worst < param_abs, worst


# fp32 on both devices, so only summation order differs: losses agree to ~1e-6 relative;
# the weights after two AdamW steps at lr 1e-3 to < 1e-4 (an update is at most ~lr per step:
# a wrong gradient moves some weight by ~1e-3).
@pytest.mark.gpu
@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_gpu_step_equals_cpu_step_fp32(tmp_path: Path, algo: str) -> None:
    extra = {"grpo": GRPO, "ppo": PPO}[algo]
    cpu = _run([*FP32, *extra], tmp_path, "cpu")
    gpu = _run([*FP32, *extra, GPU], tmp_path, "gpu")
    _compare(cpu, gpu, loss_rel=1e-4, norm_rel=1e-3, param_abs=1e-4)


# bf16 autocast (the default): bf16 GEMM operands on both devices, rounded by different
# kernels; a step's loss and gradient norm agree to a few 1e-3 relative. Weights are not
# compared: AdamW's first steps move each weight by ~lr * sign(gradient), and a gradient
# near 0 may have either sign in bf16.
@pytest.mark.gpu
def test_gpu_step_close_to_cpu_step_bf16(tmp_path: Path) -> None:
    over = ["trainer.lr=1e-3", "trainer.micro_batch_tokens=48", *GRPO]
    cpu = _run(over, tmp_path, "cpu")
    gpu = _run([*over, GPU], tmp_path, "gpu")
    _compare(cpu, gpu, loss_rel=3e-2, norm_rel=3e-2, param_abs=None)
