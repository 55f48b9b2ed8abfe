"""TrainEngine: one rank's share of a model (+ optimizer, LR schedule) under DeepSpeed ZeRO.

N trainer ranks form one data-parallel group (gloo on CPU, NCCL on GPU). Stage 1 shards the
optimizer state, 2 also the gradients, 3 also the parameters; 0 replicates everything.

Gradient convention: every rank back-propagates its share of one *globally* normalised loss
(token weights computed over the whole mini-batch), so the true gradient is the **sum** over
ranks. DeepSpeed averages gradients over the data-parallel group, hence `backward` scales the
loss by the world size. The caller owns gradient accumulation: `backward` per micro-batch (all
ranks the same number of times, the last one flagged as the accumulation boundary), one
`step` per mini-batch.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from rlsys.config import TrainerConfig


def free_port() -> int:
    """A TCP port free on this host right now."""
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def use_accelerator(device: str) -> None:
    """Make DeepSpeed run on `device` ("cpu" | "cuda"): its accelerator is picked once per
    process, from DS_ACCELERATOR or by probing, and a process may have picked "cpu" already
    (the test suite sets it), so a mismatch is replaced."""
    os.environ["DS_ACCELERATOR"] = device
    from deepspeed.accelerator import get_accelerator, set_accelerator

    if get_accelerator().device_name() != device:
        if device == "cuda":
            from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator as Accel
        else:
            from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator as Accel
        set_accelerator(Accel())


def init_distributed(rank: int, world_size: int, addr: str, port: int, device: str = "cpu") -> None:
    """Join (or, alone, create) the trainer's process group on `device`'s backend (gloo on
    CPU, NCCL on CUDA); a no-op when already joined.

    DeepSpeed's CPU backend would JIT-compile a shared-memory all-reduce op on first use
    (~2 minutes); gloo's all-reduce is fast enough at these sizes, so the build is skipped."""
    use_accelerator(device)
    import deepspeed
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    os.environ.update(
        MASTER_ADDR=addr,
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK="0",  # each rank sees one GPU (Ray sets CUDA_VISIBLE_DEVICES)
        LOCAL_SIZE="1",
    )
    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo", verbose=False)


def lr_lambda(schedule: str, warmup: int, total: int):
    """Multiplier on the base LR at optimizer step s: linear warm-up over `warmup` steps, then
    constant, linear decay to 0, or cosine decay to 0 at `total`."""

    def f(s: int) -> float:
        if warmup and s < warmup:
            return (s + 1) / warmup
        if schedule == "constant" or total <= warmup:
            return 1.0
        frac = min((s - warmup) / max(total - warmup, 1), 1.0)
        if schedule == "linear":
            return 1.0 - frac
        return 0.5 * (1.0 + math.cos(math.pi * frac))

    return f


def effective_stage(t: TrainerConfig, world: int) -> int:
    """The ZeRO stage an engine runs: `trainer.zero_stage` when set; by default 2 across
    several ranks (or with offload) and 0 on one rank, which has nothing to shard (stage 0
    keeps no flat fp32 copy of the weights and no partition bookkeeping)."""
    if t.zero_stage is not None:
        return t.zero_stage
    return 2 if world > 1 or t.offload else 0


def ds_config(t: TrainerConfig, stage: int, with_optimizer: bool = True) -> dict[str, Any]:
    """The DeepSpeed config of one engine. Buckets stay small: the defaults (5e8 elements)
    would allocate gigabytes of CPU buffers for a 135M model."""
    bucket = int(t.bucket_mb * 2**20 / 4)
    zero: dict[str, Any] = {
        "stage": stage,
        "reduce_bucket_size": bucket,
        "allgather_bucket_size": bucket,
        "overlap_comm": False,
        "contiguous_gradients": True,
    }
    if stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=bucket,
            stage3_param_persistence_threshold=0,
            stage3_gather_16bit_weights_on_model_save=False,
        )
    if t.offload and with_optimizer and stage > 0:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        # stage 0 leaves the norm unrecorded, so TrainEngine.step clips there itself
        "gradient_clipping": t.grad_clip if t.grad_clip > 0 and stage > 0 else 0.0,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": t.precision == "bf16"},
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


