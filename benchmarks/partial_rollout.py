"""Partial rollouts (APRIL) vs waiting for every response (issue "Streaming buffer ...").

The native engine on the default model (SmolLM2-135M-Instruct, bf16), the long-tail length mix
of `benchmarks/rollout.py`: every sample gets a forced response length L (EOS ignored), drawn
per block of 64 samples from a Pareto(alpha 1) over [16, 512] with the block's longest set to
512. A round must deliver B groups of n samples (B x n = 64 by default), `--rounds` rounds:

- baseline: each round starts B new groups and waits until all of them are complete;
- partial: each round has ceil(over_provision x B) groups in flight, the unfinished groups of
  the last round first (continued from their token ids), and stops as soon as B groups are
  complete; the rest are aborted and recycled (`rlsys/rollout/partial.py`, as in training).

Group k has the same lengths in both modes. Throughput = tokens of the samples in completed
groups / wall seconds, summed over all rounds (a recycled sample's tokens count once, in the
round its group completes; work still unfinished after the last round counts for nothing,
which favours the baseline). Both use the same engine (max_batch = ceil(over_provision x B x
n) KV slots), the same threads, one process.

    .venv/bin/python benchmarks/partial_rollout.py   # writes benchmarks/results/partial_rollout.json
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import write_results  # noqa: E402
from rollout import long_tail_lengths  # noqa: E402


class Lengths:
    """Forced response length of sample j of group g: block-wise long-tail draws."""

    def __init__(self, n: int, seed: int, block: int = 64) -> None:
        self.n, self.seed, self.block, self.cache = n, seed, block, {}

    def __call__(self, g: int, j: int) -> int:
        i = g * self.n + j
        b = i // self.block
        if b not in self.cache:
            self.cache[b] = long_tail_lengths(self.block, self.seed + b)
        return self.cache[b][i % self.block]


def run_mode(engine, prompts, args, partial: bool) -> dict:
    from rlsys.rollout.engine import SamplingParams
    from rlsys.rollout.partial import run_round
    from rlsys.types import Sample, SampleGroup

    lengths = Lengths(args.n, args.seed)

    def params(s: Sample, budget: int) -> SamplingParams:
        left = lengths(s.group_id, s.index) - len(s.response_ids)
        return SamplingParams(
            temperature=1.0,
            seed=s.group_id * 1000 + s.index * 7 + len(s.response_ids),
            max_new_tokens=min(budget, left),
            ignore_eos=True,
        )

    next_gid, carry = 0, []
    done_tokens, done_groups, gen_tokens = 0, 0, 0
    in_flight = math.ceil(args.over_provision * args.groups) if partial else args.groups
    t0 = time.perf_counter()
    for _ in range(args.rounds):
        groups = list(carry)
        while len(groups) < in_flight:
            p = prompts[next_gid % len(prompts)]
            groups.append(
                SampleGroup(
                    next_gid,
                    [Sample(group_id=next_gid, index=j, prompt_ids=p) for j in range(args.n)],
                )
            )
            next_gid += 1
        res = run_round(engine, groups, args.groups, args.max_len, params)
        carry = res.partial
        gen_tokens += res.tokens
        done_groups += len(res.complete)
        done_tokens += sum(len(s.response_ids) for g in res.complete for s in g.samples)
    sec = time.perf_counter() - t0
    return {
        "tok_s": done_tokens / sec,
        "seconds": sec,
        "done_tokens": done_tokens,
        "done_groups": done_groups,
        "generated_tokens": gen_tokens,
        "unfinished_groups": len(carry),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--groups", type=int, default=8, help="B: groups a round must deliver")
    ap.add_argument("--n", type=int, default=8, help="samples per group")
    ap.add_argument("--over-provision", type=float, default=2.0)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny run, writes nothing")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.groups, args.n, args.max_len = 2, 2, 2, 64

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlsys import models
    from rlsys.rollout.native import NativeEngine
    from rlsys.tasks.arithmetic import make_task

    torch.set_num_threads(args.threads)
    path = models.resolve(models.SMOLLM2)
    tok = AutoTokenizer.from_pretrained(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).eval()
    slots = math.ceil(args.over_provision * args.groups) * args.n
    prompts = []
    for row in make_task(16, 0, seed=args.seed)[0]:  # arithmetic prompts, chat template
        text = tok.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
        prompts.append(tok(text, add_special_tokens=False)["input_ids"])
    width = max(len(p) for p in prompts) + args.max_len
    cfg = NativeEngine.Config(dtype=args.dtype, max_batch=slots, max_seq_len=width)
    engine = NativeEngine.from_hf_model(hf, tok, cfg)
    del hf
    base = run_mode(engine, prompts, args, partial=False)
    part = run_mode(engine, prompts, args, partial=True)
    gain = part["tok_s"] / base["tok_s"] - 1
    fig = {
        "baseline_tok_s": round(base["tok_s"], 1),
        "partial_tok_s": round(part["tok_s"], 1),
        "gain": round(gain, 3),
        "baseline_s": round(base["seconds"], 1),
        "partial_s": round(part["seconds"], 1),
        "baseline_done_groups": base["done_groups"],
        "partial_done_groups": part["done_groups"],
        "partial_unfinished_groups": part["unfinished_groups"],
        "rounds": args.rounds,
        "groups_per_round": args.groups,
        "samples_per_group": args.n,
        "over_provision": args.over_provision,
        "max_len": args.max_len,
        "dtype": args.dtype,
        "threads": args.threads,
    }
    print(f"{'mode':10} {'tok/s':>8} {'seconds':>8} {'groups done':>12}")
    for name, r in (("baseline", base), ("partial", part)):
        print(f"{name:10} {r['tok_s']:8.1f} {r['seconds']:8.1f} {r['done_groups']:12d}")
    print(f"gain (partial / baseline - 1): {gain:+.1%}")
    if not args.quick:
        print(f"wrote {write_results('partial_rollout', fig)}")


if __name__ == "__main__":
    main()
