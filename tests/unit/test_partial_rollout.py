"""Partial-rollout rounds (APRIL) on the real native engine (tiny Llama, fp32): a round stops
when enough groups are complete, the aborted samples keep tokens/logprobs/versions, and their
continuation next round finishes exactly as an uninterrupted run would."""

from __future__ import annotations

import pytest
import torch

from rlsys.buffer.stream import StreamingBuffer
from rlsys.rollout.engine import GenerationRequest, SamplingParams
from rlsys.rollout.native import NativeEngine
from rlsys.rollout.partial import run_round
from rlsys.types import Sample, SampleGroup, Status

# per-group forced response lengths: a long tail (group 0 finishes first)
TARGET = [3, 5, 40, 44, 48, 30]
N = 2
MAX_NEW = 64


@pytest.fixture(scope="module")
def engine(tiny_model_path, tiny_tokenizer) -> NativeEngine:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    cfg = NativeEngine.Config(max_batch=16, max_seq_len=128)
    return NativeEngine.from_hf_model(hf, tiny_tokenizer, cfg)


def _prompts(tok) -> list[list[int]]:
    texts = ["What is 3 + 4?", "12 * 7 =", "Say a number.", "user", "8 + 1?", "Count: 1 2 3"]
    return [tok(t)["input_ids"] for t in texts]


def _groups(tok) -> list[SampleGroup]:
    return [
        SampleGroup(g, [Sample(group_id=g, index=j, prompt_ids=p) for j in range(N)])
        for g, p in enumerate(_prompts(tok))
    ]


def _params(s: Sample, budget: int) -> SamplingParams:
    left = TARGET[s.group_id] - len(s.response_ids)
    return SamplingParams(greedy=True, max_new_tokens=min(budget, left), ignore_eos=True)


def test_round_stops_at_want_and_continuation_matches(engine, tiny_tokenizer) -> None:
    groups = _groups(tiny_tokenizer)
    r1 = run_round(engine, groups, want=2, max_new_tokens=MAX_NEW, params=_params)
    assert [g.group_id for g in r1.complete] == [0, 1]  # the two short groups
    assert sorted(g.group_id for g in r1.partial) == [2, 3, 4, 5]
    assert r1.aborted_samples == 4 * N
    for g in r1.partial:
        for s in g.samples:
            assert s.status == Status.ABORTED
            assert 0 < len(s.response_ids) < TARGET[g.group_id]  # really cut mid-way
            assert len(s.logprobs) == len(s.versions) == len(s.response_ids)
            assert set(s.versions) == {0}
    kept = {(s.group_id, s.index): list(s.response_ids) for g in r1.partial for s in g.samples}

    # next round at a new weight version (same weights): the prefix keeps version 0
    engine.update_weights({}, 1, partial=True)
    r2 = run_round(engine, r1.partial, want=10, max_new_tokens=MAX_NEW, params=_params)
    assert sorted(g.group_id for g in r2.complete) == [2, 3, 4, 5] and not r2.partial
    prompts = _prompts(tiny_tokenizer)
    for g in r2.complete:
        fresh = Sample(group_id=g.group_id, index=0, prompt_ids=prompts[g.group_id])
        (full,) = engine.generate(
            [GenerationRequest("ref", prompts[g.group_id], _params(fresh, MAX_NEW))]
        )
        for s in g.samples:
            k = len(kept[(s.group_id, s.index)])
            assert s.response_ids[:k] == kept[(s.group_id, s.index)]  # tokens kept
            assert s.response_ids == full.completions[0].token_ids  # as if never aborted
            assert s.versions == [0] * k + [1] * (len(s.response_ids) - k)
            assert s.status == Status.TRUNCATED and s.stop_reason == "length"


def test_budget_counts_earlier_tokens(engine, tiny_tokenizer) -> None:
    """A continued sample may only generate max_new_tokens minus what it already has."""
    g = _groups(tiny_tokenizer)[4]
    for s in g.samples:
        s.append([7, 8, 9] * 5, [-1.0] * 15, 0, True)
        s.finish(Status.ABORTED, "abort")

    def unbounded(s: Sample, budget: int) -> SamplingParams:
        return SamplingParams(greedy=True, max_new_tokens=budget, ignore_eos=True)

    r = run_round(engine, [g], want=1, max_new_tokens=20, params=unbounded)
    assert [len(s.response_ids) for s in r.complete[0].samples] == [20] * N


def test_buffer_recycles_first_in_first_out() -> None:
    b = StreamingBuffer()
    gs = [SampleGroup(i, []) for i in range(5)]
    assert b.recycle(gs[:3]) == 3
    b.recycle(gs[3:])
    assert [g.group_id for g in b.take_recycled(2)] == [0, 1]
    snap = b.snapshot()
    b2 = StreamingBuffer()
    b2.restore(snap)
    assert [g.group_id for g in b2.take_recycled(10)] == [2, 3, 4]
    assert b2.stats()["buffer/recycled"] == 5 and b2.stats()["buffer/recycle_depth"] == 0


def test_stale_mask_drops_only_the_older_policys_tokens() -> None:
    """`rollout.partial.stale: mask`: a recycled sample's tokens from versions before the
    training policy's get loss mask 0; its current-version tokens stay trainable, env tokens
    stay masked, and tokens, logprobs and versions are untouched."""
    from rlsys.controller import _mask_stale

    s = Sample(group_id=0, index=0, prompt_ids=[1, 2])
    s.append([5, 6], [-0.1, -0.2], version=1, trainable=True)  # before the abort
    s.append([7], None, version=1, trainable=False)  # a tool's output
    s.append([8, 9], [-0.3, -0.4], version=2, trainable=True)  # continued after the push
    fresh = Sample(group_id=0, index=1, prompt_ids=[1, 2])
    fresh.append([4, 4, 4], [-0.5, -0.6, -0.7], version=2, trainable=True)
    before = (list(s.response_ids), list(s.logprobs), list(s.versions))
    _mask_stale([SampleGroup(0, [s, fresh])], version=2)
    assert s.loss_mask == [0, 0, 0, 1, 1]
    assert fresh.loss_mask == [1, 1, 1]
    assert (s.response_ids, s.logprobs, s.versions) == before
