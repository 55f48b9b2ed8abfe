"""Pieces of the sharded trainer that need no process group: rank split, LR schedule, stage."""

from __future__ import annotations

import math

import pytest
import torch

from rlsys.buffer.packing import rank_micro_batches
from rlsys.config import TrainerConfig
from rlsys.trainer.engine import effective_stage, lr_lambda


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("world", [2, 3])
def test_rank_split_covers_rows_once_with_equal_counts(packing: bool, world: int) -> None:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 60, (17,), generator=g)
    ids = torch.randint(5, 100, (17, 60), generator=g)
    rows = list(range(0, 17, 1))[1:]  # a mini-batch: not every row of the batch
    seen, counts, loads = [], [], []
    for rank in range(world):
        mbs, n = rank_micro_batches(lengths, rows, ids, packing, 80, 3, rank, world)
        counts.append(n)
        assert len(mbs) <= n
        mine = [r for mb in mbs for r in mb.samples]
        seen += mine
        loads.append(sum(int(lengths[r]) for r in mine))
        for mb in mbs:
            if packing:
                assert mb.num_tokens <= 80 or len(mb.samples) == 1
            else:
                assert len(mb.samples) <= 3
    assert sorted(seen) == rows  # every row on exactly one rank
    assert len(set(counts)) == 1  # every rank pads to the same count
    assert counts[0] == max(
        len(rank_micro_batches(lengths, rows, ids, packing, 80, 3, r, world)[0])
        for r in range(world)
    )
    # token balance: the spread is at most the longest single row
    assert max(loads) - min(loads) <= int(lengths[rows].max())


def test_lr_schedules() -> None:
    f = lr_lambda("cosine", warmup=2, total=10)
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == 1.0 and f(10) == pytest.approx(0.0, abs=1e-12)
    assert f(6) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    lin = lr_lambda("linear", warmup=0, total=4)
    assert [lin(s) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    const = lr_lambda("constant", warmup=3, total=100)
    assert [const(s) for s in range(5)] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0, 1.0])


def test_effective_stage() -> None:
    assert effective_stage(TrainerConfig(), 1) == 0  # one rank: nothing to shard
    assert effective_stage(TrainerConfig(), 2) == 2
    assert effective_stage(TrainerConfig(offload=True), 1) == 2
    assert effective_stage(TrainerConfig(zero_stage=3), 1) == 3
    assert effective_stage(TrainerConfig(zero_stage=1), 4) == 1
