"""rlsys.allocator: compute actors keep freed memory mapped instead of faulting it in again."""

from __future__ import annotations

import subprocess
import sys

import torch

from rlsys.allocator import keep_freed_memory

# A step-like burst: 240 MiB of 12 MiB tensors allocated (and touched), then all freed. With
# glibc's defaults the freed heap top goes back to the kernel (RSS drops back: measured 1 MiB
# kept), and the next step faults every page in again; kept, it stays mapped (241 MiB) for
# the next step to reuse. Prints MiB of RSS above the start after the burst and after free.
CHILD = """
import sys, torch
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
if sys.argv[1] == "keep":
    from rlsys.allocator import keep_freed_memory
    assert keep_freed_memory()
torch.set_num_threads(1)
start = rss()
tensors = [torch.ones(3 * 2**20) for _ in range(20)]
peak = rss()
del tensors
print(peak - start, rss() - start)
"""


def _rss_mib(mode: str) -> tuple[float, float]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode], check=True, capture_output=True, text=True
    )
    peak, after = out.stdout.split()
    return float(peak), float(after)


def test_keep_freed_memory_applies_on_glibc() -> None:
    assert keep_freed_memory() is True  # every mallopt call took (this machine is glibc)


def test_freed_memory_stays_mapped_for_reuse() -> None:
    peak, after = _rss_mib("default")
    assert peak > 200 and after < 50, (peak, after)  # glibc as it comes gives it back
    peak, after = _rss_mib("keep")
    assert peak > 200 and after > 200, (peak, after)


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


def test_environment_can_turn_it_off(monkeypatch) -> None:
    monkeypatch.setenv("RLSYS_KEEP_FREED_MEMORY", "0")
    assert keep_freed_memory() is False
