"""Weight sync in one process: bucketed broadcast (two group members on two threads) and the
shared-memory buffer (a writer and a reader mapping of one /dev/shm file)."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from rlsys.trainer.engine import free_port
from rlsys.weight_sync import (
    SharedWeights,
    SyncMember,
    broadcast_backend,
    make_plan,
    shm_path,
)


def test_plan_buckets_by_size() -> None:
    shapes = [("a", (256, 256)), ("b", (10,)), ("c", (1024, 1024)), ("d", (3, 5))]
    plan = make_plan(shapes, itemsize=2, mb=1)  # 1 MB buckets of bf16
    assert [n for b in plan for n, _ in b] == ["a", "b", "c", "d"]  # order kept, each once
    assert [len(b) for b in plan] == [3, 1]  # a+b+c passes 1 MB: closes; d alone
    assert make_plan(shapes, itemsize=2, mb=64) == [shapes]


def test_send_recv_in_buckets() -> None:
    g = torch.Generator().manual_seed(0)
    weights = {f"w{i}": torch.randn(37 * (i + 1), 11, generator=g) for i in range(6)}
    shapes = [(k, tuple(v.shape)) for k, v in weights.items()]
    assert len(make_plan(shapes, 2, mb=0)) == 6  # a bucket per tensor at mb=0
    plan = [shapes[:3], shapes[3:]]
    port = free_port()
    got: dict[str, torch.Tensor] = {}
    loads: list[int] = []
    sent: list[int] = []

    def sender() -> None:
        m = SyncMember("127.0.0.1", port, 0, 2)
        buckets = ([(n, weights[n]) for n, _ in b] for b in plan)
        sent.append(m.send(buckets, torch.bfloat16))

    def receiver() -> None:
        m = SyncMember("127.0.0.1", port, 1, 2)

        def load(views):
            loads.append(len(views))
            got.update({k: v.clone() for k, v in views.items()})

        m.recv(plan, torch.bfloat16, load)

    ts = [threading.Thread(target=sender), threading.Thread(target=receiver)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert loads == [3, 3]  # one load per bucket
    assert sent == [sum(v.numel() for v in weights.values()) * 2]
    for k, v in weights.items():
        assert got[k].dtype == torch.bfloat16 and got[k].shape == v.shape
        assert torch.equal(got[k], v.to(torch.bfloat16)), k


def test_shared_weights_cast_into_shm_and_read_back() -> None:
    """The writer casts fp32 tensors into the file; a second mapping (a worker) sees exactly
    the bf16 cast, with the plan's names and shapes; a second write replaces the first."""
    g = torch.Generator().manual_seed(1)
    weights = {f"w{i}": torch.randn(19 * (i + 1), 7, generator=g) for i in range(5)}
    plan = make_plan([(k, tuple(v.shape)) for k, v in weights.items()], 2, mb=0.001)
    assert len(plan) > 1
    path = shm_path()
    try:
        writer = SharedWeights(path, plan, torch.bfloat16, create=True)
        buckets = [[(n, weights[n]) for n, _ in b] for b in plan]
        nbytes = writer.write(buckets)
        assert nbytes == sum(v.numel() for v in weights.values()) * 2
        reader = SharedWeights(path, plan, torch.bfloat16)
        got = reader.views()
        assert list(got) == list(weights)
        for k, v in weights.items():
            assert got[k].shape == v.shape and got[k].dtype == torch.bfloat16
            assert torch.equal(got[k], v.to(torch.bfloat16)), k
        writer.write([[(n, -2 * weights[n]) for n, _ in b] for b in plan])
        assert all(torch.equal(got[k], (-2 * v).to(torch.bfloat16)) for k, v in weights.items())
        bad = {k: v.clone() for k, v in weights.items()}
        bad["w3"][2, 1] = float("nan")
        with pytest.raises(ValueError, match="non-finite values in \\['w3'\\]"):
            writer.write([[(n, bad[n]) for n, _ in b] for b in plan])
        huge = {k: torch.full_like(v, 3e38) for k, v in weights.items()}  # the sum overflows
        writer.write([[(n, huge[n]) for n, _ in b] for b in plan])  # but every value is finite
        assert all(torch.equal(got[k], v.to(torch.bfloat16)) for k, v in huge.items())
    finally:
        os.unlink(path)


def test_broadcast_backend_is_nccl_only_gpu_to_gpu() -> None:
    assert broadcast_backend("cuda", "cuda") == "nccl"
    assert broadcast_backend("cuda", "cpu") == "gloo"  # CPU rollout workers: CPU buffers
    assert broadcast_backend("cpu", "cuda") == "gloo"
