"""On-policy (sync) vs async training with bounded staleness: steps per hour, role idle time,
reward per step (issue "Streaming buffer, async training ...").

The quickstart recipe (GRPO, SmolLM2-135M-Instruct, single-digit addition, 8 prompts x 8
samples per step; `--recipe NAME` for another one, `--set KEY=VALUE` to override it), `--steps`
steps per mode, one process run, real Ray actors:

- sync: generate a batch, train on it, push the weights, repeat; each phase may use both cores
  (`cluster.threads_per_actor=2`; the other role is idle meanwhile);
- async k: `rollout.mode=async rollout.max_staleness=k` for k = 1, 2 (`--ks`); rollout and
  trainer run at once on the same two cores: the trainer with two threads, each rollout
  worker with one (the default in async mode on one node, `cluster.rollout_threads`).

steps/hour = 3600 / mean step seconds over steps 2..N (step 1 includes actor warm-up). Idle
fractions: sync, rollout idle = train + sync seconds / step seconds and trainer idle = rollout
seconds / step seconds (means over steps 2..N); async, the scheduler's own accounting at the
last step (`perf/rollout_idle_frac`: worker time without a round to run; `perf/trainer_idle_frac`:
time the trainer waited for a batch). Reward per step: least-squares slope of the step mean
reward over all N steps.

    .venv/bin/python benchmarks/async_vs_sync.py    # writes benchmarks/results/async_vs_sync.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import write_results  # noqa: E402


def run(recipe: str, mode: str, k: int, steps: int, tmp: Path, overrides: list[str]) -> list[dict]:
    from rlsys.config import load_recipe
    from rlsys.controller import train

    extra = ["cluster.threads_per_actor=2"]
    if mode == "async":
        extra += ["rollout.mode=async", f"rollout.max_staleness={k}"]
    name = f"{mode}{k}"
    cfg = load_recipe(
        ROOT / "recipes" / f"{recipe}.yaml",
        [
            f"steps={steps}",
            "logging.wandb.mode=disabled",
            f"logging.run_dir={tmp}/{name}",
            *overrides,
            *extra,
        ],
    )
    train(cfg)
    lines = (tmp / name / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines]


def slope(ys: list[float]) -> float:
    n = len(ys)
    xm, ym = (n - 1) / 2, sum(ys) / n
    num = sum((i - xm) * (y - ym) for i, y in enumerate(ys))
    return num / sum((i - xm) ** 2 for i in range(n))


def summarize(rows: list[dict], is_async: bool) -> dict:
    later = rows[1:]
    step_s = sum(r["perf/step_s"] for r in later) / len(later)
    if is_async:
        rollout_idle = rows[-1]["perf/rollout_idle_frac"]
        trainer_idle = rows[-1]["perf/trainer_idle_frac"]
    else:
        rollout_idle = sum(1 - r["perf/rollout_s"] / r["perf/step_s"] for r in later) / len(later)
        trainer_idle = sum(r["perf/rollout_s"] / r["perf/step_s"] for r in later) / len(later)
    rewards = [r["reward/mean"] for r in rows]
    return {
        "steps_per_hour": round(3600 / step_s, 1),
        "step_s": round(step_s, 2),
        "rollout_idle": round(rollout_idle, 3),
        "trainer_idle": round(trainer_idle, 3),
        "reward_slope": round(slope(rewards), 4),
        "reward_first3": round(sum(rewards[:3]) / 3, 3),
        "reward_last3": round(sum(rewards[-3:]) / 3, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="recipe override applied to every mode, e.g. rollout.max_new_tokens=256",
    )
    ap.add_argument("--recipe", default="quickstart", help="recipes/<recipe>.yaml")
    ap.add_argument("--ks", default="1,2", help="staleness bounds to run in async mode")
    ap.add_argument("--name", default="async_vs_sync", help="results/<name>.json")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="rlsys-async-bench-"))
    res: dict = {"steps": args.steps, "recipe": " ".join([args.recipe, *args.set])}
    ks = [int(k) for k in args.ks.split(",")]
    names = ["sync"] + [f"async{k}" for k in ks]
    for mode, k in [("sync", 0)] + [("async", k) for k in ks]:
        name = "sync" if mode == "sync" else f"async{k}"
        s = summarize(run(args.recipe, mode, k, args.steps, tmp, args.set), mode == "async")
        res.update({f"{name}_{key}": v for key, v in s.items()})
        print(name, s, flush=True)
    sync = res["sync_steps_per_hour"]
    for k in ks:
        res[f"speedup_k{k}"] = round(res[f"async{k}_steps_per_hour"] / sync, 3)
        res[f"rollout_idle_k{k}"] = res[f"async{k}_rollout_idle"]
        res[f"trainer_idle_k{k}"] = res[f"async{k}_trainer_idle"]
    print(
        f"\n{'mode':<8}{'steps/h':>9}{'step s':>8}{'roll idle':>10}{'train idle':>11}{'rew/step':>9}"
    )
    for name in names:
        print(
            f"{name:<8}{res[f'{name}_steps_per_hour']:>9}{res[f'{name}_step_s']:>8}"
            f"{res[f'{name}_rollout_idle']:>10}{res[f'{name}_trainer_idle']:>11}"
            f"{res[f'{name}_reward_slope']:>9}"
        )
    print(", ".join(f"speedup k={k} {res[f'speedup_k{k}']}x" for k in ks))
    print(f"wrote {write_results(args.name, res)}")


if __name__ == "__main__":
    main()
