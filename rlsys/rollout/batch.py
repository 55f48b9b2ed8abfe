"""Batch generation over any `RolloutEngine`, in the shape the rollout worker consumes.

`EngineGenerator.generate(prompts, n, ...)` submits one request per prompt (its `n` samples
share the prompt, so the engine prefills it once) with a per-request seed derived from the
call's seed, runs them to completion, and returns `Generation`s grouped per prompt, exactly as
`HFGenerator` does. A failed request raises: the prompts come from our own dataset, so an
error there is a bug, not a user input to skip.
"""

from __future__ import annotations

from rlsys.rollout.engine import GenerationRequest, SamplingParams
from rlsys.rollout.hf import Generation


class EngineGenerator:
    def __init__(self, engine) -> None:
        self.engine = engine

    def generate(
        self,
        prompts: list[list[int]],
        n: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int,
        greedy: bool = False,
    ) -> list[list[Generation]]:
        reqs = [
            GenerationRequest(
                request_id=f"{seed}-{i}",
                prompt_ids=list(p),
                n=n,
                params=SamplingParams(
                    temperature=temperature,
                    top_p=1.0 if greedy else top_p,
                    greedy=greedy,
                    seed=seed * 100_003 + i,
                    max_new_tokens=max_new_tokens,
                ),
            )
            for i, p in enumerate(prompts)
        ]
        out = []
        for res in self.engine.generate(reqs):
            if res.error is not None:
                raise RuntimeError(f"rollout engine failed request {res.request_id}: {res.error}")
            comps = sorted(res.completions, key=lambda c: c.index)
            out.append(
                [Generation(c.token_ids, c.logprobs, c.finish_reason == "stop") for c in comps]
            )
        return out
