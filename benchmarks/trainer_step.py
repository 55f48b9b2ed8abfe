"""Where a CPU trainer step's time went, and two fixes measured side by side.

1. LM head under the trainer's bf16 autocast (fused logprob + entropy, forward + backward,
   SmolLM2-135M's head H=576, V=49152): tile GEMMs in fp32 (rlsys until 2026-12-02: the
   fused path switched autocast off) vs bf16 operands with fp32 accumulation (now: what
   autocast does to the naive path's lm_head operands, via oneDNN's bf16 math mode), and the
   naive [T, V] path under autocast. Errors = max |logprob - float64 reference| / max
   |reference|, the reference on the bf16-rounded operands (autocast's own definition of the
   result) and on the raw fp32 operands.
2. A quickstart-shaped trainer step (`TrainerWorker`, GRPO, 8 prompts x 8 samples of 40-56
   prompt and 6-24 response tokens, packed rows of 2048), each in a fresh child process:
   glibc malloc as it comes; `rlsys.allocator.keep_freed_memory(large_blocks=False)` (blocks
   under 32 MiB kept); `keep_freed_memory()` (every block kept: what every rlsys actor now
   runs). Per step: wall seconds, minor page faults, system CPU seconds, peak RSS; mean of
   `--steps` steps after one warm-up step.

    .venv/bin/python benchmarks/trainer_step.py     # ~6 min; writes results/trainer_step.json
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import packing  # noqa: E402
from _common import write_results  # noqa: E402

H, V = 576, 49152
# glibc as it comes; blocks < 32 MiB kept (no trimming); every block kept (no mmap: default)
MALLOC = ("glibc", "keep_small", "keep")


def lm_head(t: int, reps: int) -> dict[str, dict[str, float]]:
    import torch

    from rlsys.kernels.logprob import chunked_logprob_entropy
    from rlsys.kernels.reference import logprob_entropy_ref

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(t, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 2.0 / H**0.5
    y = torch.randint(0, V, (t,), generator=g)
    want, _ = logprob_entropy_ref(hidden.bfloat16().double(), weight.bfloat16().double(), y)
    exact, _ = logprob_entropy_ref(hidden.double(), weight.double(), y)
    variants = {
        "fused_fp32_gemm": lambda h, w: chunked_logprob_entropy(h, w, y, lowp=None),
        "fused_bf16_operands": lambda h, w: chunked_logprob_entropy(h, w, y, lowp=torch.bfloat16),
        "naive_autocast": lambda h, w: _naive(h, w, y),
    }
    out = {}
    for name, fn in variants.items():
        best, err = float("inf"), 0.0
        for _ in range(reps):
            h = hidden.clone().requires_grad_()
            w = weight.clone().requires_grad_()
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
                lp, ent = fn(h, w)
            (lp.sum() + 0.01 * ent.sum()).backward()
            best = min(best, time.perf_counter() - t0)
            err = float((lp.detach().double() - want).abs().max() / want.abs().max())
            err_raw = float((lp.detach().double() - exact).abs().max() / exact.abs().max())
        out[name] = {"s": best, "rel_err": err, "rel_err_raw": err_raw}
    return out


def _naive(h, w, y):
    import torch

    logits = torch.nn.functional.linear(h, w).float()  # bf16 under autocast, as the trainer's
    logsm = torch.log_softmax(logits, -1)
    return logsm.gather(-1, y[:, None]).squeeze(-1), -(logsm.exp() * logsm).sum(-1)


def make_groups(seed: int = 0, n_groups: int = 8, n: int = 8) -> list:
    """The quickstart's shape: 40-56 prompt tokens, 6-24 response tokens."""
    rng = random.Random(seed)
    lengths = [rng.randint(6, 24) for _ in range(n_groups * n)]
    return packing.make_groups(n_groups, n, seed, lengths, prompt_len=(40, 56))


def child(malloc: str, steps: int) -> dict[str, float]:
    """One trainer in this process; `malloc` "glibc" leaves the allocator as it comes."""
    import torch

    import rlsys.allocator
    from rlsys import models
    from rlsys.config import load_recipe, to_dict
    from rlsys.trainer.worker import TrainerWorker

    if malloc == "glibc":
        rlsys.allocator.keep_freed_memory = lambda: False
    elif malloc == "keep_small":
        keep = rlsys.allocator.keep_freed_memory
        rlsys.allocator.keep_freed_memory = lambda: keep(large_blocks=False)
    cfg = load_recipe("recipes/quickstart.yaml", [])
    torch.set_num_threads(2)
    worker = TrainerWorker(to_dict(cfg), models.resolve(cfg.model.path))
    groups = make_groups()
    worker.train_step(groups)
    wall = faults = sys_s = 0.0
    for _ in range(steps):
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        worker.train_step(groups)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        wall += time.perf_counter() - t0
        faults += r1.ru_minflt - r0.ru_minflt
        sys_s += r1.ru_stime - r0.ru_stime
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"step_s": wall / steps, "faults": faults / steps, "sys_s": sys_s / steps, "rss": rss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--child", choices=MALLOC)
    ap.add_argument("--quick", action="store_true", help="small run, writes nothing")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps)))
        return
    if args.quick:
        args.steps, args.tokens, args.reps = 1, [256], 1
    fig: dict[str, float] = {}
    print(f"LM head fwd+bwd under bf16 autocast (H={H}, V={V}), best of {args.reps}:")
    print(f"{'T':>6} {'variant':22} {'seconds':>8} {'err bf16 ops':>13} {'err fp32 ops':>13}")
    for t in args.tokens:
        for name, r in lm_head(t, args.reps).items():
            print(f"{t:6d} {name:22} {r['s']:8.3f} {r['rel_err']:13.1e} {r['rel_err_raw']:13.1e}")
            fig[f"lm_head_t{t}_{name}_s"] = round(r["s"], 3)
            fig[f"lm_head_t{t}_{name}_rel_err"] = float(f"{r['rel_err']:.2e}")
            fig[f"lm_head_t{t}_{name}_rel_err_raw"] = float(f"{r['rel_err_raw']:.2e}")
        fig[f"lm_head_t{t}_speedup"] = round(
            fig[f"lm_head_t{t}_fused_fp32_gemm_s"] / fig[f"lm_head_t{t}_fused_bf16_operands_s"], 2
        )
    print(f"\nquickstart-shaped trainer step, {args.steps} steps after a warm-up, fresh process:")
    print(f"{'malloc':10} {'s/step':>8} {'faults/step':>12} {'sys s/step':>11} {'peak RSS GB':>12}")
    for mode in MALLOC:
        cmd = [sys.executable, __file__, "--child", mode, "--steps", str(args.steps)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(
            f"{mode:10} {r['step_s']:8.2f} {r['faults']:12.0f} {r['sys_s']:11.2f} {r['rss']:12.2f}"
        )
        fig[f"step_{mode}_s"] = round(r["step_s"], 2)
        fig[f"faults_{mode}"] = round(r["faults"])
        fig[f"sys_{mode}_s"] = round(r["sys_s"], 2)
        fig[f"peak_rss_{mode}_gb"] = round(r["rss"], 2)
    for mode in MALLOC[1:]:
        fig[f"step_speedup_{mode}"] = round(fig["step_glibc_s"] / fig[f"step_{mode}_s"], 3)
        print(f"{mode} over glibc: {fig[f'step_speedup_{mode}']:.2f}x")
    if not args.quick:
        print(f"wrote {write_results('trainer_step', fig)}")


if __name__ == "__main__":
    main()
