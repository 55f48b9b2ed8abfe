"""The `RolloutEngine` seam: requests in, token-level results out.

A backend (native: `rlsys.rollout.native.NativeEngine`; vllm: later) implements the
`RolloutEngine` Protocol. Everything crosses it as token ids, never as text:

- `GenerationRequest`: one prompt (token ids), `n` samples that share it, `SamplingParams`, and
  optionally `response_ids` already generated earlier (a partial rollout being continued).
- `GenerationResult`: one per request, with `n` `Completion`s (token ids, the logprob of each
  sampled token, the policy version of each token, why it stopped) or an `error` message.

Two ways to drive an engine:

- batch: `generate(requests)` submits all and runs until every one finished; results come
  back in request order.
- step-wise: `add_request(r)` any time, then `step()` repeatedly (each call generates at most
  one token per running sample and returns the requests that finished in it); `abort(ids)`
  between steps stops requests and returns their partial output. `has_unfinished()` says
  whether more steps are needed.

Per-request problems (a prompt longer than the context window, invalid sampling parameters,
an empty prompt, ...) never raise: the request finishes with `finish_reason == "error"` and an
`error` message, and the engine keeps serving the others.

Logprob contract: `logprobs[t]` is `log_softmax(logits / T)[token_t]` of the *raw* logits (no
top-k/top-p masking), with T the request's temperature (1.0 when greedy with temperature 0).
That is what the trainer recomputes, so the importance ratio starts at exactly 1 on-policy.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import torch

FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass(kw_only=True)
class SamplingParams:
    """How to sample one request's tokens."""

    temperature: float = 1.0
    """Softmax temperature, > 0; 0 means greedy (logprobs are then under temperature 1)."""
    top_p: float = 1.0
    """Nucleus sampling threshold in (0, 1]; 1 disables it."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 (or -1) disables it."""
    greedy: bool = False
    """Pick the argmax token (temperature only affects the reported logprobs)."""
    seed: int | None = None
    """Per-request seed: sample j of the request uses its own torch.Generator seeded from
    (seed, j), so a request samples the same tokens whatever else is in the batch (up to
    batch-shape-dependent rounding in the logits). None = nondeterministic."""
    max_new_tokens: int = 32
    """Response length cap (counted from the end of `prompt_ids + response_ids`)."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Extra stop tokens (the engine's end-of-sequence ids are added unless `ignore_eos`).
    The stop token is kept as the last response token."""
    stop_strings: list[str] = field(default_factory=list)
    """Stop once the decoded response contains one of these; the token that completed it is
    the last response token. Needs an engine built with a tokenizer."""
    ignore_eos: bool = False
    """Do not stop on the model's end-of-sequence ids (benchmarks force lengths this way)."""

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0

    @property
    def logprob_temperature(self) -> float:
        """The T in log_softmax(logits / T) that the reported logprobs use."""
        return self.temperature if self.temperature > 0 else 1.0

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        t = self.temperature
        if not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {t!r}")
        p = self.top_p
        if not isinstance(p, (int, float)) or not (0 < p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {p!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be an int >= 0 (0 or -1 disables it), got {self.top_k!r}")
        m = self.max_new_tokens
        if not isinstance(m, int) or isinstance(m, bool) or m < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {m!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")
        if any(not isinstance(s, int) or s < 0 for s in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be ints >= 0, got {self.stop_token_ids!r}")
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise ValueError(f"stop_strings must be non-empty strings, got {self.stop_strings!r}")


@dataclass
class GenerationRequest:
    """One prompt and `n` samples sharing it (prefilled once, its KV copied n times)."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    n: int = 1
    response_ids: list[int] = field(default_factory=list)
    """Tokens already generated for this sample by an earlier (aborted) run: the engine
    prefills `prompt_ids + response_ids` and continues; the result holds only the new tokens
    and `max_new_tokens` counts only those. Needs `n == 1`."""


@dataclass
class Completion:
    """One sample's output. The per-token lists are aligned with `token_ids`."""

    index: int  # sample index in its request, 0..n-1
    token_ids: list[int]
    logprobs: list[float]  # log_softmax(raw logits / T)[token], float32 precision
    versions: list[int]  # weight version that produced each token
    finish_reason: FinishReason
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it


@dataclass
class GenerationResult:
    """The outcome of one request: `n` completions, or none and an `error`."""

    request_id: str
    completions: list[Completion]
    version: int  # engine weight version when the request finished
    error: str | None = None

    @property
    def finish_reason(self) -> FinishReason:
        """`error` if the request failed; else the first non-stop reason, else `stop`."""
        if self.error is not None:
            return "error"
        for reason in ("abort", "length"):
            if any(c.finish_reason == reason for c in self.completions):
                return reason  # type: ignore[return-value]
        return "stop"


@dataclass
class CheckedRequest:
    """What `check_request` derives from a valid request."""

    context: list[int]  # prompt_ids + response_ids: what the engine prefills
    max_new: int  # max_new_tokens capped by the room left in the context window
    stop_ids: frozenset[int]  # stop_token_ids, plus the engine's EOS ids unless ignore_eos


def check_request(
    r: GenerationRequest,
    *,
    active: Mapping[str, object],
    max_batch: int,
    vocab: int,
    context_len: int,
    eos_token_ids: frozenset[int],
) -> CheckedRequest:
    """The checks every engine runs on a request; ValueError naming the first problem."""
    if not isinstance(r, GenerationRequest):
        raise ValueError(f"expected a GenerationRequest, got {type(r).__name__}")
    if not isinstance(r.request_id, str) or not r.request_id:
        raise ValueError(f"request_id must be a non-empty str, got {r.request_id!r}")
    if r.request_id in active:
        raise ValueError(f"duplicate request_id {r.request_id!r} (still running)")
    if not isinstance(r.n, int) or not 1 <= r.n <= max_batch:
        raise ValueError(f"n must be an int in [1, max_batch={max_batch}]")
    if r.response_ids and r.n != 1:
        raise ValueError("continuing from response_ids needs n == 1 (one sample's tokens)")
    if not isinstance(r.params, SamplingParams):
        raise ValueError(f"params must be SamplingParams, got {type(r.params).__name__}")
    r.params.validate()
    try:  # operator.index: ints, numpy ints and 0-d int tensors pass; floats do not
        context = [operator.index(t) for t in [*r.prompt_ids, *r.response_ids]]
    except TypeError as e:
        raise ValueError(f"token ids must be integers ({e})") from None
    if len(r.prompt_ids) == 0:
        raise ValueError("empty prompt")
    if any(not 0 <= t < vocab for t in context):
        raise ValueError(f"token ids must be in [0, {vocab})")
    room = context_len - len(context)
    if room < 1:
        raise ValueError(
            f"prompt of {len(context)} tokens does not fit the context window "
            f"({context_len} tokens, prompt + response)"
        )
    stops = set(r.params.stop_token_ids)
    if not r.params.ignore_eos:
        stops |= eos_token_ids
    return CheckedRequest(context, min(r.params.max_new_tokens, room), frozenset(stops))


def error_result(request_id: str, message: str, version: int) -> GenerationResult:
    return GenerationResult(request_id=request_id, completions=[], version=version, error=message)


@runtime_checkable
class RolloutEngine(Protocol):
    """What a rollout worker needs from a generation backend. Not thread-safe: call from one
    thread (a Ray actor's), and update weights between steps."""

    @property
    def version(self) -> int:
        """Version of the weights now loaded (set by `update_weights`)."""
        ...

    def add_request(self, request: GenerationRequest) -> None:
        """Queue a request. Never raises for a bad request: it finishes with an error result
        on the next `step()`."""
        ...

    def step(self) -> list[GenerationResult]:
        """Run one scheduling step (admit + prefill waiting requests, one decode token for
        every running sample); return the requests that finished in it."""
        ...

    def has_unfinished(self) -> bool:
        """True while any request is waiting, running, or has an undelivered result."""
        ...

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Submit `requests`, run to completion, return their results in request order."""
        ...

    def abort(self, request_ids: Iterable[str]) -> list[GenerationResult]:
        """Stop these requests now and return their partial output (finish_reason `abort`
        for the samples that had not finished). Unknown or finished ids are a no-op."""
        ...

    def update_weights(self, named_tensors: Mapping[str, torch.Tensor], version: int) -> None:
        """Load new weights (HF state-dict names) in place and set `version`. Raises
        ValueError, changing nothing, on an unknown, missing or mis-shaped tensor."""
        ...


class BatchGenerateMixin:
    """`generate` for a step-wise engine that keeps `_active` (request id -> state) and
    `_outbox` (results not yet returned by `step`)."""

    _active: dict
    _outbox: list[GenerationResult]

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Submit all, run until each finished, return results in request order. Results of
        requests submitted earlier through add_request are kept for the next step()."""
        results: list[GenerationResult | None] = [None] * len(requests)
        where: dict[str, int] = {}
        for i, r in enumerate(requests):
            rid = getattr(r, "request_id", None)
            if not isinstance(rid, str):  # rejected by add_request: take its error now
                self.add_request(r)  # type: ignore[attr-defined]
                results[i] = self._outbox.pop()
                continue
            if rid in where or rid in self._active:
                version = self.version  # type: ignore[attr-defined]
                results[i] = error_result(rid, f"duplicate request_id {rid!r}", version)
                continue
            where[rid] = i
            self.add_request(r)  # type: ignore[attr-defined]
        others: list[GenerationResult] = []
        pending = set(where)
        while pending:
            for res in self.step():  # type: ignore[attr-defined]
                if res.request_id in pending:
                    results[where[res.request_id]] = res
                    pending.discard(res.request_id)
                else:
                    others.append(res)
        self._outbox = others + self._outbox
        return results  # type: ignore[return-value]
