"""`RewardScorer`: scores a batch of responses with the recipe's reward parts, concurrently.

Each part is called once per sample (per-sample form) or once per batch (batched form); all
calls of all parts go to one pool (`reward.pool`, `reward.workers`) and run at once. Then

    score = sum_i weight_i * score_i

and `parts` holds each part's unweighted score as `<name>` and its extra metrics as
`<name>/<metric>`. A single `reward.fn` (or the task's verifier) keeps today's logging: its
extras are logged under their own names and its score is the total.

A failed call (exception, timeout, non-finite or malformed result) is an error. Each failed
(sample, part) adds 1 to `errors`; the first traceback is logged once and kept in
`first_traceback`. Then `on_error` decides:

- `raise`: `score` raises `RewardError` (after counting);
- `zero`: the failed part scores 0.0 for that sample, the other parts still count;
- `skip`: the sample's outcome has `score=None`; the caller drops it from training.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from rlsys.reward.api import LoadedReward, load_reward
from rlsys.reward.config import RewardConfig, resolved_parts, validate_reward_config
from rlsys.reward.pool import Job, ProcessRunner, ThreadRunner

if TYPE_CHECKING:  # rlsys.types imports torch; process-pool children never need it
    from rlsys.types import Sample

log = logging.getLogger("rlsys.reward")


class RewardError(RuntimeError):
    """A reward call failed and the recipe says `on_error: raise`."""


@dataclass
class RewardInput:
    """One response to score."""

    prompt: str  # the prompt as the policy saw it (chat template applied)
    response: str  # the decoded response
    meta: dict[str, Any] = field(default_factory=dict)  # dataset fields (answer, tests, ...)
    sample: Sample | None = None  # token-level record, for batched rewards


@dataclass
class RewardOutcome:
    """The reward of one response."""

    score: float | None  # weighted sum of parts; None = drop the sample (on_error: skip)
    parts: dict[str, float] = field(default_factory=dict)  # logged as reward/<key>
    error: str | None = None  # first line of the first error, if any part failed


@dataclass
class _Part:
    name: str
    weight: float
    reward: LoadedReward


class RewardScorer:
    """Scores batches with weighted reward parts on a thread or process pool.

    Use `build_scorer(cfg, task)`; `close()` (or a `with` block) stops the pool."""

    def __init__(
        self,
        parts: list[_Part],
        *,
        single: bool,
        on_error: str = "zero",
        timeout_s: float | None = None,
        pool: str = "thread",
        workers: int = 4,
    ) -> None:
        self.parts, self.single = parts, single
        self.on_error, self.timeout_s = on_error, timeout_s
        self.errors = 0
        """Failed (sample, part) calls since construction."""
        self.timeouts = 0
        """Of `errors`, the calls that hit `timeout_s`."""
        self.skipped = 0
        """Samples returned with `score=None` (on_error: skip)."""
        self.first_error: str | None = None
        self.first_traceback: str | None = None
        self._interval = {"errors": 0, "timeouts": 0, "skipped": 0, "score_s": 0.0}
        self._lock = threading.Lock()
        names = [p.name for p in parts]
        if pool == "process":
            specs = [(p.reward.spec, p.reward.kwargs, None) for p in parts]
            self.runner: Any = ProcessRunner(specs, workers, names)
            self.runner.wait_ready()
        else:
            self.runner = ThreadRunner([p.reward for p in parts], workers)

    def score(self, batch: list[RewardInput]) -> list[RewardOutcome]:
        """One outcome per input, in order. Returns within about
        ceil(calls / workers) * timeout_s even when every call hangs."""
        t0 = time.perf_counter()
        if not batch:
            return []
        jobs: list[Job] = []
        covers: list[list[int]] = []  # the batch positions each job scores
        samples: list[Sample] | None = None
        for i, p in enumerate(self.parts):
            if p.reward.batched:
                samples = samples or [_as_sample(x, k) for k, x in enumerate(batch)]
                jobs.append(Job(i, samples=samples))
                covers.append(list(range(len(batch))))
            else:
                for k, x in enumerate(batch):
                    jobs.append(Job(i, prompt=x.prompt, response=x.response, meta=x.meta))
                    covers.append([k])
        self.runner.run(jobs, self.timeout_s)
        # per sample: part index -> (score, extras), or the Job whose call failed
        got: list[dict[int, Any]] = [{} for _ in batch]
        failed = [job for job in jobs if job.error]
        for job, cover in zip(jobs, covers, strict=True):
            for pos, k in enumerate(cover):
                got[k][job.part] = job if job.error else job.result[pos]  # type: ignore[index]
        with self._lock:  # score() may be called from several threads
            for job, cover in zip(jobs, covers, strict=True):
                if job.error:
                    self._record(job, len(cover))
            outcomes = [self._combine(g) for g in got]
            self._interval["score_s"] += time.perf_counter() - t0
        if self.on_error == "raise" and failed:
            job = failed[0]
            msg = f"reward '{self.parts[job.part].name}': {job.error}"
            raise RewardError(f"{msg}\n{job.traceback or ''}".rstrip())
        return outcomes

    def _record(self, job: Job, n: int) -> None:
        self.errors += n
        self._interval["errors"] += n
        if job.timed_out:
            self.timeouts += n
            self._interval["timeouts"] += n
        if self.first_error is None:
            name = self.parts[job.part].name
            self.first_error = f"reward '{name}': {job.error}"
            self.first_traceback = job.traceback or job.error
            log.warning("first reward error (%s):\n%s", name, self.first_traceback)

    def _combine(self, got: dict[int, Any]) -> RewardOutcome:
        total, parts, error = 0.0, {}, None
        for i, p in enumerate(self.parts):
            res = got[i]
            if isinstance(res, Job):
                error = error or f"reward '{p.name}': {res.error}"
                score, extras = 0.0, {}
            else:
                score, extras = res
            total += p.weight * score
            if self.single:
                parts.update(extras)
            else:
                parts[p.name] = score
                parts.update({f"{p.name}/{k}": v for k, v in extras.items()})
        if error is not None and self.on_error == "skip":
            self.skipped += 1
            self._interval["skipped"] += 1
            return RewardOutcome(None, parts, error)
        return RewardOutcome(total, parts, error)

    def take_stats(self) -> dict[str, Any]:
        """`reward/errors`, `reward/timeouts`, `reward/skipped`, `reward/score_s` since the last
        call, plus `reward/first_error` (the first error ever seen, one line) when there is one."""
        with self._lock:
            out: dict[str, Any] = {f"reward/{k}": v for k, v in self._interval.items()}
            self._interval = {"errors": 0, "timeouts": 0, "skipped": 0, "score_s": 0.0}
        if self.first_error:
            out["reward/first_error"] = self.first_error
        return out

    def close(self) -> None:
        """Stop the pool (threads stuck in an abandoned call stay until it returns)."""
        self.runner.close()

    def __enter__(self) -> RewardScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _as_sample(x: RewardInput, index: int) -> Sample:
    """The `Sample` a batched reward sees: the caller's (not mutated) with the texts in meta."""
    from rlsys.types import Sample

    meta = {**x.meta, "prompt_text": x.prompt, "response_text": x.response}
    if x.sample is None:
        return Sample(group_id=-1, index=index, prompt_ids=[], meta=meta)
    return replace(x.sample, meta={**x.sample.meta, **meta})


def build_scorer(cfg: RewardConfig, task: str | None) -> RewardScorer:
    """Validate `cfg`, load every part, run set-up and start the pool. Raises `ConfigError`
    for a recipe mistake, and whatever a reward's `setup()` raises."""
    validate_reward_config(cfg, task)
    parts = [
        _Part(p.name or "", float(p.weight), load_reward(str(p.fn), p.kwargs, task))
        for p in resolved_parts(cfg)
    ]
    return RewardScorer(
        parts,
        single=not cfg.parts,
        on_error=cfg.on_error,
        timeout_s=cfg.timeout_s,
        pool=cfg.pool,
        workers=cfg.workers,
    )
