"""Trainer memory per rank: DeepSpeed ZeRO 1/2/3 with 2 ranks vs 1 rank (issue "Sharded trainer").

For each stage s in 1, 2, 3 and ranks r in 1, 2: a fresh `TrainerGroup` (Ray actors, gloo)
on the default model (SmolLM2-135M-Instruct, fp32 weights, bf16 autocast, GRPO without a
reference model), two training steps on the same batch (4 groups x 4 samples, 32-token prompts,
responses 32-128 tokens, fixed seed). Per rank:

- peak_gb: the rank process's peak RSS minus its RSS before the trainer was built (weights,
  optimizer state, gradients, activations, communication buffers);
- state_gb: the model + optimizer state it holds, counted from the tensors themselves
  (parameters or their ZeRO-3 shard, fp32 master partitions, Adam moments).

Figures: `zero<s>_<r>rank_peak_gb` (the larger of the ranks) and `zero3_state_ratio` =
2-rank / 1-rank state per rank under ZeRO-3 (ideal 0.5).

    .venv/bin/python benchmarks/trainer_scaling.py   # writes benchmarks/results/trainer_scaling.json
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import write_results  # noqa: E402


def make_groups(seed: int = 0) -> list:
    from rlsys.types import Sample, SampleGroup, Status

    rng = random.Random(seed)
    groups = []
    for g in range(4):
        prompt = [rng.randrange(100, 40000) for _ in range(32)]
        samples = []
        for j in range(4):
            s = Sample(group_id=g, index=j, prompt_ids=prompt)
            k = rng.randint(32, 128)
            s.append([rng.randrange(100, 40000) for _ in range(k)], [-1.0] * k, 0, True)
            s.finish(Status.DONE, "stop")
            s.reward = float(j % 2)
            samples.append(s)
        groups.append(SampleGroup(g, samples))
    return groups


def measure(stage: int, ranks: int, steps: int) -> list[dict]:
    from rlsys import models
    from rlsys.config import load_recipe, to_dict
    from rlsys.trainer.group import TrainerGroup

    cfg = load_recipe(
        None,
        [
            "model.path=smollm2-135m-instruct",
            f"trainer.ranks={ranks}",
            f"trainer.zero_stage={stage}",
            "trainer.lr=1e-6",
            "cluster.threads_per_actor=1",
            "rollout.n_samples_per_prompt=4",
            "rollout.prompts_per_step=4",
        ],
    )
    group = TrainerGroup(to_dict(cfg), models.resolve(cfg.model.path))
    try:
        groups = make_groups()
        for _ in range(steps):
            group.train_step(groups)
        return group._all("memory")
    finally:
        group.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args()
    import ray

    env = {k: os.environ[k] for k in ("RLSYS_CACHE", "HF_HOME") if k in os.environ}
    env.update(DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1")
    ray.init(
        num_cpus=4, include_dashboard=False, logging_level="ERROR", runtime_env={"env_vars": env}
    )
    fig: dict = {}
    rows = []
    for stage in (1, 2, 3):
        for ranks in (1, 2):
            mem = measure(stage, ranks, args.steps)
            peak = max(m["peak_gb"] for m in mem)
            state = max(m["state_gb"] for m in mem)
            fig[f"zero{stage}_{ranks}rank_peak_gb"] = round(peak, 3)
            fig[f"zero{stage}_{ranks}rank_state_gb"] = round(state, 3)
            rows.append((stage, ranks, peak, state))
            print(
                f"ZeRO-{stage} x{ranks}: peak {peak:.2f} GB/rank, state {state:.2f} GB/rank",
                flush=True,
            )
    ray.shutdown()
    for s in (1, 2, 3):
        fig[f"zero{s}_state_ratio"] = round(
            fig[f"zero{s}_2rank_state_gb"] / fig[f"zero{s}_1rank_state_gb"], 3
        )
    print(f"\n{'stage':>5} {'ranks':>5} {'peak GB/rank':>13} {'state GB/rank':>14}")
    for stage, ranks, peak, state in rows:
        print(f"{stage:>5} {ranks:>5} {peak:13.2f} {state:14.2f}")
    print(f"ZeRO-3 state per rank, 2 ranks / 1 rank: {fig['zero3_state_ratio']:.3f} (ideal 0.5)")
    print(f"wrote {write_results('trainer_scaling', fig)}")


if __name__ == "__main__":
    main()
