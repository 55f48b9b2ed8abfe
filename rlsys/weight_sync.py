"""Weight sync, trainer -> rollout workers.

`broadcast` (default): trainer rank 0 and every rollout worker form their own small process
group (gloo on CPU, NCCL on GPU; a standalone group beside the trainer's DeepSpeed group, so
neither side's default group changes). The weights go in buckets of `sync.bucket_mb`: the
trainer packs a bucket's tensors, cast to the rollout dtype, into one flat buffer and
broadcasts it; each worker receives into a preallocated buffer and copies the views into its
engine in place. One collective per bucket, never one per tensor; under ZeRO-3 the trainer
gathers one bucket at a time, so no rank ever holds a second full copy.

`shm` (what `auto`, the default, picks when every rollout worker shares trainer rank 0's
node): rank 0 casts the weights straight into one flat buffer in a /dev/shm file (one pass
over the fp32 master weights, no intermediate copy), then every worker loads its engine from
its own mapping of the same file (the native bf16 engine packs straight from it). No sockets,
no serialisation: two memory passes in all. Workers on other nodes need `broadcast` (what
`auto` picks then).

`object_store`: rank 0 puts the full (cast) state dict into the Ray object store once; every
worker reads the same shared-memory object. Simple, and the baseline of
`benchmarks/weight_sync.py`.

The bucket plan (names and shapes per bucket, fixed for a run) is made once by the trainer
and handed to every worker at set-up, so only raw bytes travel each sync.
"""

from __future__ import annotations

import datetime
import os
import time
import uuid
from collections.abc import Callable, Iterable, Mapping

import ray
import torch

from rlsys.rollout.pool import StaleWorkerError

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
    """One process's end of the sync group: rank 0 sends, the others receive. Every member
    uses the same `backend`: "nccl" (buffers on this process's GPU) or "gloo" (CPU buffers)."""

    def __init__(
        self,
        addr: str,
        port: int,
        rank: int,
        world: int,
        timeout_s: float = 300,
        backend: str = "gloo",
    ) -> None:
        import torch.distributed as dist

        timeout = datetime.timedelta(seconds=timeout_s)
        store = dist.TCPStore(addr, port, world, is_master=rank == 0, timeout=timeout)
        if backend == "nccl":
            self.pg = dist.ProcessGroupNCCL(store, rank, world)
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.pg = dist.ProcessGroupGloo(store, rank, world, timeout)
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


class SharedWeights:
    """The weights of `plan` in the rollout dtype as one flat buffer in a /dev/shm file, mapped
    by the writer (trainer rank 0) and every reader (rollout workers on the same node).
    `buckets[i]` maps the names of bucket i to views of the buffer."""

    def __init__(self, path: str, plan: Plan, dtype: torch.dtype, create: bool = False) -> None:
        n = sum(_numel(s) for b in plan for _, s in b)
        if create:
            fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
            try:
                os.ftruncate(fd, n * dtype.itemsize)
            finally:
                os.close(fd)
        self.path = path
        self.flat = torch.from_file(path, shared=True, size=n, dtype=dtype)
        self.buckets: list[dict[str, torch.Tensor]] = []
        off = 0
        for bucket in plan:
            views = {}
            for name, shape in bucket:
                k = _numel(shape)
                views[name] = self.flat[off : off + k].view(shape)
                off += k
            self.buckets.append(views)

    def write(self, buckets: Iterable[list[tuple[str, torch.Tensor]]]) -> int:
        """Copy (and cast) each bucket's tensors into place; returns the bytes written.
        Raises ValueError (before the readers load anything) if a tensor is not finite: one
        fp32 sum per tensor here, so the readers need not scan the bf16 copy each."""
        bad = []
        for views, bucket in zip(self.buckets, buckets, strict=True):
            for name, t in bucket:
                if t.is_floating_point() and not torch.isfinite(
                    t.detach().sum(dtype=torch.float32)
                ):
                    if not bool(t.isfinite().all()):  # the sum can overflow on finite values
                        bad.append(name)
                views[name].copy_(t.detach())
        if bad:
            raise ValueError(f"weight sync: non-finite values in {bad[:5]}; nothing was loaded")
        return self.flat.numel() * self.flat.element_size()

    def views(self) -> dict[str, torch.Tensor]:
        return {k: v for b in self.buckets for k, v in b.items()}


