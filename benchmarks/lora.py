"""LoRA (`trainer.lora`) vs full fine-tuning on the default model: trainer memory, step time,
and whether the reward still rises.

1. Trainer alone, each in a fresh subprocess (`remax_vs_ppo.py`'s `--child`, same batch of
   8 groups x 8 samples, k1 KL in the reward, gradient checkpointing): the PyTorch allocator's
   peak over a warm-up and a steady step on top of the tensors alive after the build
   (`*_peak_mem_gb`), what each engine holds, and the mean trainer step (`*_trainer_step_s`).
   Full fine-tuning holds fp32 weights + gradients + AdamW moments and a bf16 reference copy;
   LoRA holds the frozen fp32 weights, the adapters with their gradients and moments, and no
   reference (the base model is the policy with the adapters off). The same pair for PPO
   (`ppo_*`: GAE with a critic, two mini-batches), whose critic takes adapters too.
2. `rlsys train recipes/quickstart.yaml` (GRPO, SmolLM2-135M-Instruct, single-digit addition)
   for `--steps` steps each, real Ray actors, in this process: mean reward of the first and
   last five steps, mean step / train / weight-sync seconds (steps 2..N).

    .venv/bin/python benchmarks/lora.py [--steps 15] [--rank 16] [--lora-lr 2e-4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402
from remax_vs_ppo import child  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def quickstart(steps: int, extra: list[str]) -> dict:
    from rlsys.config import load_recipe
    from rlsys.controller import train

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_recipe(
            ROOT / "recipes" / "quickstart.yaml",
            [f"steps={steps}", "logging.wandb.mode=disabled", f"logging.run_dir={tmp}/run", *extra],
        )
        train(cfg)
        rows = [
            json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()
        ]
    rewards = [r["reward/mean"] for r in rows]
    later = rows[1:]  # step 1 includes warm-up

    def mean(k: str) -> float:
        return statistics.fmean(r[k] for r in later if k in r)

    return {
        "first5": statistics.fmean(rewards[:5]),
        "last5": statistics.fmean(rewards[-5:]),
        "step_s": mean("perf/step_s"),
        "train_s": mean("perf/train_s"),
        "sync_s": mean("sync/seconds"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--lora-lr", type=float, default=2e-4)
    args = ap.parse_args()
    lora = [f"trainer.lora.rank={args.rank}", f"trainer.lora.alpha={args.alpha}"]
    variants = {"full": [], "lora": [*lora, f"trainer.lr={args.lora_lr}"]}
    fig: dict = {"rank": args.rank, "alpha": args.alpha, "lora_lr": args.lora_lr}
    print(
        f"{'trainer':12}{'peak GB':>9}{'state GB':>10}{'AdamW GB':>10}{'ref GB':>8}"
        f"{'critic AdamW':>14}{'step s':>8}"
    )
    for algo, tag in (("grpo", ""), ("ppo", "ppo_")):
        mem = {k: child(algo, 3, v) for k, v in variants.items()}
        for k, r in mem.items():
            e = r["engines"]
            ref = (e["ref"] or {}).get("params_gb", 0.0)
            critic = (e.get("critic") or {}).get("opt_gb", 0.0)
            print(
                f"{algo + ' ' + k:12}{r['peak_gb']:9.3f}{r['hand']['state']:10.3f}"
                f"{e['policy']['opt_gb']:10.3f}{ref:8.3f}{critic:14.3f}{r['step_s']:8.2f}"
            )
            fig.update(
                {
                    f"{tag}{k}_peak_mem_gb": round(r["peak_gb"], 3),
                    f"{tag}{k}_state_gb": round(r["hand"]["state"], 3),
                    f"{tag}{k}_trainer_step_s": round(r["step_s"], 2),
                }
            )
        fig[f"{tag}lora_mem_ratio"] = round(mem["lora"]["peak_gb"] / mem["full"]["peak_gb"], 3)
        fig[f"{tag}lora_trainer_speedup"] = round(mem["full"]["step_s"] / mem["lora"]["step_s"], 3)

    runs = {k: quickstart(args.steps, v) for k, v in variants.items()}
    print(f"\nquickstart, {args.steps} steps")
    print(f"{'':8}{'first 5':>9}{'last 5':>9}{'gain':>8}{'step s':>8}{'train s':>9}{'sync s':>8}")
    for k, r in runs.items():
        gain = r["last5"] - r["first5"]
        print(
            f"{k:8}{r['first5']:9.3f}{r['last5']:9.3f}{gain:+8.3f}{r['step_s']:8.2f}"
            f"{r['train_s']:9.2f}{r['sync_s']:8.3f}"
        )
        fig.update(
            {
                f"{k}_first5_reward": round(r["first5"], 3),
                f"{k}_last5_reward": round(r["last5"], 3),
                f"{k}_gain": round(gain, 3),
                f"{k}_step_s": round(r["step_s"], 2),
                f"{k}_train_s": round(r["train_s"], 2),
                f"{k}_sync_s": round(r["sync_s"], 3),
            }
        )
    fig["steps"] = args.steps
    print(f"wrote {write_results('lora', fig)}")


if __name__ == "__main__":
    main()
