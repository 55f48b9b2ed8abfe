"""Backend choice shared by the kernel entries: "auto" | "triton" | "torch".

auto   -> Triton on CUDA tensors when Triton imports, the torch path otherwise (CPU).
triton -> Triton; on CPU tensors only under TRITON_INTERPRET=1 (set before `import triton`:
          `@triton.jit` picks the interpreter at decoration time), which is slow and meant
          for correctness tests at small sizes.
torch  -> the torch path (chunked / fused autograd.Function, or the reference).
"""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "torch")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def resolve(backend: str, device: torch.device) -> str:
    """Return "triton" or "torch" for tensors on `device`; raise if the request cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend '{backend}', expected one of {BACKENDS}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if not triton_available():
        raise ImportError("backend='triton' needs the triton package (pip install triton)")
    if device.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"backend='triton' on {device.type} tensors needs TRITON_INTERPRET=1 in the "
            "environment before triton is imported"
        )
    return "triton"


def check_launchable(kernel: object, device: torch.device) -> None:
    """A kernel decorated without TRITON_INTERPRET cannot take CPU tensors: say why, early."""
    if device.type == "cuda":
        return
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(kernel, InterpretedFunction):
        raise RuntimeError(
            "Triton kernels were compiled for a GPU (TRITON_INTERPRET was unset when "
            "rlsys.kernels imported triton); set it before the import to run them on CPU"
        )
