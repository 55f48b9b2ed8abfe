"""The records that cross actor boundaries: `Sample`, `SampleGroup`, `TrainBatch`.

A `Sample` is one trajectory (a prompt and everything after it) held as token ids. Its four
per-token lists (`response_ids`, `logprobs`, `loss_mask`, `versions`) always have equal length
and change only through `Sample.append`, which checks that. Nothing crosses a process boundary
as text when token ids exist.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch


class Status(str, Enum):
    RUNNING = "running"
    DONE = "done"  # stopped on an end-of-sequence / stop token
    TRUNCATED = "truncated"  # hit max_new_tokens or the context window
    ABORTED = "aborted"  # cut off by the buffer (partial rollout); may be continued


@dataclass
class Sample:
    """One trajectory. Per-token fields are aligned with `response_ids`."""

    group_id: int
    index: int  # place in its group
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # behaviour logprob; 0.0 for env tokens
    loss_mask: list[int] = field(default_factory=list)  # 1 = policy token, trainable
    versions: list[int] = field(default_factory=list)  # policy version per token; -1 for env
    status: Status = Status.RUNNING
    stop_reason: str | None = None
    turns: int = 0
    reward: float | None = None
    reward_info: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    trainable: bool = True  # False for ReMax's greedy baseline sample

    def __post_init__(self) -> None:
        self._check()

    def _check(self) -> None:
        n = len(self.response_ids)
        if not (len(self.logprobs) == len(self.loss_mask) == len(self.versions) == n):
            raise ValueError(
                f"Sample {self.group_id}/{self.index}: per-token lists differ in length "
                f"(response_ids={n}, logprobs={len(self.logprobs)}, "
                f"loss_mask={len(self.loss_mask)}, versions={len(self.versions)})"
            )

    def append(
        self,
        tokens: list[int],
        logprobs: list[float] | None,
        version: int,
        trainable: bool,
    ) -> None:
        """Append tokens. Policy tokens carry their logprobs and `version`; env tokens
        (`trainable=False`) get logprob 0.0 and version -1."""
        if self.status is not Status.RUNNING and self.status is not Status.ABORTED:
            raise ValueError(f"cannot append to a {self.status.value} sample")
        if trainable:
            if logprobs is None or len(logprobs) != len(tokens):
                raise ValueError("policy tokens need one logprob each")
            if any(not math.isfinite(x) for x in logprobs):
                raise ValueError("non-finite logprob")
        else:
            logprobs = [0.0] * len(tokens)
            version = -1
        self.response_ids.extend(int(t) for t in tokens)
        self.logprobs.extend(float(x) for x in logprobs)
        self.loss_mask.extend([1 if trainable else 0] * len(tokens))
        self.versions.extend([version] * len(tokens))

    def finish(self, status: Status, stop_reason: str) -> None:
        self.status = status
        self.stop_reason = stop_reason

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


@dataclass
class SampleGroup:
    """All samples of one prompt. GRPO/RLOO/ReMax need the whole group."""

    group_id: int
    samples: list[Sample]
    prompt_text: str = ""

    def rewards(self, trainable_only: bool = True) -> list[float]:
        return [
            float(s.reward)
            for s in self.samples
            if s.reward is not None and (s.trainable or not trainable_only)
        ]


@dataclass
class TrainBatch:
    """Right-padded tensors for the trainer, built from finished groups.

    `input_ids[b, :lengths[b]]` is prompt + response of sample b; response token t of that row
    sits at position `prompt_lens[b] + t`.
    """

    input_ids: torch.Tensor  # [B, L] int64
    attention_mask: torch.Tensor  # [B, L] int64
    response_mask: torch.Tensor  # [B, L] float32, 1 on trainable response tokens
    old_logprobs: torch.Tensor  # [B, L] float32, behaviour logprobs at response positions
    advantages: torch.Tensor  # [B, L] float32, per token (broadcast for outcome rewards)
    rewards: torch.Tensor  # [B] float32

    @property
    def num_tokens(self) -> int:
        return int(self.response_mask.sum().item())


def collate(samples: list[Sample], advantages: list[float], pad_id: int) -> TrainBatch:
    """Pack samples into a right-padded `TrainBatch` with per-token advantages."""
    if len(samples) != len(advantages):
        raise ValueError("one advantage per sample")
    max_len = max(s.num_tokens for s in samples)
    b = len(samples)
    input_ids = torch.full((b, max_len), pad_id, dtype=torch.long)
    attention = torch.zeros((b, max_len), dtype=torch.long)
    resp_mask = torch.zeros((b, max_len), dtype=torch.float32)
    old_lp = torch.zeros((b, max_len), dtype=torch.float32)
    adv = torch.zeros((b, max_len), dtype=torch.float32)
    for i, (s, a) in enumerate(zip(samples, advantages, strict=True)):
        p, r = len(s.prompt_ids), len(s.response_ids)
        input_ids[i, : p + r] = torch.tensor(s.prompt_ids + s.response_ids)
        attention[i, : p + r] = 1
        resp_mask[i, p : p + r] = torch.tensor(s.loss_mask, dtype=torch.float32)
        old_lp[i, p : p + r] = torch.tensor(s.logprobs, dtype=torch.float32)
        adv[i, p : p + r] = a
    rewards = torch.tensor([float(s.reward or 0.0) for s in samples])
    return TrainBatch(input_ids, attention, resp_mask, old_lp, adv, rewards)
