"""Trainer peak memory and step time: packed micro-batches as first-fit-decreasing makes them
vs `pack_bins` (FFD's fullest bin first, then the other samples, longest first, cut into
runs of near-equal token counts).

A step's peak is that of its worst micro-batch, and every micro-batch after the first runs
beside the gradients accumulated so far; FFD fills its later bins to the brim too (8 groups of
the quickstart: 2048 + 2048 + 64 tokens). Both policies give the same number of micro-batches.

Each (shape, policy) runs in a fresh child process: the real `TrainerWorker` from
`recipes/quickstart.yaml`, fed 8, 12 and 16 quickstart-shaped groups
(`trainer_step.make_groups`: 40-56 prompt and 6-24 response tokens, 8 samples per group), one warm-up step (allocates the AdamW
states), then one step under the PyTorch allocator's profiler (`remax_vs_ppo.AllocatorPeak`:
the peak bytes handed out and not yet taken back, allocator-exact) and `--steps` timed steps.
Peak = live tensors after the build + that steady-step peak.

Step time: the best of `--rounds` children per policy, run alternately (this machine's step
times move by 10-20% from run to run; the peaks are allocator-exact: `*_peak_spread_gb` is
their spread over the rounds).

    .venv/bin/python benchmarks/micro_batching.py [--steps 2 --rounds 2]   # ~14 min
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402

GB = 2**30
SHAPES = {"q8": 8, "q12": 12, "q16": 16}  # groups of 8 samples per step
POLICIES = ("ffd", "pack_bins")


def child(groups: int, policy: str, steps: int) -> dict:
    import torch
    from remax_vs_ppo import AllocatorPeak, gc_tensors, storage_bytes
    from trainer_step import make_groups

    import rlsys.buffer.packing as packing
    from rlsys import models
    from rlsys.config import load_recipe, to_dict
    from rlsys.trainer.worker import TrainerWorker

    if policy == "ffd":
        packing.pack_bins = packing.first_fit_decreasing
    cfg = load_recipe("recipes/quickstart.yaml", [])
    torch.set_num_threads(2)
    worker = TrainerWorker(to_dict(cfg), models.resolve(cfg.model.path))
    batch = make_groups(n_groups=groups)
    lengths = [len(s.prompt_ids) + len(s.response_ids) for g in batch for s in g.samples]
    bins = packing.pack_bins(lengths, cfg.trainer.micro_batch_tokens)
    worker.train_step(batch)  # warm-up: the AdamW states
    built = storage_bytes(gc_tensors())
    with AllocatorPeak() as steady:
        worker.train_step(batch)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        worker.train_step(batch)
        times.append(time.perf_counter() - t0)
    return {
        "bins": [sum(lengths[i] for i in b) for b in bins],
        "peak_gb": (built + steady.peak) / GB,
        "step_s": sum(times) / len(times),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--child", nargs=2, metavar=("GROUPS", "POLICY"))
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.child[1], args.steps)))
        return
    fig: dict[str, float] = {}
    print(f"{'shape':6} {'policy':10} {'micro-batch tokens':28} {'peak GB':>8} {'s/step':>7}")
    for shape, groups in SHAPES.items():
        runs: dict[str, list[dict]] = {p: [] for p in POLICIES}
        for _ in range(args.rounds):
            for policy in POLICIES:
                cmd = [sys.executable, __file__, "--child", str(groups), policy]
                out = subprocess.run(
                    [*cmd, "--steps", str(args.steps)], check=True, capture_output=True, text=True
                ).stdout
                runs[policy].append(json.loads(out.strip().splitlines()[-1]))
        for policy in POLICIES:
            r = min(runs[policy], key=lambda x: x["step_s"])
            peaks = [x["peak_gb"] for x in runs[policy]]
            bins = "+".join(str(b) for b in r["bins"])
            print(f"{shape:6} {policy:10} {bins:28} {r['peak_gb']:8.3f} {r['step_s']:7.2f}")
            fig[f"{shape}_{policy}_peak_gb"] = round(r["peak_gb"], 3)
            fig[f"{shape}_{policy}_step_s"] = round(r["step_s"], 2)
            fig[f"{shape}_{policy}_largest_later_bin"] = max(r["bins"][1:], default=0)
            fig[f"{shape}_{policy}_peak_spread_gb"] = round(max(peaks) - min(peaks), 6)
        fig[f"{shape}_peak_saved_gb"] = round(
            fig[f"{shape}_ffd_peak_gb"] - fig[f"{shape}_pack_bins_peak_gb"], 3
        )
    print(f"wrote {write_results('micro_batching', fig)}")


if __name__ == "__main__":
    main()
