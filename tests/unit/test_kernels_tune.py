"""rlsys.kernels.tune: the sweep's bookkeeping (fake kernel), and real sweeps of the logprob
and attention kernels in the Triton interpreter (child process, see `__main__`) at tiny
sizes with small candidate tiles, whose launches are recorded to prove each candidate ran."""

from __future__ import annotations

import contextlib
import sys
import time

import pytest
import torch

from rlsys.kernels.testing import run_child
from rlsys.kernels.tune import disagreement, sweep, tiles_name

# --------------------------------------------------------------------------- bookkeeping


def fake_kernel(times: dict[int, float], wrong: set[int], broken: set[int]):
    """A 'kernel' whose output depends on the candidate in use: (run, use, timer)."""
    state = {"c": None}
    base = torch.linspace(-2.0, 3.0, 50)

    @contextlib.contextmanager
    def use(cand):
        state["c"] = cand
        yield
        state["c"] = None

    def run():
        c = state["c"][0]
        if c in broken:
            raise RuntimeError("out of resources: shared memory")
        return [base * (1.5 if c in wrong else 1.0), base.exp()]

    def timer(fn):
        fn()
        return times[state["c"][0]]

    return run, use, timer


def test_sweep_picks_the_fastest_candidate_that_agrees() -> None:
    run, use, timer = fake_kernel({1: 5.0, 2: 3.0, 3: 1.0, 4: 0.5, 5: 4.0}, {3}, {4})
    cands = [(1, 8), (2, 8), (3, 8), (4, 8), (5, 4)]
    out = sweep(run, cands, use, deadline=time.monotonic() + 60, timer=timer)
    assert out.best == (2, 8)  # 3 and 4 are faster but wrong / broken
    assert out.ms == {"1w8": 5.0, "2w8": 3.0, "5w4": 4.0}
    assert set(out.rejected) == {"3w8", "4w8"}
    assert "differs" in out.rejected["3w8"]
    assert out.rejected["4w8"].startswith("RuntimeError: out of resources")


def test_sweep_past_its_deadline_runs_only_the_default() -> None:
    run, use, timer = fake_kernel({1: 5.0, 2: 3.0}, set(), set())
    out = sweep(run, [(1, 8), (2, 8)], use, deadline=time.monotonic() - 1, timer=timer)
    assert out.best == (1, 8) and out.ms == {"1w8": 5.0}
    assert out.rejected == {"2w8": "not timed: out of time"}


def test_disagreement_is_relative_to_the_tensor_scale() -> None:
    want = [torch.tensor([100.0, 0.0, -3.0])]
    assert disagreement([torch.tensor([100.5, 1.0, -3.0])], want, 2e-2) is None
    assert "differs by 3" in disagreement([torch.tensor([100.0, 3.0, -3.0])], want, 2e-2)
    assert disagreement([torch.tensor([float("nan"), 0.0, -3.0])], want, 2e-2) is not None


def test_tiles_name() -> None:
    from rlsys.kernels.attention_triton import BwdTiles
    from rlsys.kernels.logprob_triton import Tiles

    assert tiles_name(Tiles(64, 128, 32)) == "64x128x32w8"
    assert tiles_name(BwdTiles(64, 32, 4)) == "64x32w4"


# --------------------------------------------------------------------------- interpreted


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> dict:
    return run_child(__file__, tmp_path_factory.mktemp("tune") / "out.pt", "interpret")


def test_logprob_sweep_runs_every_candidate(swept) -> None:
    fwd, bwd = swept["logprob"]
    assert fwd.rejected == {} and set(fwd.ms) == {"16x64x16w8", "32x32x16w4"}
    assert bwd.rejected == {} and set(bwd.ms) == {"16x64x16w8", "32x32x16w4"}
    assert fwd.best in swept["logprob_fwd_candidates"]
    # each candidate's tiles reached the kernels: BLOCK_T of every launch, by kernel
    assert swept["launched"]["_logprob_fwd_kernel"] == {16, 32}
    assert swept["launched"]["_logprob_bwd_kernel"] == {16, 32}


def test_attention_sweep_runs_every_candidate(swept) -> None:
    fwd, bwd = swept["attention"]
    assert fwd.rejected == {} and set(fwd.ms) == {"16x16w8", "32x16w8"}
    assert bwd.rejected == {} and set(bwd.ms) == {"16x16w8", "16x32w8"}
    assert swept["launched"]["_attn_fwd_kernel"] == {16, 32}  # BLOCK_M
    assert swept["launched"]["_attn_bwd_dkdv_kernel"] == {16, 32}  # BLOCK_M = streamed


def test_overrides_are_restored_after_the_sweeps(swept) -> None:
    assert swept["overrides_after"] == [None, None]


def _interpreted_main(out: str) -> None:
    from collections import defaultdict

    from rlsys.kernels import attention_triton as at
    from rlsys.kernels import logprob_triton as lt
    from rlsys.kernels.tune import tune_attention, tune_logprob

    launched: dict[str, set[int]] = defaultdict(set)
    for mod, names in ((lt, ("_logprob_fwd_kernel", "_logprob_bwd_kernel")),
                       (at, ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel"))):  # fmt: skip
        for name in names:
            block = "BLOCK_T" if mod is lt else "BLOCK_M"
            getattr(mod, name).add_pre_run_hook(
                lambda *a, _n=name, _b=block, **k: launched[_n].add(k[_b])
            )
    lt.FWD_CANDIDATES = lt.BWD_CANDIDATES = (lt.Tiles(16, 64, 16), lt.Tiles(32, 32, 16, 4))
    at.FWD_CANDIDATES = (at.Tiles(16, 16), at.Tiles(32, 16))
    at.BWD_CANDIDATES = (at.BwdTiles(16, 16), at.BwdTiles(16, 32))
    g = torch.Generator().manual_seed(0)
    deadline = time.monotonic() + 600
    h = torch.randn(40, 24, generator=g).requires_grad_()
    w = (0.3 * torch.randn(150, 24, generator=g)).requires_grad_()
    y = torch.randint(0, 150, (40,), generator=g)
    logprob = tune_logprob(h, w, y, deadline)
    q = torch.randn(45, 4, 16, generator=g).requires_grad_()
    k = torch.randn(45, 2, 16, generator=g).requires_grad_()
    v = torch.randn(45, 2, 16, generator=g).requires_grad_()
    cu = torch.tensor([0, 33, 45], dtype=torch.int32)
    attention = tune_attention(q, k, v, cu, 33, deadline)
    result = {
        "logprob": logprob,
        "attention": attention,
        "logprob_fwd_candidates": list(lt.FWD_CANDIDATES),
        "launched": dict(launched),
        "overrides_after": [lt.OVERRIDE, at.OVERRIDE],
    }
    torch.save(result, out)


if __name__ == "__main__":
    _interpreted_main(sys.argv[1])
