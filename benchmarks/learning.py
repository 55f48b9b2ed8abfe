"""Does each algorithm raise the reward on the built-in task with the default model?

Runs `recipes/{grpo,remax,ppo}.yaml`, or the recipes `--algos` names (SmolLM2-135M-Instruct,
single-digit addition), for `--steps` steps each, one after the other in one process (real Ray
actors), and records the mean reward of the first 5 and the last 5 steps and the gain.

    .venv/bin/python benchmarks/learning.py [--steps 20] [--algos grpo remax ppo] [--name learning]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from rlsys.config import load_recipe
    from rlsys.controller import train

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--algos", nargs="+", default=["grpo", "remax", "ppo"])
    ap.add_argument("--name", default="learning", help="results/<name>.json")
    args = ap.parse_args()
    fig: dict = {"steps": args.steps}
    rows = []
    for algo in args.algos:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = load_recipe(
                ROOT / "recipes" / f"{algo}.yaml",
                [
                    f"steps={args.steps}",
                    "logging.wandb.mode=disabled",
                    f"logging.run_dir={tmp}/run",
                ],
            )
            t0 = time.perf_counter()
            rewards = train(cfg)["rewards"]
            wall = time.perf_counter() - t0
        first, last = statistics.fmean(rewards[:5]), statistics.fmean(rewards[-5:])
        fig.update(
            {
                f"{algo}_first5_reward": round(first, 3),
                f"{algo}_last5_reward": round(last, 3),
                f"{algo}_gain": round(last - first, 3),
                f"{algo}_wall_s": round(wall, 1),
            }
        )
        rows.append((algo, first, last, wall))
    print(f"{'algo':8}{'first 5':>10}{'last 5':>10}{'gain':>8}{'wall s':>9}")
    for algo, first, last, wall in rows:
        print(f"{algo:8}{first:10.3f}{last:10.3f}{last - first:+8.3f}{wall:9.0f}")
    print(f"wrote {write_results(args.name, fig)}")


if __name__ == "__main__":
    main()
