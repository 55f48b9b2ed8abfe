"""Weight sync, trainer -> rollout workers.

`broadcast` (default): trainer rank 0 and every rollout worker form their own small process
group (gloo on CPU, NCCL on GPU; a standalone group beside the trainer's DeepSpeed group, so
neither side's default group changes). The weights go in buckets of `sync.bucket_mb`: the
trainer packs a bucket's tensors, cast to the rollout dtype, into one flat buffer and
broadcasts it; each worker receives into a preallocated buffer and copies the views into its
engine in place. One collective per bucket, never one per tensor; under ZeRO-3 the trainer
gathers one bucket at a time, so no rank ever holds a second full copy.

`object_store`: rank 0 puts the full (cast) state dict into the Ray object store once; every
worker reads the same shared-memory object. Simple, and the baseline of
`benchmarks/weight_sync.py`.

The bucket plan (names and shapes per bucket, fixed for a run) is made once by the trainer
and handed to every worker at set-up, so only raw bytes travel each sync.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Iterable, Mapping

import ray
import torch

Plan = list[list[tuple[str, tuple[int, ...]]]]


def make_plan(
    named_shapes: Iterable[tuple[str, tuple[int, ...]]], itemsize: int, mb: float
) -> Plan:
    """Consecutive tensors grouped into buckets of at least `mb` MB (the last may be smaller;
    a tensor larger than a bucket is a bucket of its own)."""
    limit = int(mb * 2**20)
    plan: Plan = []
    cur: list[tuple[str, tuple[int, ...]]] = []
    size = 0
    for name, shape in named_shapes:
        cur.append((name, tuple(shape)))
        size += _numel(shape) * itemsize
        if size >= limit:
            plan.append(cur)
            cur, size = [], 0
    if cur:
        plan.append(cur)
    return plan


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class SyncMember:
    """One process's end of the sync group: rank 0 sends, the others receive."""

    def __init__(self, addr: str, port: int, rank: int, world: int, timeout_s: int = 300) -> None:
        import torch.distributed as dist

        store = dist.TCPStore(
            addr,
            port,
            world,
            is_master=rank == 0,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        if torch.cuda.is_available():
            self.pg = dist.ProcessGroupNCCL(store, rank, world)
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.pg = dist.ProcessGroupGloo(store, rank, world)
            self.device = torch.device("cpu")
        self.rank = rank
        self._buf: torch.Tensor | None = None

    def _broadcast(self, buf: torch.Tensor) -> None:
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.pg.broadcast([buf], opts).wait()

    def send(self, buckets: Iterable[list[tuple[str, torch.Tensor]]], dtype: torch.dtype) -> int:
        """Broadcast each bucket as one flat buffer; returns the bytes sent."""
        sent = 0
        for bucket in buckets:
            flat = torch.cat([t.detach().reshape(-1).to(self.device, dtype) for _, t in bucket])
            self._broadcast(flat)
            sent += flat.numel() * flat.element_size()
        return sent

    def recv(
        self,
        plan: Plan,
        dtype: torch.dtype,
        load: Callable[[Mapping[str, torch.Tensor]], None],
    ) -> None:
        """Receive every bucket of `plan` into one reused buffer and `load` its views."""
        biggest = max(sum(_numel(s) for _, s in b) for b in plan)
        if self._buf is None or self._buf.numel() < biggest or self._buf.dtype != dtype:
            self._buf = torch.empty(biggest, dtype=dtype, device=self.device)
        for bucket in plan:
            n = sum(_numel(s) for _, s in bucket)
            flat = self._buf[:n]
            self._broadcast(flat)
            views, off = {}, 0
            for name, shape in bucket:
                k = _numel(shape)
                views[name] = flat[off : off + k].view(shape)
                off += k
            load(views)


class WeightSync:
    """Driver side: sets the group up once, then `push(version)` after every update."""

    def __init__(self, trainer, workers: list, dtype: str, bucket_mb: float, method: str) -> None:
        self.trainer, self.workers, self.dtype, self.method = trainer, workers, dtype, method
        self.nbytes = trainer.weight_bytes(dtype)
        if method != "broadcast":
            return
        rank0 = trainer.ranks[0]
        self.plan = ray.get(rank0.sync_plan.remote(dtype, bucket_mb))
        addr, port = ray.get(rank0.sync_address.remote())
        world = 1 + len(workers)
        ray.get(
            [rank0.sync_join.remote(addr, port, world)]
            + [w.sync_join.remote(addr, port, i + 1, world) for i, w in enumerate(workers)]
        )

    def push(self, version: int) -> dict[str, float]:
        """Every worker holds the trainer's current weights as `version`; `sync/*` metrics."""
        if self.method != "broadcast":
            return push_weights(self.trainer, self.workers, version, self.dtype, self.nbytes)
        t0 = time.perf_counter()
        send = [r.sync_send.remote(self.plan, self.dtype) for r in self.trainer.ranks]
        recv = [w.sync_recv.remote(self.plan, self.dtype, version) for w in self.workers]
        versions = ray.get(recv)
        ray.get(send)
        return _metrics(versions, version, self.nbytes, len(self.workers), t0)


def push_weights(trainer, workers: list, version: int, dtype: str, nbytes: int) -> dict[str, float]:
    """Object-store transfer: the trainer's (a `TrainerGroup`) full weights, put once, loaded
    by every worker; returns `sync/*` metrics."""
    t0 = time.perf_counter()
    ref = trainer.weights_ref(dtype)
    versions = ray.get([w.update_weights.remote(ref, version) for w in workers])
    return _metrics(versions, version, nbytes, len(workers), t0)


def _metrics(versions: list, version: int, nbytes: int, n: int, t0: float) -> dict[str, float]:
    if any(v != version for v in versions):
        raise RuntimeError(f"weight sync: workers report versions {versions}, expected {version}")
    dt = time.perf_counter() - t0
    return {"sync/seconds": dt, "sync/gb_per_s": nbytes * n / dt / 1e9, "sync/version": version}
