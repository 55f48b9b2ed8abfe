"""rlsys.allocator: compute actors keep freed memory mapped instead of faulting it in again."""

from __future__ import annotations

import subprocess
import sys

import torch

from rlsys.allocator import keep_freed_memory

# A step-like pattern: 240 MiB of 12 MiB tensors allocated, then all freed, five times. With
# glibc's defaults the freed heap top is trimmed every round and faulted in again (measured
# ~123k minor faults); kept, the rounds reuse it (~15k).
CHILD = """
import resource, sys, torch
if sys.argv[1] == "keep":
    from rlsys.allocator import keep_freed_memory
    assert keep_freed_memory()
torch.set_num_threads(1)
def step():
    tensors = [torch.ones(3 * 2**20) for _ in range(20)]
    del tensors
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode], check=True, capture_output=True, text=True
    )
    return int(out.stdout.strip())


def test_keep_freed_memory_applies_on_glibc() -> None:
    assert keep_freed_memory() is True  # every mallopt call took (this machine is glibc)


def test_freed_memory_is_reused_not_faulted_in_again() -> None:
    default, kept = _faults("default"), _faults("keep")
    assert default > 4 * kept, (default, kept)


def test_actor_setup_keeps_freed_memory(monkeypatch) -> None:
    import rlsys.allocator
    from rlsys.rollout.worker import setup_actor_process

    calls = []
    monkeypatch.setattr(rlsys.allocator, "keep_freed_memory", lambda: calls.append(1) or True)
    threads = torch.get_num_threads()
    try:
        setup_actor_process(1)
    finally:
        torch.set_num_threads(threads)
    assert calls == [1]