class TrainEngine:
    """A module (trainable with `lr`, or frozen with `lr=None`) on this rank under ZeRO."""

    def __init__(
        self,
        module: nn.Module,
        t: TrainerConfig,
        lr: float | None,
        total_steps: int = 0,
        prefix: str = "",
        device: torch.device | str = "cpu",
    ) -> None:
        """`prefix`: dropped from state-dict names (the wrapped model's attribute name);
        `device`: where the module computes (moved there before the optimizer is built)."""
        import deepspeed
        import torch.distributed as dist

        self.cfg = t
        self.prefix = prefix
        self.world = dist.get_world_size()
        self.rank = dist.get_rank()
        self.trainable = lr is not None
        self.stage = effective_stage(t, self.world)
        module.to(device)
        from rlsys.trainer.lora import lora_layers

        self.lora = lora_layers(module)  # base weight name -> its adapter (none = full)
        if not self.trainable and self.stage < 3:
            # Nothing to shard but parameters, and only stage 3 shards those.
            self.engine = None
            self.module = module.eval().requires_grad_(False)
            return
        opt = sched = None
        if self.trainable:
            opt = torch.optim.AdamW(
                [p for p in module.parameters() if p.requires_grad],  # LoRA: the adapters
                lr=lr,
                betas=tuple(t.betas),
                weight_decay=t.weight_decay,
                fused=True,
            )
            f = lr_lambda(t.lr_schedule, t.warmup_steps, total_steps)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, f)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module,
            optimizer=opt,
            lr_scheduler=sched,
            config=ds_config(t, self.stage, with_optimizer=self.trainable),
        )
        self.module = self.engine.module
        if self.stage == 0 and self.world == 1:
            # Nothing to all-reduce; DeepSpeed would still flatten every gradient into one
            # bucket and copy it back (a transient full fp32 gradient copy, the step's peak).
            self.engine.enable_backward_allreduce = False
        if not self.trainable:
            self.module.eval()

    def __call__(self, *args, **kwargs):
        """The module's forward, through the engine (its per-forward bookkeeping runs)."""
        if self.engine is None:
            return self.module(*args, **kwargs)
        return self.engine(*args, **kwargs)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """Accumulate d(world * loss): the sum over ranks of each rank's share. `last` marks
        the mini-batch's final micro-batch (the accumulation boundary, where ZeRO reduces)."""
        if not torch.isfinite(loss.detach()):
            raise FloatingPointError(
                "non-finite loss: the update was skipped; lower trainer.lr or check the rewards"
            )
        assert self.engine is not None
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss * self.world, scale_wrt_gas=False)

    def step(self) -> float:
        """Reduce the accumulated gradients, clip, step the optimizer and LR schedule; returns
        the global gradient norm before clipping."""
        assert self.engine is not None
        if self.stage == 0:  # gradients are already all-reduced at the boundary backward
            clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
            gn = float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), clip))
            if not math.isfinite(gn):
                self.engine.zero_grad()
                raise FloatingPointError(
                    "non-finite gradient norm: the update was skipped; lower trainer.lr"
                )
            self.engine.step()
            return gn
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        gn = float(norm) if norm is not None else float("nan")
        if not math.isfinite(gn):
            raise FloatingPointError("non-finite gradient norm: lower trainer.lr")
        return gn

    @property
    def lr(self) -> float:
        assert self.engine is not None
        return float(self.engine.get_lr()[0])

    def _tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every weight once (a tied weight under its first name) and the persistent
        buffers, with the wrapper's prefix dropped from the names; LoRA factors are not
        listed (`buckets` yields their layer's merged weight under the base name)."""
        from rlsys.trainer.lora import is_adapter

        n0 = len(self.prefix)
        for n, p in self.module.named_parameters():
            if not is_adapter(n):
                yield n[n0:], p
        names = set(self.module.state_dict().keys())
        for n, b in self.module.named_buffers():
            if n in names:
                yield n[n0:], b

    def named_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, full shape) of every tensor `buckets` yields, in order."""
        return [(n, tuple(getattr(p, "ds_shape", p.shape))) for n, p in self._tensors()]

    def buckets(
        self, plan: list[list[tuple[str, tuple[int, ...]]]], dtype: torch.dtype | None = None
    ) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """For each bucket of `plan` (names as in `named_shapes`), its full tensors on rank 0
        (cast to `dtype`; an empty list on other ranks). Collective under ZeRO-3 (every rank
        must iterate to the end): each bucket is gathered, yielded, and released before the
        next, so no rank ever holds a second full copy of the weights."""
        import deepspeed

        tensors = dict(self._tensors())
        lora = {n[len(self.prefix) :]: m for n, m in self.lora.items()}
        for bucket in plan:
            ps = [tensors[n] for n, _ in bucket]
            ctx = contextlib.nullcontext()
            if self.stage == 3 and self.engine is not None:
                factors = [
                    f for n, _ in bucket if n in lora for f in (lora[n].lora_A, lora[n].lora_B)
                ]
                sharded = list({id(p): p for p in ps + factors if hasattr(p, "ds_id")}.values())
                ctx = deepspeed.zero.GatheredParameters(sharded, modifier_rank=None)
            with ctx:
                if self.rank != 0:
                    yield []
                    continue
                out = []
                for (n, _), p in zip(bucket, ps, strict=True):
                    x = lora[n].merged_weight() if n in lora else p.detach()
                    out.append((n, x.to(dtype) if dtype else x))
                yield out

    def full_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor] | None:
        """Full weights (CPU copies) on rank 0, None elsewhere; collective under ZeRO-3."""
        from rlsys.weight_sync import make_plan

        plan = make_plan(self.named_shapes(), 4, self.cfg.bucket_mb)
        out: dict[str, torch.Tensor] = {}
        for bucket in self.buckets(plan, dtype):
            out.update(
                (n, t.to("cpu", copy=True, memory_format=torch.contiguous_format))
                for n, t in bucket
            )
        return out if self.rank == 0 else None

    def adapter_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The LoRA factors ({name without the prefix: CPU copy}) on rank 0, None elsewhere;
        collective under ZeRO-3 (the factors are gathered once, together)."""
        import deepspeed

        from rlsys.trainer.lora import is_adapter

        n0 = len(self.prefix)
        factors = [(n[n0:], p) for n, p in self.module.named_parameters() if is_adapter(n)]
        ctx = contextlib.nullcontext()
        if self.stage == 3 and self.engine is not None:
            sharded = [p for _, p in factors if hasattr(p, "ds_id")]
            ctx = deepspeed.zero.GatheredParameters(sharded, modifier_rank=None)
        with ctx:
            if self.rank != 0:
                return None
            return {n: p.detach().to("cpu", copy=True) for n, p in factors}

    def state_bytes(self) -> int:
        """Bytes of model and optimizer state this rank holds (parameters or their ZeRO-3
        shard, fp32 master partitions, Adam moments), each storage counted once."""
        seen: set[int] = set()
        total = 0

        def add(x: Any) -> None:
            nonlocal total
            if torch.is_tensor(x) and x.numel():
                st = x.untyped_storage()
                if st.data_ptr() not in seen:
                    seen.add(st.data_ptr())
                    total += st.nbytes()

        for p in self.module.parameters():
            add(getattr(p, "ds_tensor", p))
        if self.engine is not None and self.trainable:
            inner = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)
            for g in inner.param_groups:
                for p in g["params"]:
                    add(p)
            for st in inner.state.values():
                for v in st.values():
                    add(v)
        return total

    def num_bytes(self, dtype: torch.dtype | None) -> int:
        """Bytes of `full_state_dict(dtype)`."""
        n = sum(getattr(p, "ds_numel", p.numel()) for _, p in self._tensors())
        return n * (dtype.itemsize if dtype else 4)

    def save(self, path: str) -> None:
        """DeepSpeed checkpoint of this engine (collective: every rank writes its shard)."""
        if self.engine is not None:  # LoRA: the frozen base weights come from model.path
            self.engine.save_checkpoint(
                path, tag="engine", save_latest=False, exclude_frozen_parameters=bool(self.lora)
            )

    def load(self, path: str) -> None:
        if self.engine is not None:
            load_path, _ = self.engine.load_checkpoint(
                path,
                tag="engine",
                load_optimizer_states=True,
                load_lr_scheduler_states=True,
                load_module_strict=not self.lora,  # LoRA: the adapters only
            )
            if load_path is None:
                raise FileNotFoundError(f"no DeepSpeed checkpoint under {path}")
