"""Turn control on the tool recipe: tokens per solved task and solve rate, unlimited vs fixed
vs dynamic, side by side ("More with Less", REFERENCES.md).

Workload: `recipes/tool_arithmetic.yaml` (SmolLM2-135M-Instruct, sandboxed Python tool, reward
1 for the right final answer), the same `--prompts` training problems x `--samples` samples
for every policy, sampled at `--temperature` (0.6: at 1.0 the untrained 135M model almost never
solves one) with the same seeds, through the real
rollout path (`RolloutWorker` in this process: native engine, agent loop, sandbox, reward).
No training: the figures describe the rollout cost of each policy on one fixed policy.

Policies (every trajectory also stops at `turns.max_total_tokens` response tokens):

- unlimited: no turn limit (`rollout.turns.policy=unlimited`).
- fixed: the 75th percentile of the turns unlimited trajectories used, rounded up, with a
  reminder of the turns left before the last turn, appended to the tool output
  (`reminder_placement=append`).
- fixed_message: the same, the reminder as its own user message (the paper's form). The 135M
  model reads a second user message as a new task and stops answering (RESULTS.md).
- fixed_no_reminder: the same limit without any reminder.
- dynamic: the same base budget; the appended reminder tells the model it may write
  `<more_turns/>` for one more turn, granted up to the unlimited run's maximum turns.

Figures: `<policy>_tokens_per_solve` = all response tokens (model + tool output) of all
trajectories / solved trajectories; `<policy>_model_tokens_per_solve` counts generated tokens
only; `<policy>_solve_rate`; the cost cuts relative to unlimited.

    python benchmarks/turn_control.py            # writes benchmarks/results/turn_control.json
    python benchmarks/turn_control.py --quick    # 4 x 2 trajectories, writes nothing
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import write_results  # noqa: E402


def run_policy(overrides: list[str], prompts, seed: int) -> dict:
    """Roll out `prompts` under the recipe + overrides; per-trajectory turns/tokens/solves."""
    from rlsys import models
    from rlsys.config import load_recipe, to_dict
    from rlsys.rollout.worker import RolloutWorker

    cfg = load_recipe(ROOT / "recipes" / "tool_arithmetic.yaml", overrides)
    worker = RolloutWorker(to_dict(cfg), models.resolve(cfg.model.path))
    t0 = time.perf_counter()
    out = worker.generate(prompts, list(range(len(prompts))), seed)
    dt = time.perf_counter() - t0
    samples = [s for g in out["groups"] for s in g.samples]
    st = out["stats"]
    return {
        "turns": [s.turns for s in samples],
        "tokens": [len(s.response_ids) for s in samples],
        "model_tokens": [sum(s.loss_mask) for s in samples],
        "solved": [s.reward >= cfg.eval.solve_threshold for s in samples],
        "seconds": dt,
        "texts": [s.meta.get("response_text", "") for s in samples],
        "extensions": st.get("rollout/agent/extensions_granted", 0.0),
        "reminders": st.get("rollout/agent/reminders", 0.0),
        "tool_calls": st.get("rollout/agent/tool_calls", 0.0),
    }


def percentile(xs: list[int], q: float) -> int:
    """The q-quantile (nearest rank, rounded up)."""
    s = sorted(xs)
    return s[max(0, math.ceil(q * len(s)) - 1)]


def summarize(name: str, r: dict) -> dict:
    solves = sum(r["solved"])
    n = len(r["solved"])
    return {
        f"{name}_solve_rate": round(solves / n, 4),
        f"{name}_tokens_per_solve": round(sum(r["tokens"]) / solves, 1) if solves else None,
        f"{name}_model_tokens_per_solve": round(sum(r["model_tokens"]) / solves, 1)
        if solves
        else None,
        f"{name}_tokens_per_traj": round(sum(r["tokens"]) / n, 1),
        f"{name}_turns_mean": round(sum(r["turns"]) / n, 3),
        f"{name}_tool_calls": r["tool_calls"],
        f"{name}_reminders": r["reminders"],
        f"{name}_extensions": r["extensions"],
        f"{name}_seconds": round(r["seconds"], 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--max-total-tokens", type=int, default=512)
    ap.add_argument("--quick", action="store_true", help="4 x 2 trajectories, writes nothing")
    args = ap.parse_args()
    if args.quick:
        args.prompts, args.samples = 4, 2
    from transformers import AutoTokenizer

    from rlsys import models
    from rlsys.config import load_recipe
    from rlsys.data import load_splits

    base = [
        f"rollout.prompts_per_step={args.prompts}",
        f"rollout.n_samples_per_prompt={args.samples}",
        f"rollout.max_batch={args.prompts * args.samples}",
        f"rollout.turns.max_total_tokens={args.max_total_tokens}",
        "data.num_eval=8",
        f"rollout.temperature={args.temperature}",
    ]
    cfg = load_recipe(ROOT / "recipes" / "tool_arithmetic.yaml", base)
    tok = AutoTokenizer.from_pretrained(models.resolve(cfg.model.path))
    train, _ = load_splits(cfg.data, tok, cfg.seed)
    prompts = train[: args.prompts]

    unlimited = run_policy([*base, "rollout.turns.policy=unlimited"], prompts, args.seed)
    fixed_n = percentile(unlimited["turns"], 0.75)
    fixed_args = [*base, "rollout.turns.policy=fixed", f"rollout.turns.max_turns={fixed_n}"]
    append = "rollout.turns.reminder_placement=append"
    fixed = run_policy([*fixed_args, append], prompts, args.seed)
    fixed_message = run_policy(fixed_args, prompts, args.seed)
    fixed_quiet = run_policy([*fixed_args, "rollout.turns.reminder_turns=0"], prompts, args.seed)
    base_n = fixed_n
    cap = max(max(unlimited["turns"]), base_n)
    dynamic = run_policy(
        [
            *base,
            "rollout.turns.policy=dynamic",
            f"rollout.turns.max_turns={base_n}",
            "rollout.turns.extension_turns=1",
            f"rollout.turns.hard_cap={cap}",
            append,
        ],
        prompts,
        args.seed,
    )
    res: dict = {
        "trajectories": len(unlimited["solved"]),
        "fixed_max_turns": fixed_n,
        "dynamic_base_turns": base_n,
        "dynamic_hard_cap": cap,
        "max_total_tokens": args.max_total_tokens,
    }
    runs = {"unlimited": unlimited, "fixed": fixed, "fixed_message": fixed_message}
    runs.update({"fixed_no_reminder": fixed_quiet, "dynamic": dynamic})
    for name, r in runs.items():
        res.update(summarize(name, r))
    u = res["unlimited_tokens_per_solve"]
    for name in ("fixed", "fixed_message", "fixed_no_reminder", "dynamic"):
        t = res[f"{name}_tokens_per_solve"]
        res[f"{name}_cost_cut_vs_unlimited"] = round(1 - t / u, 4) if t and u else None
    f, d = res["fixed_tokens_per_solve"], res["dynamic_tokens_per_solve"]
    res["dynamic_cost_cut_vs_fixed"] = round(1 - d / f, 4) if f and d else None

    print(f"\n{res['trajectories']} trajectories per policy (tool_arithmetic, SmolLM2-135M)")
    print(f"{'policy':<19}{'solve':>8}{'tok/solve':>11}{'gen tok/solve':>15}{'turns':>7}")
    for name in runs:
        print(
            f"{name:<19}{res[f'{name}_solve_rate']:>8.3f}"
            f"{_fmt(res[f'{name}_tokens_per_solve']):>11}"
            f"{_fmt(res[f'{name}_model_tokens_per_solve']):>15}"
            f"{res[f'{name}_turns_mean']:>7.2f}"
        )
    print(
        f"fixed = {fixed_n} turns (p75 of unlimited); dynamic base {base_n}, cap {cap}; "
        f"cost cut fixed {_fmt(res['fixed_cost_cut_vs_unlimited'])}, dynamic "
        f"{_fmt(res['dynamic_cost_cut_vs_unlimited'])} (vs fixed "
        f"{_fmt(res['dynamic_cost_cut_vs_fixed'])})"
    )
    if not args.quick:
        print(f"wrote {write_results('turn_control', res)}")


def _fmt(x) -> str:
    return "-" if x is None else f"{x:,.3f}" if isinstance(x, float) and abs(x) < 10 else str(x)


if __name__ == "__main__":
    main()
