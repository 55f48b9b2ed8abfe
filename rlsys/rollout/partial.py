"""One rollout round with partial-rollout recycling (APRIL) over a `RolloutEngine`.

A round gets more groups than the batch needs (recycled unfinished groups first, then new
prompts) and runs them under continuous batching until `want` groups are complete. The rest
are aborted: each unfinished sample keeps its tokens, logprobs and per-token versions, and
comes back in a later round continued from its token ids (prompt + response so far, never
re-tokenized text) with `max_new_tokens` reduced by what it already has. The long tail of a
round therefore never holds the batch: its tokens are carried over, not waited for.

    new group, same parameters for all -> one request with n samples (prompt prefilled once)
    any other unfinished sample        -> one request, n = 1, response_ids = its tokens so far

A sample is finished when the engine reports `stop` or `length`; a group is complete when
every sample is finished. ReMax's greedy sample is part of the group like any other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from rlsys.rollout.engine import GenerationRequest, GenerationResult, SamplingParams
from rlsys.types import Sample, SampleGroup, Status

# (sample, tokens still allowed) -> the sampling parameters of its next request
ParamsFn = Callable[[Sample, int], SamplingParams]


@dataclass
class RoundResult:
    complete: list[SampleGroup]  # every sample finished, in completion order
    partial: list[SampleGroup]  # aborted: to be continued in a later round
    tokens: int = 0  # tokens generated this round (finished or not)
    aborted_samples: int = 0
    errors: list[str] = field(default_factory=list)


def _finished(s: Sample) -> bool:
    return s.status in (Status.DONE, Status.TRUNCATED)


def _absorb(s: Sample, tokens: list[int], logprobs: list[float], version: int, reason: str) -> None:
    s.append(tokens, logprobs, version, trainable=True)
    if reason == "stop":
        s.finish(Status.DONE, "stop")
    elif reason == "length":
        s.finish(Status.TRUNCATED, "length")
    else:
        s.finish(Status.ABORTED, "abort")


def run_round(
    engine,
    groups: list[SampleGroup],
    want: int,
    max_new_tokens: int,
    params: ParamsFn,
) -> RoundResult:
    """Run `groups` until `want` of them are complete (or all are), abort the others.

    `params(sample, budget)` gives the sampling parameters for a sample's next request, with
    `budget` = `max_new_tokens` minus the response tokens it already has."""
    version = engine.version
    owner: dict[str, tuple[SampleGroup, list[Sample]]] = {}
    for g in groups:
        todo = [s for s in g.samples if not _finished(s)]
        if not todo:
            continue
        if all(not s.response_ids for s in todo) and len(todo) == len(g.samples):
            ps = [params(s, max_new_tokens) for s in todo]
            if all(p == ps[0] for p in ps):  # one request, the prompt prefilled once
                rid = f"g{g.group_id}"
                engine.add_request(
                    GenerationRequest(rid, list(todo[0].prompt_ids), ps[0], n=len(todo))
                )
                owner[rid] = (g, todo)
                continue
        for s in todo:
            budget = max_new_tokens - len(s.response_ids)
            if budget <= 0:
                s.finish(Status.TRUNCATED, "length")
                continue
            rid = f"g{g.group_id}-s{s.index}"
            req = GenerationRequest(
                rid,
                list(s.prompt_ids),
                params(s, budget),
                response_ids=list(s.response_ids),
            )
            engine.add_request(req)
            owner[rid] = (g, [s])

    out = RoundResult([], [])
    complete_ids: set[int] = set()

    def take(res: GenerationResult) -> None:
        g, samples = owner.pop(res.request_id)
        if res.error is not None:
            out.errors.append(f"{res.request_id}: {res.error}")
            for s in samples:
                s.finish(Status.TRUNCATED, "error")
        for c in res.completions:
            s = samples[c.index]
            _absorb(s, c.token_ids, c.logprobs, version, c.finish_reason)
            out.tokens += len(c.token_ids)

    def check(g: SampleGroup) -> None:
        if g.group_id not in complete_ids and all(_finished(s) for s in g.samples):
            complete_ids.add(g.group_id)
            out.complete.append(g)

    for g in groups:  # groups that needed no request (e.g. every budget spent)
        if not any(o[0] is g for o in owner.values()):
            check(g)
    while owner and len(out.complete) < want:
        for res in engine.step():
            g = owner[res.request_id][0]
            take(res)
            check(g)
    if owner:
        for res in engine.abort(list(owner)):
            g = owner[res.request_id][0]
            take(res)
            check(g)  # every sample may have just finished
    for g in groups:
        if g.group_id not in complete_ids:
            out.partial.append(g)
            out.aborted_samples += sum(s.status == Status.ABORTED for s in g.samples)
    return out
