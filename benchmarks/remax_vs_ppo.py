"""Trainer peak memory and step time: ReMax vs PPO (with critic), same batch, default model.

Each algorithm runs in its own fresh subprocess (so peak RSS belongs to that trainer alone):
the real `TrainerWorker` of rlsys, built from `recipes/remax.yaml` / `recipes/ppo.yaml` with
the same KL setting for both (k1 penalty in the reward, so both hold a reference model), is
fed the same batch of 8 groups x 8 samples (prompts from the arithmetic task, responses of
8-24 random tokens, rewards 0/1 from a fixed seed; ReMax groups carry one extra greedy
baseline sample that is scored but not trained on). One warm-up step, then `--steps` timed
steps. Both use gradient checkpointing (activations would otherwise dominate at this size).
Trainer peak memory = the process's peak RSS (ru_maxrss) minus its RSS after importing
torch/transformers and before building the trainer (the runtime, ~0.7 GB, is the same for
both and is not trainer state); the raw peak RSS is recorded too.

    .venv/bin/python benchmarks/remax_vs_ppo.py [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import current_rss_gb, peak_rss_gb, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAME = [
    "algorithm.kl.mode=reward",
    "algorithm.kl.estimator=k1",
    "algorithm.kl.coef=0.001",
    "trainer.gradient_checkpointing=true",
]


def make_groups(tokenizer, remax: bool, seed: int = 0):
    from rlsys.tasks.arithmetic import make_task
    from rlsys.types import Sample, SampleGroup, Status

    rng = random.Random(seed)
    train, _ = make_task(8, 1, seed=seed)
    groups = []
    for gid, row in enumerate(train):
        text = tokenizer.apply_chat_template(
            row["prompt"], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        samples = []
        for j in range(8 + (1 if remax else 0)):
            s = Sample(group_id=gid, index=j, prompt_ids=list(ids))
            n = rng.randint(8, 24)
            s.append([rng.randrange(100, 40000) for _ in range(n)], [-1.0] * n, 0, True)
            s.finish(Status.DONE, "stop")
            s.reward, s.trainable = float(rng.random() < 0.4), j < 8
            samples.append(s)
        groups.append(SampleGroup(gid, samples))
    return groups


def run_one(algo: str, steps: int) -> dict:
    import torch

    from rlsys import models
    from rlsys.config import load_recipe, to_dict
    from rlsys.trainer.worker import TrainerWorker

    cfg = load_recipe(ROOT / "recipes" / f"{algo}.yaml", SAME)
    path = models.resolve(cfg.model.path)
    torch.set_num_threads(2)
    base = current_rss_gb()  # Python + torch + transformers, before any trainer state
    worker = TrainerWorker(to_dict(cfg), path)
    groups = make_groups(worker.tokenizer, remax=algo == "remax")
    worker.train_step(groups)  # warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        worker.train_step(groups)
        times.append(time.perf_counter() - t0)
    peak = peak_rss_gb()
    return {
        "peak_gb": peak - base,
        "rss_gb": peak,
        "base_gb": base,
        "step_s": sum(times) / len(times),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--child", choices=["remax", "ppo"])
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child, args.steps)))
        return
    res = {}
    for algo in ("remax", "ppo"):
        out = subprocess.run(
            [sys.executable, __file__, "--child", algo, "--steps", str(args.steps)],
            capture_output=True,
            text=True,
            check=True,
        )
        res[algo] = json.loads(out.stdout.strip().splitlines()[-1])
    fig = {
        "remax_peak_mem_gb": round(res["remax"]["peak_gb"], 3),
        "ppo_peak_mem_gb": round(res["ppo"]["peak_gb"], 3),
        "mem_ratio": round(res["remax"]["peak_gb"] / res["ppo"]["peak_gb"], 3),
        "remax_peak_rss_gb": round(res["remax"]["rss_gb"], 3),
        "ppo_peak_rss_gb": round(res["ppo"]["rss_gb"], 3),
        "rss_ratio": round(res["remax"]["rss_gb"] / res["ppo"]["rss_gb"], 3),
        "runtime_base_gb": round(res["remax"]["base_gb"], 3),
        "remax_step_s": round(res["remax"]["step_s"], 2),
        "ppo_step_s": round(res["ppo"]["step_s"], 2),
        "speedup": round(res["ppo"]["step_s"] / res["remax"]["step_s"], 2),
    }
    print(f"{'':8}{'peak GB':>10}{'step s':>10}")
    for algo in ("remax", "ppo"):
        print(f"{algo:8}{res[algo]['peak_gb']:10.2f}{res[algo]['step_s']:10.2f}")
    print(f"ReMax / PPO memory {fig['mem_ratio']:.2f}x, PPO / ReMax time {fig['speedup']:.2f}x")
    print(f"wrote {write_results('remax_vs_ppo', fig)}")


if __name__ == "__main__":
    main()
