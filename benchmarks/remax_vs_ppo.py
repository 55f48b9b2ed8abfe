"""Trainer peak memory and step time: ReMax vs PPO (with critic), same batch, default model.

Each algorithm runs in its own fresh subprocess: the real `TrainerWorker` of rlsys, built from
`recipes/remax.yaml` / `recipes/ppo.yaml` with the same KL setting for both (k1 penalty in the
reward, so both hold a reference model), is fed the same batch of 8 groups x 8 samples (prompts
from the arithmetic task, responses of 8-24 random tokens, rewards 0/1 from a fixed seed; ReMax
groups carry one extra greedy baseline sample that is scored but not trained on). Both use
gradient checkpointing (activations would otherwise dominate at this size).

Trainer peak memory (`*_peak_mem_gb`) = the bytes of every tensor alive when the trainer is
built (weights, buffers, the reference model, counted by walking the garbage collector's
tensors, one count per storage) + the peak, over two training steps (the warm-up step, which
allocates the Adam states, and one steady-state step), of the bytes the PyTorch CPU allocator
has handed out since the steps began and not yet taken back. That running total comes from the
profiler's memory reporting (`profile_memory=True`: the allocator reports each allocation and
each free of a block allocated while profiling, with the running total), so it counts
gradients, optimizer states, activations, saved tensors and the temporaries of
forward/backward/step, including workspace an op allocates and frees inside itself through the
PyTorch allocator, each while it exists. It is what a perfect allocator would need, independent
of glibc malloc and of what the OS reports. Not counted: memory outside the PyTorch allocator
(Python objects, oneDNN's own scratch, the torch/transformers runtime).

Earlier versions counted live tensor storages with a `TorchDispatchMode`; a Python dispatch
mode keeps extra references to the tensors it sees, which stops autograd from summing a tied
weight's two gradient contributions in place (one extra full-size copy of the embedding
gradient at the peak, 0.1 GB here): the profiler does not change what it measures.

Checks printed with the figures: a hand count of the state each trainer holds (parameters x
dtype size, fp32 gradients, AdamW moments, per model, from the live modules and optimizer), and
`unaccounted` = (built bytes + the allocator's net change over the steps) - the bytes of the
tensors alive after the steps: 0 unless a block allocated before the steps was freed during
them (the profiler cannot subtract a block whose size it never saw; the peak would then be an
over-estimate by at most that much).

The same pair also runs with `trainer.vocab_grad_fusion=false` (autograd's own accumulation
of the [V, H] embedding / LM-head gradients; `*_unfused` figures, memory only).

Secondary columns: the process's peak RSS (ru_maxrss, `*_peak_rss_gb`), which also holds the
runtime (~0.2-0.7 GB) and whatever the allocator keeps, and is not stable on CPU. Step time
(`*_step_s`) is the mean over `--steps` further steps run without the profiler.

    .venv/bin/python benchmarks/remax_vs_ppo.py [--steps 3] [--set key=value ...]

`--set` adds recipe overrides to both children (e.g. `trainer.precision=bf16`); the results
file is written only without it (the headline configuration).
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch._C._profiler import _ExtraFields_Allocation
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import current_rss_gb, peak_rss_gb, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GB = 2**30
SAME = [
    "algorithm.kl.mode=reward",
    "algorithm.kl.estimator=k1",
    "algorithm.kl.coef=0.001",
    "trainer.gradient_checkpointing=true",
]
UNFUSED = "trainer.vocab_grad_fusion=false"


class AllocatorPeak:
    """Peak and net bytes the PyTorch CPU allocator handed out in this thread while inside
    the `with` block, from the profiler's allocation events (see the module docstring)."""

    peak: int = 0
    net: int = 0

    def __enter__(self) -> AllocatorPeak:
        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._prof.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._prof.__exit__(*exc)
        stack = list(self._prof.profiler.kineto_results.experimental_event_tree())
        events = []
        while stack:
            node = stack.pop()
            stack.extend(node.children)
            x = node.extra_fields
            if isinstance(x, _ExtraFields_Allocation) and x.device.type == "cpu":
                events.append((node.start_time_ns, x.alloc_size, x.total_allocated))
        if events:
            events.sort(key=lambda e: e[0])
            base = events[0][2] - events[0][1]  # the running total before the first event
            self.peak = max(e[2] for e in events) - base
            self.net = events[-1][2] - base


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (None skipped)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            st = t.untyped_storage()
            seen[st.data_ptr() or id(st)] = st.nbytes()
    return sum(seen.values())


