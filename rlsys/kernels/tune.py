"""Pick a kernel's launch tiles by timing them on the device at hand.

`sweep` runs each candidate (the first is the module's default) under `override`, checks that
its outputs and gradients agree with the first candidate's, times it, and returns the fastest
that agreed. `tune_logprob` and `tune_attention` sweep the forward tiles (forward alone,
backward tiles at their default), then the backward tiles with the fastest forward (forward +
backward), over the candidates each kernel module lists (`FWD_CANDIDATES`, `BWD_CANDIDATES`:
the configurations that ptxas compiles for sm_90 without register spills).

Agreement: every output and gradient within `tol` x its largest |entry| of the default's
(2e-2: bf16 rounding of the same sums in another order moves entries by ~2^-8 of their
scale; a tile that drops or double-counts a block moves them by O(1)). `benchmarks/kernels.py
--gpu` runs the sweeps before its timed rows; on CPU they run in the Triton interpreter
(tests), where the times mean nothing but the mechanics are the same.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch


@dataclass
class Sweep:
    """One sweep: median milliseconds per timed candidate, why the others were not timed,
    and the fastest candidate that agreed (the first candidate when none was timed)."""

    best: Any
    ms: dict[str, float] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)


def tiles_name(tiles: tuple) -> str:
    """64x128x32w8 for Tiles(64, 128, 32, warps=8)."""
    return "x".join(str(x) for x in tiles[:-1]) + f"w{tiles[-1]}"


@contextlib.contextmanager
def override(module: ModuleType, tiles: tuple) -> Iterator[None]:
    """Launch `module`'s kernels with (forward, backward) `tiles` for the duration."""
    saved = module.OVERRIDE
    module.OVERRIDE = tiles
    try:
        yield
    finally:
        module.OVERRIDE = saved


def median_ms(fn: Callable[[], Any], warmup: int = 2, reps: int = 5) -> float:
    """Median wall time of `fn` in milliseconds, synchronising CUDA around each call."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def disagreement(got: list[torch.Tensor], want: list[torch.Tensor], tol: float) -> str | None:
    """None when each tensor is within tol x max |want| of want elementwise, else why not."""
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        scale = max(w.abs().max().item(), 1e-30)
        err = (g - w).abs().max().item()
        if not err <= tol * scale:  # also catches NaN
            return f"output {i} differs by {err:.3g} (scale {scale:.3g}, tol {tol})"
    return None


def sweep(
    run: Callable[[], list[torch.Tensor]],
    candidates: Sequence[tuple],
    use: Callable[[tuple], contextlib.AbstractContextManager],
    deadline: float,
    tol: float = 2e-2,
    timer: Callable[[Callable[[], Any]], float] = median_ms,
) -> Sweep:
    """Time `run` under `use(candidate)` for each candidate; the first is the reference
    (always run). Candidates past `deadline` (time.monotonic()), that raise (a launch that
    needs more shared memory than the device has) or that disagree are not timed."""
    out = Sweep(best=candidates[0])
    want: list[torch.Tensor] | None = None
    for i, cand in enumerate(candidates):
        name = tiles_name(cand)
        if i > 0 and time.monotonic() > deadline:
            out.rejected[name] = "not timed: out of time"
            continue
        try:
            with use(cand):
                got = [t.detach().float().clone() for t in run()]
                why = None if want is None else disagreement(got, want, tol)
                if why is None:
                    out.ms[name] = timer(run)
        except Exception as e:  # noqa: BLE001 - a failing candidate is a finding, not a crash
            out.rejected[name] = f"{type(e).__name__}: {e}"[:300]
            continue
        if want is None:
            want = got
        if why is not None:
            out.rejected[name] = why
    timed = [c for c in candidates if tiles_name(c) in out.ms]
    if timed:
        out.best = min(timed, key=lambda c: out.ms[tiles_name(c)])
    return out


def _fwd_bwd(
    module: ModuleType,
    default_bwd: tuple,
    forward: Callable[[], list[torch.Tensor]],
    step: Callable[[], list[torch.Tensor]],
    deadline: float,
    tol: float,
) -> tuple[Sweep, Sweep]:
    fwd = sweep(forward, module.FWD_CANDIDATES, lambda c: override(module, (c, default_bwd)),
                deadline, tol)  # fmt: skip
    bwd = sweep(step, module.BWD_CANDIDATES, lambda c: override(module, (fwd.best, c)),
                deadline, tol)  # fmt: skip
    return fwd, bwd


def tune_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    deadline: float,
    tol: float = 2e-2,
) -> tuple[Sweep, Sweep]:
    """(forward, backward) sweeps of `triton_logprob_entropy` on leaf `hidden`/`weight`
    (their .grad is reset); the loss is lp.sum() + 0.01 entropy.sum()."""
    from rlsys.kernels import logprob_triton as lt

    def forward() -> list[torch.Tensor]:
        with torch.no_grad():
            return list(lt.triton_logprob_entropy(hidden, weight, targets))

    def step() -> list[torch.Tensor]:
        hidden.grad = weight.grad = None
        lp, ent = lt.triton_logprob_entropy(hidden, weight, targets)
        (lp.sum() + 0.01 * ent.sum()).backward()
        return [lp, ent, hidden.grad, weight.grad]

    default_bwd = lt.default_tiles(hidden.dtype, weight.dtype)[1]
    return _fwd_bwd(lt, default_bwd, forward, step, deadline, tol)


def tune_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    deadline: float,
    tol: float = 2e-2,
) -> tuple[Sweep, Sweep]:
    """(forward, backward) sweeps of causal `triton_packed_attention` on leaf q, k, v (their
    .grad is reset); the loss is mean(out^2)."""
    from rlsys.kernels import attention_triton as at

    def run() -> torch.Tensor:
        return at.triton_packed_attention(q, k, v, cu_seqlens, True, max_seqlen=max_seqlen)

    def forward() -> list[torch.Tensor]:
        with torch.no_grad():
            return [run()]

    def step() -> list[torch.Tensor]:
        q.grad = k.grad = v.grad = None
        out = run()
        out.float().square().mean().backward()
        return [out, q.grad, k.grad, v.grad]

    default_bwd = at.default_tiles(q.shape[-1])[1]
    return _fwd_bwd(at, default_bwd, forward, step, deadline, tol)
