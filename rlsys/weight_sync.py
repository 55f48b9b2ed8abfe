"""Weight sync, trainer -> rollout workers (Foundation transfer: the Ray object store).

The trainer puts its full state dict (cast to the rollout dtype) into the object store once;
every rollout worker reads the same shared-memory object and loads it in place. Issue
"Streaming buffer ... weight sync" replaces this with bucketed torch.distributed broadcasts.
"""

from __future__ import annotations

import time

import ray


def push_weights(trainer, workers: list, version: int, dtype: str, nbytes: int) -> dict[str, float]:
    """Copy the trainer's (a `TrainerGroup`) weights to every worker; returns `sync/*` metrics."""
    t0 = time.perf_counter()
    ref = trainer.weights_ref(dtype)
    versions = ray.get([w.update_weights.remote(ref, version) for w in workers])
    if any(v != version for v in versions):
        raise RuntimeError(f"weight sync: workers report versions {versions}, expected {version}")
    dt = time.perf_counter() - t0
    return {
        "sync/seconds": dt,
        "sync/gb_per_s": nbytes * len(workers) / dt / 1e9,
        "sync/version": version,
    }
