"""TrainerWorker: one rank of the policy trainer (DeepSpeed ZeRO, `trainer.ranks` of them).

A step reads top to bottom (every rank runs it on the same batch, on its share of the rows):

1. no-grad passes, only those the recipe needs: pre-update logprobs (several mini-batches or
   a KL reward), reference logprobs (KL; with `trainer.lora`, the policy with its adapters
   off), critic values (PPO); each rank computes its rows and an all-reduce gives every rank
   the full [B, L] tensors;
2. per-token advantages (`trainer/algorithm.py`), identical on every rank;
3. for each mini-batch of whole groups: micro-batched forward/backward of policy loss
   (+ KL loss term, - entropy bonus) on this rank's rows -> ZeRO reduce, clip, AdamW step;
   then the critic's value loss the same way;
4. version + 1; metrics summed over ranks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from rlsys.buffer.packing import MicroBatch, rank_micro_batches
from rlsys.config import RecipeConfig, from_dict, trainer_device
from rlsys.rollout.worker import setup_actor_process
from rlsys.trainer.algorithm import split_groups, token_advantages
from rlsys.trainer.attention import use_packed_attention
from rlsys.trainer.critic import Critic
from rlsys.trainer.engine import TrainEngine, effective_stage, free_port, init_distributed
from rlsys.trainer.logprobs import TokenLogprobs, fuse_vocab_grads
from rlsys.trainer.lora import adapters_off, apply_lora, save_adapter
from rlsys.trainer.losses import (
    AdaptiveKLController,
    kl_penalty,
    off_policy_weights,
    policy_loss,
    token_weights,
    value_loss,
)
from rlsys.types import SampleGroup, TrainBatch, collate


class TrainerWorker:
    """One trainer rank. Alone (`world_size=1`, no `master`) it creates its own process group,
    so it also runs in-process; as one of N Ray actors, `TrainerGroup` passes the address."""

    def __init__(
        self,
        cfg: dict,
        model_path: str,
        critic_path: str | None = None,
        rank: int = 0,
        world_size: int = 1,
        master: tuple[str, int] | None = None,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self._base_rss = _rss_gb()
        self.cfg: RecipeConfig = from_dict(cfg)
        self.device = setup_actor_process(
            self.cfg.cluster.threads_per_actor, trainer_device(self.cfg), "trainer"
        )
        if master is None:
            if world_size != 1:
                raise ValueError("several trainer ranks need a master (address, port)")
            master = ("127.0.0.1", free_port())
        init_distributed(rank, world_size, *master, device=self.device.type)
        self.rank, self.world = rank, world_size
        torch.manual_seed(self.cfg.seed)
        dtype = getattr(torch, self.cfg.model.dtype)
        al, t = self.cfg.algorithm, self.cfg.trainer
        self.model_path = model_path
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
        if t.packed_attention:
            use_packed_attention(model)
        model.config.use_cache = False
        if t.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=_NO_REENTRANT)
        # LoRA under bf16 autocast: the frozen base weights are rounded to bf16 at every
        # matmul anyway, so they are stored in bf16 (the same logprobs, half the bytes, no
        # cast per call); ZeRO-3 keeps one dtype per engine
        lora_base = (
            torch.bfloat16 if t.autocast_bf16 and effective_stage(t, world_size) < 3 else None
        )
        if t.lora.rank:
            apply_lora(model, t.lora.rank, t.lora.alpha, t.lora.targets, lora_base)
        total = self.cfg.steps * t.mini_batches
        temp, fused, kind = self.cfg.rollout.temperature, t.fused_logprob, t.logprob_backend
        dev = self.device
        self.policy = TrainEngine(
            TokenLogprobs(model, temp, fused, kind), t, t.lr, total, "lm.", dev
        )
        # the loss's gradient in the LM head's forward (a sum of per-token terms only)
        self.fused_loss = t.fused_loss and fused and al.policy_loss != "gspo" and kind != "triton"
        self.model = self.policy.module.lm  # the Hugging Face model (sharded under ZeRO-3)
        self.model.train()
        # Nothing hooks gradient accumulation at stage 0 with fp32 weights (grad_into.py).
        fuse = t.vocab_grad_fusion and self.policy.stage == 0 and t.precision == "fp32"
        if fuse and not t.lora.rank:  # LoRA: the vocabulary weights are frozen
            fuse_vocab_grads(self.policy.module, self.model)
        self.ref = None
        # LoRA: the reference is the policy with its adapters off (`_ref_logp`), no copy
        self.has_ref = al.kl.mode != "none"
        if self.has_ref and not t.lora.rank:
            # Frozen: under bf16 autocast its matmuls run in bf16 anyway, so bf16 weights give
            # the same logprobs at half the memory.
            ref_dtype = (
                torch.bfloat16 if t.autocast_bf16 and effective_stage(t, world_size) < 3 else dtype
            )
            ref = AutoModelForCausalLM.from_pretrained(model_path, dtype=ref_dtype)
            if t.packed_attention:
                use_packed_attention(ref)
            self.ref = TrainEngine(
                TokenLogprobs(ref, temp, fused, kind), t, None, prefix="lm.", device=dev
            )
        self.kl_ctl = AdaptiveKLController(al.kl.coef, al.kl.target, al.kl.horizon)
        self.critic = None
        if al.advantage == "gae":
            critic = Critic(critic_path or model_path, dtype, t.packed_attention)
            if t.gradient_checkpointing:
                critic.backbone.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs=_NO_REENTRANT
                )
            if t.lora.rank:  # adapters on the backbone; the value head trains in full
                apply_lora(critic.backbone, t.lora.rank, t.lora.alpha, t.lora.targets, lora_base)
            self.critic = TrainEngine(critic, t, al.critic.lr, total, device=dev)
            if fuse and not t.lora.rank:
                fuse_vocab_grads(self.critic.module, critic.backbone)
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.version = 0

    def ready(self) -> int:
        """The rank, once the process group and engines are up."""
        return self.rank

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def memory(self) -> dict[str, float]:
        """This rank's memory: peak RSS above the process's RSS before the trainer was built,
        and the model + optimizer state it holds (policy, critic, reference), in GB."""
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        engines = [e for e in (self.policy, self.critic, self.ref) if e is not None]
        return {
            "peak_gb": peak - self._base_rss,
            "state_gb": sum(e.state_bytes() for e in engines) / 2**30,
        }

    def _autocast(self):
        if self.cfg.trainer.autocast_bf16:
            # No cast cache: it would keep a bf16 copy of every weight alive until the forward
            # ends (with gradient checkpointing nothing else needs them), and each weight is
            # cast once per forward anyway.
            return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=False)
        return contextlib.nullcontext()

    def _micro_batches(self, batch: TrainBatch, rows: list[int]) -> list[tuple[MicroBatch, bool]]:
        """This rank's micro-batches of `rows` as (micro-batch, active), padded with inactive
        repeats to the busiest rank's count: an inactive one runs forward/backward with a zero
        loss so that every rank joins the same ZeRO collectives."""
        t = self.cfg.trainer
        lengths = batch.attention_mask.sum(-1)
        mbs, n = rank_micro_batches(
            lengths,
            rows,
            batch.input_ids,
            t.packing,
            t.micro_batch_tokens,
            t.micro_batch_size,
            self.rank,
            self.world,
        )
        out = [(mb, True) for mb in mbs]
        if len(out) < n:
            from rlsys.buffer.packing import packed_micro_batch

            filler = mbs[0] if mbs else packed_micro_batch(lengths, [rows[0]], batch.input_ids)
            out += [(filler, False)] * (n - len(out))
        return out

    def _all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (in place; through the trainer's device, NCCL's only kind);
        identity on one rank."""
        if self.world > 1:
            import torch.distributed as dist

            y = x.to(self.device)
            dist.all_reduce(y)
            if y is not x:
                x.copy_(y)
        return x

    def _to(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """`x` on the trainer's device (batch tensors are built, and gathered, on the CPU)."""
        return None if x is None else x.to(self.device, non_blocking=True)

    def _inputs(self, mb: MicroBatch) -> tuple:
        """The model inputs of a micro-batch, on the trainer's device."""
        return (
            self._to(mb.input_ids),
            self._to(mb.attention_mask),
            self._to(mb.position_ids),
            self._to(mb.cu_seqlens),
        )

    def _logp(
        self, engine: TrainEngine, mb: MicroBatch, resp: torch.Tensor, token_loss=None
    ) -> tuple[torch.Tensor, ...]:
        """(logp, entropy) [b, l] of `engine`'s model (policy or reference) on a micro-batch,
        on the trainer's device; with `token_loss`, (logp, entropy, loss) from the LM head's
        fused loss (`token_logprobs`)."""
        ids, att, pos, cu = self._inputs(mb)
        with self._autocast():
            if token_loss is None:
                return engine(ids, att, self._to(resp), pos, cu)
            return engine(ids, att, self._to(resp), pos, cu, token_loss=token_loss)

    def _ref_logp(self, mb: MicroBatch, resp: torch.Tensor) -> torch.Tensor:
        """Reference logprobs [b, l]: the frozen copy's, or (LoRA) the policy's base model's."""
        if self.ref is not None:
            return self._logp(self.ref, mb, resp)[0]
        with adapters_off(self.model):
            return self._logp(self.policy, mb, resp)[0]

    def _token_loss(
        self,
        logp: torch.Tensor,
        ent: torch.Tensor,
        x: dict[str, torch.Tensor | None],
        kl_coef: float,
        seq_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
        """The policy update's per-token loss (policy loss, KL term, entropy bonus; zero where
        masked) on tokens of any shape, and its parts for the metrics. Elementwise in the
        tokens except gspo's per-sequence ratio (`seq_ids`), so the fused head loss can call
        it on each chunk of tokens."""
        al = self.cfg.algorithm
        old = logp.detach() if x["old"] is None else x["old"]
        w, mm = off_policy_weights(
            old, x["behav"], x["resp"], al.off_policy.mode, al.off_policy.cap
        )
        tok, clipped = policy_loss(
            logp,
            old,
            x["adv"],
            mm,
            al.policy_loss,
            al.clip_low,
            al.clip_high,
            al.dual_clip,
            w,
            seq_ids,  # each token's sample: GSPO's per-sequence mean
        )
        kl = None
        if al.kl.mode == "loss":
            kl = kl_penalty(logp, x["ref"], al.kl.estimator) * mm
            tok = tok + kl_coef * kl
        elif x["ref"] is not None:
            kl = kl_penalty(logp.detach(), x["ref"], al.kl.estimator) * mm
        if al.entropy_coef:
            tok = tok - al.entropy_coef * ent * mm
        return tok, {"old": old, "w": w, "mm": mm, "clipped": clipped, "kl": kl}

    def _policy_loss(
        self, mb: MicroBatch, x: dict[str, torch.Tensor | None], wts: torch.Tensor, kl_coef: float
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor | None]]:
        """(loss, entropy [b, l], metric parts) of the policy on micro-batch `mb` with token
        weights `wts`; the fused head loss (`trainer.fused_loss`) where it applies."""
        if not self.fused_loss:
            logp, ent = self._logp(self.policy, mb, x["resp"])
            tok, parts = self._token_loss(logp, ent, x, kl_coef, mb.src_b)
            return (tok * wts).sum(), ent, parts

        def token_loss(idx: torch.Tensor, lp: torch.Tensor, ent: torch.Tensor) -> torch.Tensor:
            xs = {k: None if v is None else v.reshape(-1)[idx] for k, v in x.items()}
            tok, _ = self._token_loss(lp, ent, xs, kl_coef)
            return (tok * wts.reshape(-1)[idx]).sum()

        logp, ent, loss = self._logp(self.policy, mb, x["resp"], token_loss)
        with torch.no_grad():  # the metrics' parts, from the same logprobs
            _, parts = self._token_loss(logp, ent, x, kl_coef)
        return loss, ent, parts

    def _values(self, mb: MicroBatch, resp: torch.Tensor) -> torch.Tensor:
        assert self.critic is not None
        ids, att, pos, cu = self._inputs(mb)
        with self._autocast():
            return self.critic(ids, att, self._to(resp), pos, cu)

    @torch.no_grad()
    def _full_pass(self, fn: Callable, batch: TrainBatch, minis: list[list[int]]) -> torch.Tensor:
        """fn(micro_batch, response_mask) over the whole batch, back in the [B, L] layout,
        computed in the micro-batches the update will use (those of each mini-batch's rows
        `minis`). Under bf16 autocast a sample's logprobs depend on how the rows are packed
        (SmolLM2: 0.026 per token on average between the whole batch's packing and one
        mini-batch's, 1e-6 in fp32); the same packing makes the first mini-batch's ratio
        exactly 1, and later ones measure only the policy's change."""
        out = torch.zeros(batch.response_mask.shape)
        for rows in minis:
            for mb, active in self._micro_batches(batch, rows):
                y = fn(mb, mb.gather(batch.response_mask)).float().cpu()
                if active:
                    mb.scatter(y, out)
        return self._all_reduce(out)

    def train_step(self, groups: list[SampleGroup]) -> dict[str, Any]:
        """One policy (and critic) update on `groups`; returns `train/*` metrics."""
        al, t = self.cfg.algorithm, self.cfg.trainer
        gr = split_groups(groups)
        n_groups, n_per = gr.rewards.shape
        batch = collate(gr.samples, [0.0] * len(gr.samples), self.pad_id)
        mask = batch.response_mask
        n_tok = max(batch.num_tokens, 1)

        # mini-batches of whole groups, one optimizer step each
        chunks = torch.arange(n_groups).chunk(t.mini_batches)
        minis = [[g * n_per + j for g in c.tolist() for j in range(n_per)] for c in chunks]

        # 1. the no-grad passes this recipe needs
        need_old = t.mini_batches > 1 or al.kl.mode == "reward"
        old_lp = ref_lp = old_v = None
        if need_old:
            old_lp = self._full_pass(lambda mb, r: self._logp(self.policy, mb, r)[0], batch, minis)
        if self.has_ref:
            ref_lp = self._full_pass(self._ref_logp, batch, minis)
        if self.critic is not None:
            old_v = self._full_pass(self._values, batch, minis)

        # 2. advantages
        kl_coef = self.kl_ctl.value
        adv, returns, stats = token_advantages(gr, al, mask, old_lp, ref_lp, old_v, kl_coef)
        fields = {
            "resp": mask,
            "behav": batch.old_logprobs,
            "adv": adv,
            "old": old_lp,
            "ref": ref_lp,
            "old_v": old_v,
            "ret": returns,
        }

        # 3. the updates, one per mini-batch
        sums: dict[str, float] = dict(stats)
        lr = self.policy.lr  # the LR of this step's (first) update
        local = dict.fromkeys(_LOCAL_KEYS, 0.0)
        reported = {"train/loss", "train/entropy", "train/clip_frac", "train/rollout_logprob_diff"}
        if self.has_ref:
            reported.add("train/kl")
        if al.off_policy.mode != "none":
            reported.add("train/is_weight")
        if self.critic is not None:
            reported.add("train/value_loss")
        policy_frozen = self.critic is not None and self.version < al.critic.warmup_steps
        norm_len = al.norm_len or self.cfg.rollout.max_new_tokens
        for rows in minis:
            in_mb = torch.zeros_like(mask)
            in_mb[rows] = mask[rows]
            weights = token_weights(in_mb, al.loss_agg, norm_len)  # this mini-batch's loss
            mbs = self._micro_batches(batch, rows)
            for i, (mb, active) in enumerate(mbs):
                x = {k: None if v is None else self._to(mb.gather(v)) for k, v in fields.items()}
                loss, ent, parts = self._policy_loss(mb, x, self._to(mb.gather(weights)), kl_coef)
                old, w, mm, clipped, kl = (parts[k] for k in ("old", "w", "mm", "clipped", "kl"))
                if not active:
                    loss = loss * 0.0
                if not policy_frozen:
                    self.policy.backward(loss, last=i == len(mbs) - 1)
                if not active:
                    continue
                local["train/loss"] += float(loss.detach()) / len(chunks)
                local["train/entropy"] += float((ent.detach() * mm).sum()) / n_tok
                local["train/clip_frac"] += float(clipped.sum()) / n_tok
                diff = ((old - x["behav"]).abs() * x["resp"]).sum()
                local["train/rollout_logprob_diff"] += float(diff) / n_tok
                if kl is not None:
                    local["train/kl"] += float(kl.detach().sum()) / n_tok
                if w is not None:
                    local["train/is_weight"] += float((w * mm).sum()) / n_tok
            if not policy_frozen:
                _acc(sums, "train/grad_norm", self.policy.step() / len(chunks))
            if self.critic is not None:
                local["train/value_loss"] += self._critic_step(mbs, fields, weights) / len(chunks)
        # per-micro-batch sums, over all ranks
        red = self._all_reduce(torch.tensor(list(local.values()), dtype=torch.float64))
        for k, v in zip(local, red.tolist(), strict=True):
            if k in reported:
                sums[k] = sums.get(k, 0.0) + v
        if al.kl.mode == "reward" and al.kl.adaptive and "train/kl_reward" in sums:
            self.kl_ctl.update(sums["train/kl_reward"], len(gr.samples))
        self.version += 1
        sums.update(
            {
                "train/lr": lr,
                "train/tokens": float(batch.num_tokens),
                "train/version": self.version,
                "train/kl_coef": kl_coef,
                "train/adv_abs_mean": float((adv.abs() * mask).sum()) / n_tok,
                "train/micro_batches": float(len(mbs)),
            }
        )
        return sums

    def _critic_step(
        self, mbs: list[tuple[MicroBatch, bool]], fields: dict, weights: torch.Tensor
    ) -> float:
        """One value-loss update over the mini-batch's micro-batches; returns this rank's
        summed loss."""
        assert self.critic is not None
        total = 0.0
        clip = self.cfg.algorithm.critic.value_clip
        for i, (mb, active) in enumerate(mbs):
            resp, old_v, ret, w = (
                self._to(mb.gather(x))
                for x in (fields["resp"], fields["old_v"], fields["ret"], weights)
            )
            tok = value_loss(self._values(mb, resp), old_v, ret, resp, clip)
            loss = (tok * w).sum() * (1.0 if active else 0.0)
            self.critic.backward(loss, last=i == len(mbs) - 1)
            total += float(loss.detach())
        self.critic.step()
        return total

    def get_weights(self, dtype: str | None = None) -> dict[str, torch.Tensor] | None:
        """Full state dict (optionally cast) on rank 0, None on other ranks; collective under
        ZeRO-3 (every rank must call it), for weight sync."""
        return self.policy.full_state_dict(getattr(torch, dtype) if dtype else None)

    def weight_bytes(self, dtype: str) -> int:
        """Bytes `get_weights(dtype)` returns."""
        return self.policy.num_bytes(getattr(torch, dtype) if dtype else None)

    # ---- weight sync (rlsys/weight_sync.py, `broadcast`): rank 0 sends, all ranks gather ----

    def sync_plan(self, dtype: str, bucket_mb: float) -> list:
        """The bucket plan of the policy's weights in the rollout dtype."""
        from rlsys.weight_sync import make_plan

        return make_plan(self.policy.named_shapes(), getattr(torch, dtype).itemsize, bucket_mb)

    def sync_address(self) -> tuple[str, int]:
        """Where the sync group meets: this host and a free port."""
        import ray

        return ray.util.get_node_ip_address(), free_port()

    def sync_join(
        self, addr: str, port: int, world: int, timeout_s: float = 300, backend: str = "gloo"
    ) -> None:
        """Rank 0 joins the sync group as its sender (rank 0 of that group)."""
        from rlsys.weight_sync import SyncMember

        self.sync = None  # drop a previous group first
        self.sync = SyncMember(addr, port, 0, world, timeout_s, backend)

    def sync_send(self, plan: list, dtype: str) -> int:
        """Broadcast the weights bucket by bucket (rank 0); the other ranks take part in the
        ZeRO-3 gathers only. Returns the bytes sent."""
        buckets = self.policy.buckets(plan, getattr(torch, dtype))
        if self.rank != 0:
            for _ in buckets:
                pass
            return 0
        return self.sync.send(buckets, getattr(torch, dtype))

    def sync_shm_write(self, plan: list, dtype: str, path: str) -> int:
        """Cast the weights into the shared-memory file at `path` (rank 0; created on first
        use); the other ranks take part in the ZeRO-3 gathers only. Returns the bytes."""
        from rlsys.weight_sync import SharedWeights

        buckets = self.policy.buckets(plan)  # fp32 masters: the cast happens in the copy
        if self.rank != 0:
            for _ in buckets:
                pass
            return 0
        shm = getattr(self, "_shm", None)
        if shm is None or shm.path != path:
            shm = self._shm = SharedWeights(path, plan, getattr(torch, dtype), create=True)
        return shm.write(buckets)

    def save_pretrained(self, out_dir: str) -> str:
        """Write the policy as a Hugging Face folder (weights, config, tokenizer) from rank 0;
        collective under ZeRO-3. With `trainer.lora` the weights are the merged ones, and
        `<out_dir>/adapter` holds the adapters alone in PEFT's format (on `model.path`)."""
        import os

        state = self.policy.full_state_dict()
        factors = self.policy.adapter_state_dict() if self.policy.lora else None
        if self.rank == 0:
            assert state is not None
            self.model.save_pretrained(out_dir, state_dict=state)
            self.tokenizer.save_pretrained(out_dir)
            if factors is not None:
                lo = self.cfg.trainer.lora
                adapter = os.path.join(out_dir, "adapter")
                save_adapter(adapter, factors, lo.rank, lo.alpha, self.model_path)
        return out_dir

    def save_state(self, path: str) -> None:
        """Write everything a resumed run needs under `path` (collective: every rank calls it
        with the same path, on a filesystem all ranks share; see `trainer/checkpoint.py`):

        - `policy/`, `critic/`: DeepSpeed checkpoints (weights, optimizer, LR schedule; one
          ZeRO shard per rank; with `trainer.lora` the adapters, and the critic's value
          head, only); the frozen reference model and the base weights under LoRA are
          rebuilt from `model.path`;
        - `rank<i>.pt`: this rank's version, KL coefficient and torch RNG states;
        - rank 0 only: `hf/`, the policy as a Hugging Face folder (what `rlsys export` copies),
          and `trainer.json` (`version`, `ranks`), which the controller checks against its own
          step before it declares the checkpoint complete."""
        import json
        import os

        self.policy.save(os.path.join(path, "policy"))
        if self.critic is not None:
            self.critic.save(os.path.join(path, "critic"))
        rng = {"torch_rng": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda_rng"] = torch.cuda.get_rng_state_all()
        state = {"version": self.version, "kl_coef": float(self.kl_ctl.value), **rng}
        torch.save(state, os.path.join(path, f"rank{self.rank}.pt"))
        self.save_pretrained(os.path.join(path, "hf"))
        if self.rank == 0:
            with open(os.path.join(path, "trainer.json"), "w") as f:
                json.dump({"version": self.version, "ranks": self.world}, f)

    def load_state(self, path: str) -> None:
        """Restore what `save_state(path)` wrote (collective; the same `trainer.ranks` and
        ZeRO stage, which the controller checks before any actor starts). Raises
        FileNotFoundError or RuntimeError on a missing or unreadable part."""
        import os

        self.policy.load(os.path.join(path, "policy"))
        if self.critic is not None:
            self.critic.load(os.path.join(path, "critic"))
        state = torch.load(os.path.join(path, f"rank{self.rank}.pt"), weights_only=True)
        self.version = int(state["version"])
        self.kl_ctl.value = float(state["kl_coef"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])


_NO_REENTRANT = {"use_reentrant": False}


def _rss_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return 0.0


_LOCAL_KEYS = (
    "train/loss",
    "train/entropy",
    "train/clip_frac",
    "train/rollout_logprob_diff",
    "train/kl",
    "train/is_weight",
    "train/value_loss",
)


def _acc(d: dict[str, float], k: str, v: float) -> None:
    d[k] = d.get(k, 0.0) + v
