"""Helpers for the kernel tests: tolerance checks, interpreter runs, GPU compile checks.

`@triton.jit` picks the interpreter when the kernel module is imported, so the tests run the
Triton path in a child process with TRITON_INTERPRET=1 (`run_child(..., "interpret")`) and
count launches there to prove that the kernels, not a fallback, produced the numbers
(`count_launches`). The interpreter skips code generation: `rlsys.kernels.aot` compiles every
launch for sm_90 without a GPU (tests/unit/test_kernels_compile.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]

# Tolerances of the logprob + entropy kernels (and of the fused head loss built on them),
# relative to the largest |expected| entry (`assert_close`), against a float64 reference on
# the same (bf16-rounded) inputs:
# - outputs: fp32 accumulation over H and V whatever the input dtype; measured max error
#   3e-7 relative at H=40 and 6e-7 at H=576, V=49152 -> 2e-5.
# - fp32 gradients: same fp32 accumulation; measured 9e-7 (H=40), 3e-6 (full size) -> 2e-5.
# - bf16 gradients: returned in bf16 (unit roundoff 2^-9 = 2e-3) and, in Triton, dz is cast
#   to bf16 before the gradient dots; measured 3e-3 (chunked), 5e-3 (Triton) -> 2e-2.
LOGPROB_TOL_OUT = {torch.float32: 2e-5, torch.bfloat16: 2e-5}
LOGPROB_TOL_GRAD = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


@dataclass(frozen=True)
class LogprobCase:
    """A logprob test shape: T tokens, hidden H, vocabulary V, input dtype, temperature;
    `rows`: tokens per chunk where a test sets the chunk size (chunk_bytes = rows x V x 4)."""

    name: str
    t: int
    h: int
    v: int
    dtype: torch.dtype = torch.float32
    tau: float = 1.0
    rows: int = 16


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    """Elementwise |actual - expected| <= tol * |expected| + tol * max |expected|: relative
    accuracy per element plus tol times the tensor's scale, so that entries near 0 in a tensor
    of O(1) values (a cancelled gradient) do not need relative accuracy."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    scale = max(e.abs().max().item(), 1e-30)
    torch.testing.assert_close(a, e, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


def run_child(script: str | Path, out: Path, mode: str, timeout: float = 600) -> Any:
    """Run `python script out mode` and return torch.load(out). mode "interpret" sets
    TRITON_INTERPRET=1; any other mode unsets it, so that kernels are real JIT functions."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "TRITON_CACHE_DIR": str(out.parent / "triton-cache"),
    }
    env.pop("TRITON_INTERPRET", None)
    if mode == "interpret":
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        [sys.executable, str(script), str(out), mode],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} run of {script} failed:\n{proc.stderr[-4000:]}")
    return torch.load(out, weights_only=False)


def count_launches(module: object, names: list[str]) -> Counter:
    """Count launches of the named kernels of `module`; asserts they are interpreted."""
    from triton.runtime.interpreter import InterpretedFunction

    launches: Counter = Counter()
    for name in names:
        kernel = getattr(module, name)
        assert isinstance(kernel, InterpretedFunction), f"{name} is not interpreted"
        kernel.add_pre_run_hook(lambda *_a, _name=name, **_k: launches.update([_name]))
    return launches