def broadcast_backend(trainer_device: str, rollout_device: str) -> str:
    """The broadcast group's backend: NCCL when the trainer and the rollout workers are on
    GPUs (weights go GPU to GPU), gloo otherwise (one process group has one backend)."""
    return "nccl" if trainer_device == rollout_device == "cuda" else "gloo"


def shm_path() -> str:
    """A fresh /dev/shm file name for one run's shared weights."""
    return f"/dev/shm/rlsys-weights-{uuid.uuid4().hex[:12]}"


class WeightSync:
    """Driver side: sets the group up, then `push(version)` after every update.

    `workers` is a `RolloutPool` (or a plain list of worker handles). With a pool, a push that
    fails because a worker died recovers it (the pool restarts it and hands it the current
    weights), rebuilds the group with the new process and pushes again; members blocked on
    the dead one give up after `timeout_s`."""

    def __init__(
        self,
        trainer,
        workers,
        dtype: str,
        bucket_mb: float,
        method: str,
        timeout_s: float = 120,
        backend: str = "gloo",
    ) -> None:
        """`backend` of a broadcast group: see `broadcast_backend`."""
        self.trainer, self.pool, self.dtype, self.method = trainer, workers, dtype, method
        self.timeout_s, self.backend = timeout_s, backend
        self.nbytes = trainer.weight_bytes(dtype)
        self.joined = False
        self.path: str | None = None
        if method in ("auto", "shm"):
            rank0 = ray.get(trainer.ranks[0].node_id.remote())
            nodes = ray.get([w.node_id.remote() for w in self.workers])
            same = all(n == rank0 for n in nodes)
            if method == "shm" and not same:
                raise ValueError(
                    "sync.method=shm needs every rollout worker on trainer rank 0's node; "
                    "use sync.method=auto or broadcast"
                )
            self.method = "shm" if same else "broadcast"
        if self.method in ("broadcast", "shm"):
            self.plan = ray.get(trainer.ranks[0].sync_plan.remote(dtype, bucket_mb))
        if self.method == "broadcast":
            self._ensure_joined()
        elif self.method == "shm":
            self.path = shm_path()

    @property
    def workers(self) -> list:
        return getattr(self.pool, "workers", self.pool)

    def invalidate(self) -> None:
        """A member was replaced: form the group again before the next broadcast."""
        self.joined = False

    def _join(self) -> list[int]:
        """Form the group; the indices of workers that died while joining (then the group is
        not formed: the others gave up after `timeout_s`)."""
        if hasattr(self.pool, "ensure_alive"):  # a dead member would stall everyone's join
            self.pool.ensure_alive()
        rank0 = self.trainer.ranks[0]
        addr, port = ray.get(rank0.sync_address.remote())
        world = 1 + len(self.workers)
        t = self.timeout_s
        b = self.backend
        sender = rank0.sync_join.remote(addr, port, world, t, b)
        refs = [
            w.sync_join.remote(addr, port, i + 1, world, t, b) for i, w in enumerate(self.workers)
        ]
        dead, _ = self._collect(refs, [sender])
        self.joined = not dead
        return dead

    def _collect(self, refs: list, senders: list) -> tuple[list[int], list]:
        """Wait for one collective: the workers' results `refs` and the trainer ranks'. Returns the
        indices of workers that died (or restarted) during it and the others' results; when
        one died, the errors of members left waiting on it are expected and dropped."""
        dead, values, errors = [], [], []
        for i, ref in enumerate(refs):
            try:
                values.append(ray.get(ref))
            except (ray.exceptions.RayActorError, StaleWorkerError):  # died, or restarted
                dead.append(i)
            except ray.exceptions.RayTaskError as e:  # e.g. timed out waiting on a dead peer
                errors.append(e)
        for ref in senders:
            try:
                ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                errors.insert(0, e)
        if errors and not dead:
            raise errors[0]
        return dead, values

    def _recover(self, dead: list[int], attempt: int, what: str) -> None:
        """Bring `dead` workers back with the current weights (a pool only) and drop the group;
        raise when there is no pool or the retries are spent."""
        retries = getattr(self.pool, "max_restarts", 0)
        if not hasattr(self.pool, "recover") or attempt >= retries:
            raise RuntimeError(
                f"weight sync: rollout workers {dead} died while {what} ({attempt + 1} times)"
            )
        for i in dead:
            self.pool.recover(i)  # restarted with the current weights (object store)
        self.invalidate()

    def _ensure_joined(self) -> None:
        attempt = 0
        while not self.joined:
            dead = self._join()
            if dead:
                self._recover(dead, attempt, "joining the sync group")
                attempt += 1

    def push(self, version: int) -> dict[str, float]:
        """Every worker holds the trainer's current weights as `version`; `sync/*` metrics."""
        if self.method == "object_store":
            return push_weights(self.trainer, self.pool, version, self.dtype, self.nbytes)
        if self.method == "shm":
            return self._push_shm(version)
        t0 = time.perf_counter()
        attempt = 0
        while True:
            self._ensure_joined()
            send = [r.sync_send.remote(self.plan, self.dtype) for r in self.trainer.ranks]
            recv = [w.sync_recv.remote(self.plan, self.dtype, version) for w in self.workers]
            dead, versions = self._collect(recv, send)
            if not dead:
                return _metrics(versions, version, self.nbytes, len(self.workers), t0)
            self._recover(dead, attempt, "receiving weights")
            attempt += 1

    def _push_shm(self, version: int) -> dict[str, float]:
        t0 = time.perf_counter()
        ray.get(
            [r.sync_shm_write.remote(self.plan, self.dtype, self.path) for r in self.trainer.ranks]
        )
        args = (self.plan, self.dtype, self.path, version)
        if hasattr(self.pool, "call"):
            from rlsys.rollout.pool import Call

            calls = [Call(i, "sync_shm_load", args) for i in range(len(self.workers))]
            versions = self.pool.call(calls)
        else:
            versions = ray.get([w.sync_shm_load.remote(*args) for w in self.workers])
        return _metrics(versions, version, self.nbytes, len(self.workers), t0)

    def close(self) -> None:
        """Remove the shared-memory file (the mappings stay valid until their owners exit)."""
        if self.path and os.path.exists(self.path):
            os.unlink(self.path)


def push_weights(trainer, workers, version: int, dtype: str, nbytes: int) -> dict[str, float]:
    """Object-store transfer: the trainer's (a `TrainerGroup`) full weights, put once, loaded
    by every worker (a `RolloutPool`, which recovers dead ones, or a list of handles);
    returns `sync/*` metrics."""
    t0 = time.perf_counter()
    ref = trainer.weights_ref(dtype)
    if hasattr(workers, "call"):
        from rlsys.rollout.pool import Call

        calls = [Call(i, "update_weights", (ref, version)) for i in range(len(workers))]
        versions = workers.call(calls)
    else:
        versions = ray.get([w.update_weights.remote(ref, version) for w in workers])
    return _metrics(versions, version, nbytes, len(workers), t0)


def _metrics(versions: list, version: int, nbytes: int, n: int, t0: float) -> dict[str, float]:
    if any(v != version for v in versions):
        raise RuntimeError(f"weight sync: workers report versions {versions}, expected {version}")
    dt = time.perf_counter() - t0
    return {"sync/seconds": dt, "sync/gb_per_s": nbytes * n / dt / 1e9, "sync/version": version}
