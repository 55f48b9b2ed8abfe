"""Trainer peak memory and step time: ReMax vs PPO (with critic), same batch, default model.

Each algorithm runs in its own fresh subprocess: the real `TrainerWorker` of rlsys, built from
`recipes/remax.yaml` / `recipes/ppo.yaml` with the same KL setting for both (k1 penalty in the
reward, so both hold a reference model), is fed the same batch of 8 groups x 8 samples (prompts
from the arithmetic task, responses of 8-24 random tokens, rewards 0/1 from a fixed seed; ReMax
groups carry one extra greedy baseline sample that is scored but not trained on). Both use
gradient checkpointing (activations would otherwise dominate at this size).

Trainer peak memory (`*_peak_mem_gb`) = the peak of *live torch tensor bytes* over two training
steps (the warm-up step, which allocates the Adam states, and one steady-state step), counted by
`LiveTensorBytes`, a `TorchDispatchMode` entered before the trainer is built:

- every tensor an op takes or returns (args, kwargs and outputs, flattened) is reduced to its
  untyped storage; a storage is added (its `nbytes()`) the first time it is seen and removed
  by a weakref callback when it is freed (PyTorch keeps a storage's Python object alive as long
  as the storage itself, so the callback fires at the real free); views count once;
- Hugging Face loads checkpoint shards in worker threads, out of sight of the (thread-local)
  mode, and the bf16 reference's weights are a zero-copy mmap of the checkpoint file: so once
  the trainer is built, every tensor the garbage collector reaches is registered too;
- so the count covers parameters, buffers, gradients, optimizer states (created by the
  optimizer, or seen as inputs of its step), the reference model, the critic, and the
  activations, saved tensors and temporaries of forward/backward/step, each while it exists;
- the peak is sampled after every op's outputs are registered, so an op's inputs and outputs
  count together. Not counted: workspace a kernel allocates and frees inside one op (oneDNN
  scratch, the fused-Adam kernel's internals), tensors that live and die within another
  thread, and any non-tensor memory (Python objects, allocator caching and fragmentation, the
  torch/transformers runtime). It is the figure a perfect allocator would need, independent
  of glibc malloc and of what the OS reports.

Checks printed with the figures: a hand count of the state each trainer holds (parameters x
dtype size, fp32 gradients, AdamW moments, per model, from the live modules and optimizer),
the tracked live bytes after the build (= parameters and buffers) and after the steps
(= parameters + optimizer states + whatever gradients the engine keeps), and the bytes of
tensors the garbage collector reaches after the steps that the tracker does not count (a
tensor created where the mode could not see it and never used by an op under it; must be 0).

Secondary columns: the process's peak RSS (ru_maxrss, `*_peak_rss_gb`), which also holds the
runtime (~0.2-0.7 GB) and whatever the allocator keeps, and is not stable on CPU. Step time
(`*_step_s`) is the mean over `--steps` further steps run with the tracker off.

    .venv/bin/python benchmarks/remax_vs_ppo.py [--steps 3]
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import subprocess
import sys
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

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


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the distinct tensor storages alive now (`live`) and at most (`peak`), over
    every storage an op under this mode took or returned (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._size: dict[int, int] = {}  # id(storage object) -> bytes counted
        self._refs: dict[int, weakref.ref] = {}

    def _freed(self, key: int) -> None:
        self.live -= self._size.pop(key, 0)
        self._refs.pop(key, None)

    def add(self, t: object) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # no storage (sparse, some subclasses)
            return
        key, n = id(st), st.nbytes()
        old = self._size.get(key)
        if old is None:
            self._refs[key] = weakref.ref(st, lambda _, k=key: self._freed(k))
        if old != n:  # new, or resized in place
            self._size[key] = n
            self.live += n - (old or 0)

    def add_all(self, tensors) -> None:
        for t in tensors:
            self.add(t)
        self.peak = max(self.peak, self.live)

    def untracked(self, tensors) -> int:
        """Bytes of the distinct storages behind `tensors` that this tracker does not count."""
        missed: dict[int, int] = {}
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                if id(st) not in self._size:
                    missed[id(st)] = st.nbytes()
        return sum(missed.values())

    def reset_peak(self) -> None:
        self.peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.add_all(tree_leaves((args, kwargs, out)))
        return out


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


def run_one(algo: str, steps: int) -> dict:
    from rlsys import models
    from rlsys.config import load_recipe, to_dict
    from rlsys.trainer.worker import TrainerWorker

    cfg = load_recipe(ROOT / "recipes" / f"{algo}.yaml", SAME)
    path = models.resolve(cfg.model.path)
    torch.set_num_threads(2)
    base = current_rss_gb()  # Python + torch + transformers, before any trainer state
    tracker = LiveTensorBytes()
    with tracker:
        worker = TrainerWorker(to_dict(cfg), path)
        groups = make_groups(worker.tokenizer, remax=algo == "remax")
        # Transformers loads checkpoint shards in worker threads, where this (thread-local)
        # mode does not see them: the weights, and the bf16 reference's zero-copy mmap of the
        # checkpoint, are registered here, with every other tensor the process holds.
        missed_build = tracker.untracked(gc_tensors())
        tracker.add_all(gc_tensors())
        built_live, build_peak = tracker.live, tracker.peak
        tracker.reset_peak()
        t0 = time.perf_counter()
        worker.train_step(groups)  # warm-up: allocates the optimizer states
        warm_s = time.perf_counter() - t0
        warm_peak = tracker.peak
        worker.train_step(groups)  # steady state
        alive = gc_tensors()
        peak, live = tracker.peak, tracker.live
        scanned, missed = storage_bytes(alive), tracker.untracked(alive)
        del alive
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        worker.train_step(groups)
        times.append(time.perf_counter() - t0)
    return {
        "peak_gb": peak / GB,
        "warm_peak_gb": warm_peak / GB,
        "build_peak_gb": build_peak / GB,
        "built_live_gb": built_live / GB,
        "live_gb": live / GB,
        "gc_scan_gb": scanned / GB,
        "gc_untracked_gb": missed / GB,
        "build_untracked_gb": missed_build / GB,
        "rss_gb": peak_rss_gb(),
        "base_gb": base,
        "tracked_warmup_s": warm_s,
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
        )
        if out.returncode:
            sys.exit(f"{algo} child failed:\n{out.stderr[-4000:]}")
        res[algo] = json.loads(out.stdout.strip().splitlines()[-1])
        res[algo]["hand"] = hand_count(res[algo])
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
        "untracked",
        "tracked pk",
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
            x["gc_untracked_gb"],
            x["peak_gb"],
            x["peak_gb"] - h["state_max_grads"],
            x["rss_gb"],
        ]
        print(f"{algo:8}" + "".join(f"{v:11.3f}" for v in vals) + f"{x['step_s']:9.2f}")
    print(
        "(state = weights + buffers + AdamW moments; +max/all grad = with the largest / all fp32"
        " gradients; pk - grad = tracked peak - (state + max grad): activations, temporaries)"
    )
    print(
        f"ReMax / PPO tracked peak memory {fig['mem_ratio']:.2f}x (RSS {fig['rss_ratio']:.2f}x),"
        f" PPO / ReMax time {fig['speedup']:.2f}x"
    )
    print(f"wrote {write_results('remax_vs_ppo', fig)}")


if __name__ == "__main__":
    main()
