"""Trainer throughput with sequence packing vs padded micro-batches (issue "Sharded trainer").

Workload (fixed seed): 8 groups x 4 samples of the default model (SmolLM2-135M-Instruct),
prompts of 24-40 tokens, responses with the long-tail lengths of `benchmarks/rollout.py`
(Pareto alpha 1 over [16, 512], the longest set to 512). One `TrainerWorker` step each (GRPO,
bf16 autocast, fused logprobs), same batch, same process:

- padded: `trainer.packing=false`, micro-batches of `--mbs` samples in batch order, each
  right-padded to its longest sample (what a trainer without packing computes);
- packed, dense mask: `trainer.packing=true trainer.packed_attention=false`, samples
  first-fit-decreasing into rows of `--tokens` tokens, attention by transformers' SDPA over
  the row's dense block-diagonal causal mask (all L x L scores computed; the trainer before
  2026-12-01);
- packed (the default now): the same rows on the `rlsys_packed` attention
  (`rlsys/trainer/attention.py`: each sample attends only to itself; length-grouped batched
  SDPA on CPU).

tokens/s = real (prompt + response) tokens of the batch / seconds per step, mean of `--steps`
steps after one warm-up step.

    .venv/bin/python benchmarks/packing.py      # writes benchmarks/results/packing.json
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import write_results  # noqa: E402
from rollout import long_tail_lengths  # noqa: E402


def make_groups(
    n_groups: int,
    n: int,
    seed: int,
    lengths: list[int] | None = None,
    prompt_len: tuple[int, int] = (24, 40),
) -> list:
    """Scored groups of random token ids: prompts of `prompt_len` tokens, responses of
    `lengths` (default: the long-tail mix of `benchmarks/rollout.py`)."""
    from rlsys.types import Sample, SampleGroup, Status

    rng = random.Random(seed)
    lengths = lengths or long_tail_lengths(n_groups * n, seed)
    groups = []
    for g in range(n_groups):
        prompt = [rng.randrange(100, 40000) for _ in range(rng.randint(*prompt_len))]
        samples = []
        for j in range(n):
            s = Sample(group_id=g, index=j, prompt_ids=prompt)
            k = lengths[g * n + j]
            s.append([rng.randrange(100, 40000) for _ in range(k)], [-1.0] * k, 0, True)
            s.finish(Status.DONE, "stop")
            s.reward = float(rng.random() < 0.5)
            samples.append(s)
        groups.append(SampleGroup(g, samples))
    return groups


def run(packing: bool, args: argparse.Namespace, groups: list, dense: bool = False) -> dict:
    import torch

    from rlsys import models
    from rlsys.config import load_recipe, to_dict
    from rlsys.trainer.worker import TrainerWorker

    cfg = load_recipe(
        None,
        [
            "model.path=smollm2-135m-instruct",
            f"trainer.packing={str(packing).lower()}",
            f"trainer.micro_batch_size={args.mbs}",
            f"trainer.micro_batch_tokens={args.tokens}",
            "trainer.lr=1e-6",
            f"rollout.n_samples_per_prompt={len(groups[0].samples)}",
            f"rollout.prompts_per_step={len(groups)}",
            f"trainer.packed_attention={str(not dense).lower()}",
        ],
    )
    torch.set_num_threads(args.threads)
    worker = TrainerWorker(to_dict(cfg), models.resolve(cfg.model.path))
    worker.train_step(groups)  # warm-up
    times, mbs = [], 0.0
    for _ in range(args.steps):
        t0 = time.perf_counter()
        m = worker.train_step(groups)
        times.append(time.perf_counter() - t0)
        mbs = m["train/micro_batches"]
    tokens = sum(len(s.prompt_ids) + len(s.response_ids) for g in groups for s in g.samples)
    sec = sum(times) / len(times)
    del worker
    return {"tok_s": tokens / sec, "step_s": sec, "tokens": tokens, "micro_batches": mbs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--mbs", type=int, default=8, help="samples per padded micro-batch")
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per packed row")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny run, writes nothing")
    args = ap.parse_args()
    if args.quick:
        args.groups, args.n, args.steps = 2, 2, 1
    groups = make_groups(args.groups, args.n, args.seed)
    padded = run(False, args, groups)
    dense = run(True, args, groups, dense=True)
    packed = run(True, args, groups)
    fig = {
        "padded_tok_s": round(padded["tok_s"], 1),
        "packed_dense_tok_s": round(dense["tok_s"], 1),
        "packed_tok_s": round(packed["tok_s"], 1),
        "speedup": round(packed["tok_s"] / padded["tok_s"], 3),
        "varlen_over_dense": round(packed["tok_s"] / dense["tok_s"], 3),
        "padded_step_s": round(padded["step_s"], 2),
        "packed_dense_step_s": round(dense["step_s"], 2),
        "packed_step_s": round(packed["step_s"], 2),
        "padded_micro_batches": padded["micro_batches"],
        "packed_micro_batches": packed["micro_batches"],
        "batch_tokens": padded["tokens"],
        "samples": args.groups * args.n,
        "threads": args.threads,
    }
    print(f"{'':20} {'tokens/s':>10} {'s/step':>8} {'micro-batches':>14}")
    for name, r in (("padded", padded), ("packed, dense mask", dense), ("packed", packed)):
        print(f"{name:20} {r['tok_s']:10.1f} {r['step_s']:8.2f} {r['micro_batches']:14.0f}")
    print(f"speedup (packed / padded): {fig['speedup']:.2f}x")
    print(f"packed attention vs the dense mask: {fig['varlen_over_dense']:.2f}x")
    if not args.quick:
        print(f"wrote {write_results('packing', fig)}")


if __name__ == "__main__":
    main()
