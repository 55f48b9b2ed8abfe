"""The policy loss's gradient made in the LM head's forward (`trainer.fused_loss`,
`rlsys/kernels/head_loss.py`) vs logprob + entropy first and the loss through autograd (the
fused head's backward then recomputes the logits), side by side on this machine:

1. The LM head + a per-token loss, forward + backward, at SmolLM2-135M's head (T=8192,
   H=576, V=49152), fp32 and bf16 operands (the trainer's autocast); each variant in a fresh
   child process of `benchmarks/kernels.py` (peak = RSS high-water mark above the inputs,
   time = best of `--reps`). "fused" = `fused_logprob_entropy` then the loss by autograd,
   "fused_loss" = `fused_head_loss`.
2. A quickstart-shaped trainer step (`recipes/quickstart.yaml`: GRPO, SmolLM2-135M, bf16
   autocast; 8 prompts x 8 samples, `benchmarks/trainer_step.py`'s groups) with
   `trainer.fused_loss` false and true, each in a fresh child process: mean wall seconds of
   `--steps` steps after one warm-up, and the process's peak RSS.

    .venv/bin/python benchmarks/fused_loss.py      # ~6 min on 2 cores; results/fused_loss.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import kernels  # noqa: E402
import trainer_step  # noqa: E402
from _common import machine, write_results  # noqa: E402

HEAD = [("fp32", 8192, 576, 49152, "float32"), ("bf16", 8192, 576, 49152, "bfloat16")]


def step_child(fused: bool, steps: int) -> dict[str, float]:
    """One quickstart trainer in this process: mean step seconds, peak RSS (GB)."""
    import torch

    from rlsys import models
    from rlsys.config import load_recipe, to_dict
    from rlsys.trainer.worker import TrainerWorker

    cfg = load_recipe("recipes/quickstart.yaml", [f"trainer.fused_loss={str(fused).lower()}"])
    torch.set_num_threads(2)
    worker = TrainerWorker(to_dict(cfg), models.resolve(cfg.model.path))
    assert worker.fused_loss == fused
    groups = trainer_step.make_groups()
    worker.train_step(groups)
    t0 = time.perf_counter()
    for _ in range(steps):
        m = worker.train_step(groups)
    return {
        "step_s": (time.perf_counter() - t0) / steps,
        "rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "loss": m["train/loss"],
        "grad_norm": m["train/grad_norm"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=2, help="LM head runs per variant (best of)")
    ap.add_argument("--steps", type=int, default=3, help="trainer steps after the warm-up")
    ap.add_argument("--step-child", choices=["false", "true"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.step_child:
        print(json.dumps(step_child(args.step_child == "true", args.steps)))
        return
    fig: dict = {"machine": machine(), "load_avg_start": " / ".join(
        f"{x:.1f}" for x in os.getloadavg())}  # fmt: skip
    print(f"1. LM head + loss, forward + backward, best of {args.reps}, fresh process each")
    print(f"{'operands':9} {'variant':11} {'seconds':>8} {'peak MiB':>9}")
    for name, t, h, v, dt in HEAD:
        cfg = [name, t, h, v, dt]
        for variant in ("fused", "fused_loss"):
            r = kernels.run_child("logprob", variant, cfg, args.reps)
            print(f"{name:9} {variant:11} {r['time_s']:8.2f} {r['peak_bytes'] / 2**20:9.0f}")
            fig[f"head_{name}_{variant}_s"] = round(r["time_s"], 2)
            fig[f"head_{name}_{variant}_peak_mib"] = round(r["peak_bytes"] / 2**20)
        fig[f"head_{name}_speedup"] = round(
            fig[f"head_{name}_fused_s"] / fig[f"head_{name}_fused_loss_s"], 3
        )
        fig[f"head_{name}_shape"] = f"T={t} H={h} V={v} {dt}"
    print(f"\n2. quickstart trainer step, {args.steps} steps after a warm-up, fresh process")
    print(f"{'fused_loss':10} {'s/step':>8} {'peak RSS GB':>12} {'loss':>10} {'grad norm':>10}")
    for flag in ("false", "true"):
        cmd = [sys.executable, __file__, "--step-child", flag, "--steps", str(args.steps)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(
            f"{flag:10} {r['step_s']:8.2f} {r['rss_gb']:12.2f} {r['loss']:10.5f} "
            f"{r['grad_norm']:10.5f}"
        )
        fig[f"step_fused_loss_{flag}_s"] = round(r["step_s"], 2)
        fig[f"step_fused_loss_{flag}_peak_rss_gb"] = round(r["rss_gb"], 2)
    fig["step_speedup"] = round(fig["step_fused_loss_false_s"] / fig["step_fused_loss_true_s"], 3)
    fig["load_avg_end"] = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"head speedup fp32 {fig['head_fp32_speedup']}x, bf16 {fig['head_bf16_speedup']}x; "
          f"trainer step {fig['step_speedup']}x")  # fmt: skip
    print(f"wrote {write_results('fused_loss', fig)}")


if __name__ == "__main__":
    main()