def gc_tensors() -> list[torch.Tensor]:
    """Every tensor the garbage collector reaches."""
    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]


def describe(engine) -> dict:
    """What one TrainEngine holds: parameter count/dtype/bytes, buffers, gradients kept now,
    optimizer states (bytes, device) and the fp32 gradient bytes a backward produces."""
    if engine is None:
        return {}
    mod = engine.module
    params = list(mod.parameters())
    numel = sum(p.numel() for p in {id(p): p for p in params}.values())
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in params})
    d = {
        "params_m": numel / 1e6,
        "dtype": "/".join(dtypes),
        "params_gb": storage_bytes(params) / GB,
        "buffers_gb": storage_bytes(mod.buffers()) / GB,
        "grads_now_gb": storage_bytes(p.grad for p in params) / GB,
        "grads_gb": 0.0,
        "opt_gb": 0.0,
        "opt_device": "-",
        "opt_kind": "-",
    }
    if engine.trainable:
        d["grads_gb"] = storage_bytes(p for p in params if p.requires_grad) / GB
        opt = engine.engine.optimizer
        inner = getattr(opt, "optimizer", opt)
        states = [v for s in inner.state.values() for v in s.values()]
        d["opt_gb"] = storage_bytes(states) / GB
        d["opt_device"] = ",".join(sorted({str(v.device) for v in states if torch.is_tensor(v)}))
        fused = inner.defaults.get("fused")
        d["opt_kind"] = f"{type(opt).__name__}/{type(inner).__name__} fused={fused}"
    return d


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


def run_one(algo: str, steps: int, extra: list[str]) -> dict:
    from rlsys import models
    from rlsys.config import load_recipe, to_dict
    from rlsys.trainer.worker import TrainerWorker

    cfg = load_recipe(ROOT / "recipes" / f"{algo}.yaml", SAME + extra)
    path = models.resolve(cfg.model.path)
    torch.set_num_threads(2)
    base = current_rss_gb()  # Python + torch + transformers, before any trainer state
    worker = TrainerWorker(to_dict(cfg), path)
    groups = make_groups(worker.tokenizer, remax=algo == "remax")
    built = storage_bytes(gc_tensors())  # weights, buffers, the reference model
    with AllocatorPeak() as warm:
        t0 = time.perf_counter()
        worker.train_step(groups)  # warm-up: allocates the optimizer states
        warm_s = time.perf_counter() - t0
    with AllocatorPeak() as steady:
        worker.train_step(groups)  # steady state
    live = storage_bytes(gc_tensors())
    net = warm.net + steady.net
    peak = built + max(warm.peak, warm.net + steady.peak)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        worker.train_step(groups)
        times.append(time.perf_counter() - t0)
    return {
        "peak_gb": peak / GB,
        "warm_peak_gb": (built + warm.peak) / GB,
        "built_live_gb": built / GB,
        "live_gb": live / GB,
        "unaccounted_gb": (built + net - live) / GB,
        "rss_gb": peak_rss_gb(),
        "base_gb": base,
        "profiled_warmup_s": warm_s,
        "step_s": sum(times) / len(times),
        "engines": {
            "policy": describe(worker.policy),
            "ref": describe(worker.ref),
            "critic": describe(worker.critic),
        },
    }


def hand_count(r: dict) -> dict:
    """GB of the persistent state (weights + buffers + AdamW moments of every engine), and of
    that plus the largest / all of the trained models' fp32 gradients (the engine drops its
    gradients at each optimizer step, so PPO's policy and critic gradients need not coexist)."""
    e = [v for v in r["engines"].values() if v]
    state = sum(v["params_gb"] + v["buffers_gb"] + v["opt_gb"] for v in e)
    grads = [v["grads_gb"] for v in e if v["grads_gb"]]
    return {
        "state": state,
        "state_max_grads": state + max(grads),
        "state_all_grads": state + sum(grads),
    }


