"""The Sample invariants: aligned per-token lists that change only through `append`."""

from __future__ import annotations

import pytest
import torch

from rlsys.types import Sample, Status, collate


def test_append_keeps_lists_aligned_and_marks_env_tokens() -> None:
    s = Sample(group_id=3, index=1, prompt_ids=[1, 2, 3])
    s.append([10, 11], [-0.5, -1.25], version=4, trainable=True)
    s.append([20, 21, 22], None, version=4, trainable=False)  # an observation
    assert s.response_ids == [10, 11, 20, 21, 22]
    assert s.logprobs == [-0.5, -1.25, 0.0, 0.0, 0.0]
    assert s.loss_mask == [1, 1, 0, 0, 0]
    assert s.versions == [4, 4, -1, -1, -1]
    assert s.num_tokens == 8


def test_append_rejects_misaligned_or_bad_logprobs() -> None:
    s = Sample(group_id=0, index=0, prompt_ids=[1])
    with pytest.raises(ValueError, match="one logprob each"):
        s.append([1, 2], [-0.1], version=0, trainable=True)
    with pytest.raises(ValueError, match="non-finite"):
        s.append([1], [float("nan")], version=0, trainable=True)
    assert s.response_ids == [] and s.logprobs == []  # nothing half-appended


def test_construction_checks_lengths() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        Sample(group_id=0, index=0, prompt_ids=[1], response_ids=[5, 6], logprobs=[-1.0])


def test_finished_sample_is_frozen() -> None:
    s = Sample(group_id=0, index=0, prompt_ids=[1])
    s.append([7], [-0.3], version=0, trainable=True)
    s.finish(Status.DONE, "stop")
    with pytest.raises(ValueError, match="done"):
        s.append([8], [-0.2], version=0, trainable=True)


def test_collate_places_response_tokens_after_prompt() -> None:
    a = Sample(group_id=0, index=0, prompt_ids=[1, 2])
    a.append([3, 4, 5], [-0.1, -0.2, -0.3], 0, True)
    b = Sample(group_id=0, index=1, prompt_ids=[1, 2, 9])
    b.append([6], [-0.7], 0, True)
    b.append([8], None, 0, False)
    a.reward, b.reward = 1.0, 0.0
    batch = collate([a, b], [0.5, -0.5], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5], [1, 2, 9, 6, 8]]
    assert batch.response_mask.tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 1, 0]]
    assert torch.allclose(batch.old_logprobs[0, 2:], torch.tensor([-0.1, -0.2, -0.3]))
    assert batch.advantages[1].tolist() == [0, 0, 0, -0.5, -0.5]
    assert batch.num_tokens == 4
