"""TrainerWorker: one policy update per batch of finished groups (plain PyTorch AdamW).

A step reads top to bottom:

1. no-grad passes, only those the recipe needs: pre-update logprobs (several mini-batches or
   a KL reward), reference logprobs (KL), critic values (PPO);
2. per-token advantages (`trainer/algorithm.py`);
3. for each mini-batch of whole groups: micro-batched forward/backward of policy loss
   (+ KL loss term, - entropy bonus) -> clip -> AdamW step; then the critic's value loss;
4. version + 1.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch

from rlsys.buffer.packing import MicroBatch, micro_batches
from rlsys.config import RecipeConfig, from_dict
from rlsys.rollout.worker import setup_actor_process
from rlsys.trainer.algorithm import split_groups, token_advantages
from rlsys.trainer.critic import Critic
from rlsys.trainer.logprobs import token_logprobs
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
    def __init__(self, cfg: dict, model_path: str, critic_path: str | None = None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg: RecipeConfig = from_dict(cfg)
        setup_actor_process(self.cfg.cluster.threads_per_actor)
        torch.manual_seed(self.cfg.seed)
        dtype = getattr(torch, self.cfg.model.dtype)
        al, t = self.cfg.algorithm, self.cfg.trainer
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
        self.model.train()
        self.model.config.use_cache = False
        # fused=True: one kernel per step, no param-sized temporaries (foreach's intermediates
        # were ~0.5 GB of peak on the 135M default model).
        self.opt = torch.optim.AdamW(
            self.model.parameters(),
            lr=t.lr,
            betas=tuple(t.betas),
            weight_decay=t.weight_decay,
            fused=True,
        )
        self.ref = None
        if al.kl.mode != "none":
            # Frozen: under bf16 autocast its matmuls run in bf16 anyway, so bf16 weights give
            # the same logprobs at half the memory.
            ref_dtype = torch.bfloat16 if t.autocast_bf16 else dtype
            self.ref = AutoModelForCausalLM.from_pretrained(model_path, dtype=ref_dtype).eval()
            self.ref.requires_grad_(False)
        self.kl_ctl = AdaptiveKLController(al.kl.coef, al.kl.target, al.kl.horizon)
        self.critic = self.critic_opt = None
        if al.advantage == "gae":
            self.critic = Critic(critic_path or model_path, dtype)
            self.critic_opt = torch.optim.AdamW(
                self.critic.parameters(), lr=al.critic.lr, betas=tuple(t.betas), fused=True
            )
        if t.gradient_checkpointing:
            kw = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
            self.model.gradient_checkpointing_enable(**kw)
            if self.critic is not None:
                self.critic.backbone.gradient_checkpointing_enable(**kw)
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.version = 0

    def _autocast(self):
        if self.cfg.trainer.autocast_bf16:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _micro_batches(self, batch: TrainBatch, rows: list[int]) -> list[MicroBatch]:
        t = self.cfg.trainer
        lengths = batch.attention_mask.sum(-1)
        return micro_batches(
            lengths, rows, batch.input_ids, t.packing, t.micro_batch_tokens, t.micro_batch_size
        )

    def _logp(self, model, mb: MicroBatch, resp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self._autocast():
            return token_logprobs(
                model,
                mb.input_ids,
                mb.attention_mask,
                resp,
                self.cfg.rollout.temperature,
                mb.position_ids,
                fused=self.cfg.trainer.fused_logprob,
            )

    def _values(self, mb: MicroBatch, resp: torch.Tensor) -> torch.Tensor:
        assert self.critic is not None
        with self._autocast():
            return self.critic(mb.input_ids, mb.attention_mask, resp, mb.position_ids)

    @torch.no_grad()
    def _full_pass(self, fn: Callable, batch: TrainBatch) -> torch.Tensor:
        """fn(micro_batch, response_mask) over the whole batch, back in the [B, L] layout."""
        out = torch.zeros(batch.response_mask.shape)
        for mb in self._micro_batches(batch, list(range(batch.input_ids.shape[0]))):
            mb.scatter(fn(mb, mb.gather(batch.response_mask)).float(), out)
        return out

    def train_step(self, groups: list[SampleGroup]) -> dict[str, Any]:
        """One policy (and critic) update on `groups`; returns `train/*` metrics."""
        al, t = self.cfg.algorithm, self.cfg.trainer
        gr = split_groups(groups)
        n_groups, n_per = gr.rewards.shape
        batch = collate(gr.samples, [0.0] * len(gr.samples), self.pad_id)
        mask = batch.response_mask
        n_tok = max(batch.num_tokens, 1)

        # 1. the no-grad passes this recipe needs
        need_old = t.mini_batches > 1 or al.kl.mode == "reward"
        old_lp = ref_lp = old_v = None
        if need_old:
            old_lp = self._full_pass(lambda mb, r: self._logp(self.model, mb, r)[0], batch)
        if self.ref is not None:
            ref_lp = self._full_pass(lambda mb, r: self._logp(self.ref, mb, r)[0], batch)
        if self.critic is not None:
            old_v = self._full_pass(self._values, batch)

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

        # 3. mini-batches of whole groups, one optimizer step each
        sums: dict[str, float] = dict(stats)
        chunks = torch.arange(n_groups).chunk(t.mini_batches)
        policy_frozen = self.critic is not None and self.version < al.critic.warmup_steps
        norm_len = al.norm_len or self.cfg.rollout.max_new_tokens
        for chunk in chunks:
            rows = [g * n_per + j for g in chunk.tolist() for j in range(n_per)]
            in_mb = torch.zeros_like(mask)
            in_mb[rows] = mask[rows]
            weights = token_weights(in_mb, al.loss_agg, norm_len)  # this mini-batch's loss
            mbs = self._micro_batches(batch, rows)
            self.opt.zero_grad(set_to_none=True)
            for mb in mbs:
                x = {k: None if v is None else mb.gather(v) for k, v in fields.items()}
                logp, ent = self._logp(self.model, mb, x["resp"])
                mm = x["resp"]
                old = logp.detach() if x["old"] is None else x["old"]
                w, mm = off_policy_weights(
                    old, x["behav"], mm, al.off_policy.mode, al.off_policy.cap
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
                )
                if al.kl.mode == "loss":
                    kl = kl_penalty(logp, x["ref"], al.kl.estimator) * mm
                    tok = tok + kl_coef * kl
                    _acc(sums, "train/kl", float(kl.detach().sum()) / n_tok)
                elif x["ref"] is not None:
                    kl = kl_penalty(logp.detach(), x["ref"], al.kl.estimator) * mm
                    _acc(sums, "train/kl", float(kl.sum()) / n_tok)
                if al.entropy_coef:
                    tok = tok - al.entropy_coef * ent * mm
                loss = (tok * mb.gather(weights)).sum()
                if not policy_frozen:
                    loss.backward()
                _acc(sums, "train/loss", float(loss.detach()) / len(chunks))
                _acc(sums, "train/entropy", float((ent.detach() * mm).sum()) / n_tok)
                _acc(sums, "train/clip_frac", float(clipped.sum()) / n_tok)
                diff = ((old - x["behav"]).abs() * x["resp"]).sum()
                _acc(sums, "train/rollout_logprob_diff", float(diff) / n_tok)
                if w is not None:
                    _acc(sums, "train/is_weight", float((w * mm).sum()) / n_tok)
            if not policy_frozen:
                gn = self._step(self.model, self.opt, t.grad_clip)
                _acc(sums, "train/grad_norm", gn / len(chunks))
            if self.critic is not None:
                vl = self._critic_step(mbs, fields, weights)
                _acc(sums, "train/value_loss", vl / len(chunks))
        if al.kl.mode == "reward" and al.kl.adaptive and "train/kl_reward" in sums:
            self.kl_ctl.update(sums["train/kl_reward"], len(gr.samples))
        self.version += 1
        sums.update(
            {
                "train/lr": self.opt.param_groups[0]["lr"],
                "train/tokens": float(batch.num_tokens),
                "train/version": self.version,
                "train/kl_coef": kl_coef,
                "train/adv_abs_mean": float((adv.abs() * mask).sum()) / n_tok,
                "train/micro_batches": float(len(mbs)),
            }
        )
        return sums

    def _critic_step(self, mbs: list[MicroBatch], fields: dict, weights: torch.Tensor) -> float:
        assert self.critic is not None and self.critic_opt is not None
        self.critic_opt.zero_grad(set_to_none=True)
        total = 0.0
        clip = self.cfg.algorithm.critic.value_clip
        for mb in mbs:
            resp = mb.gather(fields["resp"])
            v = self._values(mb, resp)
            tok = value_loss(v, mb.gather(fields["old_v"]), mb.gather(fields["ret"]), resp, clip)
            loss = (tok * mb.gather(weights)).sum()
            loss.backward()
            total += float(loss.detach())
        self._step(self.critic, self.critic_opt, self.cfg.trainer.grad_clip)
        return total

    def _step(self, model: torch.nn.Module, opt: torch.optim.Optimizer, clip: float) -> float:
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else math.inf)
        if not torch.isfinite(gn):
            opt.zero_grad(set_to_none=True)
            raise FloatingPointError(
                f"non-finite gradient norm at version {self.version}: the update was skipped; "
                "lower trainer.lr or check the rewards"
            )
        opt.step()
        return float(gn)

    def get_weights(self, dtype: str | None = None) -> dict[str, torch.Tensor]:
        """Full state dict (optionally cast), for weight sync."""
        dt = getattr(torch, dtype) if dtype else None
        return {
            k: (v.detach().to(dt) if dt else v.detach()).contiguous()
            for k, v in self.model.state_dict().items()
        }

    def weight_bytes(self, dtype: str) -> int:
        """Bytes `get_weights(dtype)` returns."""
        size = getattr(torch, dtype).itemsize if dtype else 4
        return sum(v.numel() for v in self.model.state_dict().values()) * size

    def save_pretrained(self, out_dir: str) -> str:
        """Write the policy as a Hugging Face folder (weights, config, tokenizer)."""
        self.model.save_pretrained(out_dir)
        self.tokenizer.save_pretrained(out_dir)
        return out_dir


def _acc(d: dict[str, float], k: str, v: float) -> None:
    d[k] = d.get(k, 0.0) + v
