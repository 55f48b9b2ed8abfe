"""A learned reward model (`AutoModelForSequenceClassification`) served by its own Ray actor.

    rollout worker 1 ─┐  score([(prompt, response), ...])   ┌──────────────────────────┐
    rollout worker 2 ─┼────────────────────────────────────►│ RewardModelServer (Ray)  │
    rollout worker R ─┘         (named actor, shared)       │ queue → batches ≤ B      │
                                                            │ → one forward each       │
                                                            └──────────────────────────┘

`RewardModel` is the batched reward a recipe names (`fn: reward_model`). Its `setup()` gets
or creates one named actor per model path, so every rollout worker shares one copy of the
model. The actor is async: requests from all callers are queued and cut into forward batches
of at most `batch_size` sequences (a batch waits up to `max_wait_s` to fill), run on a
separate thread so the actor keeps accepting requests.

The text scored is `prompt + response`: the prompt as the policy saw it (its chat template
already applied). The score is `logits[:, label]` of the last non-padding token (how HF
sequence-classification heads pool). Use `pool: thread` for this reward: it only waits on the
actor, and a spawned process would need its own Ray connection.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rlsys.types import Sample


class RewardModelServer:
    """The Ray actor: holds the model, batches requests from every caller."""

    def __init__(
        self,
        path: str,
        batch_size: int = 16,
        max_length: int = 1024,
        max_wait_s: float = 0.01,
        label: int = 0,
        dtype: str = "float32",
        device: str | None = None,
    ) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from rlsys import models

        local = models.resolve(path) if path in models.ZOO else path
        self.tokenizer = AutoTokenizer.from_pretrained(local)
        self.tokenizer.truncation_side = "left"  # the end of the response matters most
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = AutoModelForSequenceClassification.from_pretrained(
            local, dtype=getattr(torch, dtype)
        )
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.to(self.device).eval()
        self.batch_size, self.max_length = batch_size, max_length
        self.max_wait_s, self.label = max_wait_s, label
        self.batches = 0  # forward passes run
        self.sequences = 0  # sequences scored
        self._queue: asyncio.Queue | None = None

    def forward(self, texts: list[str]) -> list[float]:
        """Score texts in one forward pass (no queueing); used by the batcher and by tests."""
        import torch

        enc = self.tokenizer(
            texts,
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=self.max_length,
        ).to(self.device)
        with torch.inference_mode():
            logits = self.model(**enc).logits  # [B, num_labels]
        self.batches += 1
        self.sequences += len(texts)
        return logits[:, self.label].float().cpu().tolist()

    async def score(self, pairs: list[tuple[str, str]]) -> list[float]:
        """Scores of `(prompt, response)` pairs, in order."""
        if self._queue is None:
            self._queue = asyncio.Queue()
            asyncio.get_running_loop().create_task(self._batcher())
        loop = asyncio.get_running_loop()
        futures = []
        for prompt, response in pairs:
            fut = loop.create_future()
            await self._queue.put((prompt + response, fut))
            futures.append(fut)
        return list(await asyncio.gather(*futures))

    async def _batcher(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.batch_size:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                elif loop.time() < deadline:
                    # polling, not wait_for(queue.get()): on 3.11 a timed-out wait_for can drop
                    # an item it already took, and that caller would never get its score
                    await asyncio.sleep(min(0.002, deadline - loop.time()))
                else:
                    break
            texts = [t for t, _ in batch]
            try:
                scores = await asyncio.to_thread(self.forward, texts)
            except Exception as e:  # fail this batch's callers, keep serving
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            for (_, fut), s in zip(batch, scores, strict=True):
                if not fut.done():
                    fut.set_result(s)

    def stats(self) -> dict[str, int]:
        return {"batches": self.batches, "sequences": self.sequences}


class RewardModel:
    """Batched reward: the score of each sample from the shared `RewardModelServer` actor.

    kwargs: `path` (zoo name or HF folder of a sequence-classification model), `batch_size`,
    `max_length`, `max_wait_s`, `label`, `dtype`, `num_cpus`, `num_gpus` (the actor's Ray
    resources), `actor_name` (default: derived from the path)."""

    batched = True
    thread_only = True  # it waits on a Ray actor; a pool process has no Ray connection

    def __init__(
        self,
        path: str,
        batch_size: int = 16,
        max_length: int = 1024,
        max_wait_s: float = 0.01,
        label: int = 0,
        dtype: str = "float32",
        num_cpus: float = 1,
        num_gpus: float = 0,
        actor_name: str | None = None,
    ) -> None:
        self.path = path
        self.server_kwargs = dict(
            path=path,
            batch_size=batch_size,
            max_length=max_length,
            max_wait_s=max_wait_s,
            label=label,
            dtype=dtype,
        )
        self.resources = dict(num_cpus=num_cpus, num_gpus=num_gpus)
        digest = hashlib.sha1(path.encode()).hexdigest()[:10]
        self.actor_name = actor_name or f"rlsys-reward-model-{digest}"
        self.actor: Any = None

    def setup(self) -> None:
        """Get the named server actor, or start it (this needs a running Ray)."""
        import ray

        server = ray.remote(RewardModelServer)
        self.actor = server.options(  # type: ignore[attr-defined]
            name=self.actor_name,
            get_if_exists=True,
            max_concurrency=1000,  # async actor: concurrent callers share batches
            **self.resources,
        ).remote(**self.server_kwargs)
        ray.get(self.actor.stats.remote())  # wait for the model to load: set-up is not timed

    def __call__(self, samples: list[Sample]) -> list[float]:
        import ray

        pairs = [(s.meta["prompt_text"], s.meta["response_text"]) for s in samples]
        return ray.get(self.actor.score.remote(pairs))