def child(algo: str, steps: int, extra: list[str]) -> dict:
    """`run_one` in a fresh process (its own allocator, its own peak RSS)."""
    cmd = [sys.executable, __file__, "--child", algo, "--steps", str(steps), "--set", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{algo} child failed:\n{out.stderr[-4000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["hand"] = hand_count(res)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--child", choices=["remax", "ppo", "grpo"])
    ap.add_argument("--set", nargs="*", default=[], help="extra recipe overrides for both")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child, args.steps, args.set)))
        return
    res = {algo: child(algo, args.steps, args.set) for algo in ("remax", "ppo")}
    # The same pair without the vocabulary gradient fusion (memory only: one timed step).
    off = {algo: child(algo, 1, [*args.set, UNFUSED]) for algo in ("remax", "ppo")}
    r, p = res["remax"], res["ppo"]
    fig = {
        "remax_peak_mem_gb": round(r["peak_gb"], 3),
        "ppo_peak_mem_gb": round(p["peak_gb"], 3),
        "mem_ratio": round(r["peak_gb"] / p["peak_gb"], 3),
        "remax_state_gb": round(r["hand"]["state"], 3),
        "ppo_state_gb": round(p["hand"]["state"], 3),
        "remax_peak_rss_gb": round(r["rss_gb"], 3),
        "ppo_peak_rss_gb": round(p["rss_gb"], 3),
        "rss_ratio": round(r["rss_gb"] / p["rss_gb"], 3),
        "runtime_base_gb": round(r["base_gb"], 3),
        "remax_step_s": round(r["step_s"], 2),
        "ppo_step_s": round(p["step_s"], 2),
        "speedup": round(p["step_s"] / r["step_s"], 2),
        "steps": args.steps,
        "remax_peak_mem_gb_unfused": round(off["remax"]["peak_gb"], 3),
        "ppo_peak_mem_gb_unfused": round(off["ppo"]["peak_gb"], 3),
        "mem_ratio_unfused": round(off["remax"]["peak_gb"] / off["ppo"]["peak_gb"], 3),
    }
    print("What each trainer holds (GB; grads = fp32 gradients one backward produces):")
    print(
        f"{'':8}{'engine':8}{'params':>9}{'dtype':>10}{'weights':>9}{'grads':>8}"
        f"{'AdamW':>8}  optimizer state on"
    )
    for algo in ("remax", "ppo"):
        for name, e in res[algo]["engines"].items():
            if e:
                print(
                    f"{algo:8}{name:8}{e['params_m']:8.1f}M{e['dtype']:>10}"
                    f"{e['params_gb'] + e['buffers_gb']:9.3f}{e['grads_gb']:8.3f}"
                    f"{e['opt_gb']:8.3f}  {e['opt_device']} {e['opt_kind']}"
                )
    print()
    head = [
        "state",
        "+max grad",
        "+all grad",
        "live built",
        "live after",
        "unaccounted",
        "peak",
        "pk - grad",
        "peak RSS",
    ]
    print(f"{'':8}" + "".join(f"{h:>11}" for h in head) + f"{'step s':>9}")
    for algo in ("remax", "ppo"):
        x, h = res[algo], res[algo]["hand"]
        vals = [
            h["state"],
            h["state_max_grads"],
            h["state_all_grads"],
            x["built_live_gb"],
            x["live_gb"],
            x["unaccounted_gb"],
            x["peak_gb"],
            x["peak_gb"] - h["state_max_grads"],
            x["rss_gb"],
        ]
        print(f"{algo:8}" + "".join(f"{v:11.3f}" for v in vals) + f"{x['step_s']:9.2f}")
    print(
        "(state = weights + buffers + AdamW moments; +max/all grad = with the largest / all fp32"
        " gradients; pk - grad = peak - (state + max grad): activations, temporaries)"
    )
    print(
        f"ReMax / PPO peak memory {fig['mem_ratio']:.3f}x (RSS {fig['rss_ratio']:.2f}x),"
        f" PPO / ReMax time {fig['speedup']:.2f}x"
    )
    print(
        f"{UNFUSED}: ReMax {fig['remax_peak_mem_gb_unfused']:.3f} GB, PPO"
        f" {fig['ppo_peak_mem_gb_unfused']:.3f} GB, {fig['mem_ratio_unfused']:.3f}x"
    )
    if args.set:
        print(f"overrides {args.set}: results not written")
    else:
        print(f"wrote {write_results('remax_vs_ppo', fig)}")


if __name__ == "__main__":
    main()
