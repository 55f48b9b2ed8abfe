"""TrainerWorker: one policy update per batch of finished groups (plain PyTorch AdamW).

Per step: GRPO advantages per group -> right-padded batch -> for each mini-batch: old logprobs
(no grad) -> micro-batched forward/backward of the clipped loss -> clip grad norm -> AdamW
step. The version counts optimizer updates of the whole batch (one per step).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from rlsys.config import RecipeConfig, from_dict
from rlsys.rollout.worker import setup_actor_process
from rlsys.trainer import advantages as adv_lib
from rlsys.trainer.logprobs import token_logprobs
from rlsys.trainer.losses import aggregate, clipped_policy_loss, denominator
from rlsys.types import SampleGroup, TrainBatch, collate


class TrainerWorker:
    def __init__(self, cfg: dict, model_path: str) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg: RecipeConfig = from_dict(cfg)
        setup_actor_process(self.cfg.cluster.threads_per_actor)
        torch.manual_seed(self.cfg.seed)
        dtype = getattr(torch, self.cfg.model.dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
        self.model.train()
        self.model.config.use_cache = False
        t = self.cfg.trainer
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay
        )
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.version = 0

    def _autocast(self):
        if self.cfg.trainer.autocast_bf16:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def advantages(self, groups: list[SampleGroup]) -> list[float]:
        """One scalar advantage per sample (outcome reward broadcast over its tokens)."""
        rewards = torch.tensor([[float(s.reward) for s in g.samples] for g in groups])
        a = adv_lib.grpo(rewards, norm_by_std=self.cfg.algorithm.norm_adv_by_std)
        return a.flatten().tolist()

    def train_step(self, groups: list[SampleGroup]) -> dict[str, Any]:
        """One policy update on `groups`; returns `train/*` metrics."""
        a = self.cfg.algorithm
        t = self.cfg.trainer
        samples = [s for g in groups for s in g.samples]
        batch = collate(samples, self.advantages(groups), self.pad_id)
        temp = self.cfg.rollout.temperature
        # Split the batch into mini-batches of whole groups: one optimizer step each.
        n_per = len(samples) // len(groups)
        group_chunks = torch.arange(len(groups)).chunk(t.mini_batches)
        sums: dict[str, float] = {}
        n_tok_total = batch.num_tokens
        # With one optimizer step per batch the pre-update policy is the current one, so its
        # logprobs come free from the same forward pass (ratio == 1); otherwise one no-grad pass.
        reuse = t.mini_batches == 1
        for chunk in group_chunks:
            rows = torch.cat([torch.arange(g * n_per, (g + 1) * n_per) for g in chunk.tolist()])
            mb = _rows(batch, rows)
            prox = None
            if not reuse:
                with torch.no_grad(), self._autocast():
                    prox, _ = token_logprobs(
                        self.model, mb.input_ids, mb.attention_mask, mb.response_mask, temp
                    )
            denom = denominator(mb.response_mask, a.loss_agg)
            self.opt.zero_grad(set_to_none=True)
            for micro in torch.arange(len(rows)).split(t.micro_batch_size):
                m = _rows(mb, micro)
                width = m.input_ids.shape[1]
                with self._autocast():
                    logp, ent = token_logprobs(
                        self.model, m.input_ids, m.attention_mask, m.response_mask, temp
                    )
                old = logp.detach() if prox is None else prox[micro, :width]
                mask = m.response_mask
                tok_loss, clipped = clipped_policy_loss(
                    logp, old, m.advantages, mask, a.clip_low, a.clip_high
                )
                loss = aggregate(tok_loss, mask, a.loss_agg, denom)
                loss.backward()
                _acc(sums, "train/loss", float(loss.detach()))
                _acc(sums, "train/entropy", float((ent * mask).sum()) / n_tok_total)
                _acc(sums, "train/clip_frac", float(clipped.sum()) / n_tok_total)
                delta = ((old - m.old_logprobs).abs() * mask).sum()
                _acc(sums, "train/rollout_logprob_diff", float(delta) / n_tok_total)
            clip = t.grad_clip if t.grad_clip > 0 else math.inf
            gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            if not torch.isfinite(gn):
                raise FloatingPointError(f"non-finite gradient norm at version {self.version}")
            self.opt.step()
            _acc(sums, "train/grad_norm", float(gn) / len(group_chunks))
        self.version += 1
        sums["train/loss"] /= len(group_chunks)
        sums["train/lr"] = self.opt.param_groups[0]["lr"]
        sums["train/tokens"] = n_tok_total
        sums["train/version"] = self.version
        return sums

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


def _rows(b: TrainBatch, rows: torch.Tensor) -> TrainBatch:
    """Rows of a batch, trimmed to the longest remaining sequence."""
    width = int(b.attention_mask[rows].sum(-1).max())
    return TrainBatch(
        b.input_ids[rows, :width],
        b.attention_mask[rows, :width],
        b.response_mask[rows, :width],
        b.old_logprobs[rows, :width],
        b.advantages[rows, :width],
        b.rewards[rows],
    )


def _acc(d: dict[str, float], k: str, v: float) -> None:
    d[k] = d.get(k, 0.0) + v
