"""fused_logprob_entropy (Triton and hybrid in the interpreter, chunked torch) against
reference.py.

The Triton path runs in a child process with TRITON_INTERPRET=1 (this file is its script, see
`__main__`), with blocks shrunk to 16 x 64 x 16 so that every case has partial tiles, the
forward's vocabulary split 3 ways (one split empty for V=200), the chunked-torch fallback
patched to raise, and kernel launches counted. The hybrid path (cuBLAS GEMMs + Triton row
kernels) runs there too: its forward in chunks of 16 tokens, its backward in chunks of
vocabulary columns (multiples of 32), with 64-wide row blocks (partial on every axis).
"""

from __future__ import annotations

import sys

import pytest
import torch

from rlsys.kernels import fused_logprob_entropy
from rlsys.kernels.logprob import chunked_logprob_entropy, operand_dtype
from rlsys.kernels.reference import logprob_entropy_ref
from rlsys.kernels.testing import (
    LOGPROB_TOL_GRAD,
    LOGPROB_TOL_OUT,
    LogprobCase,
    assert_close,
    run_child,
)

TOL_OUT, TOL_GRAD = LOGPROB_TOL_OUT, LOGPROB_TOL_GRAD  # derivation in rlsys.kernels.testing
Case = LogprobCase


# Odd sizes: none of T, H, V is a multiple of the 16 x 64 x 16 test blocks.
TRITON_CASES = [
    Case("odd_fp32", 37, 40, 300, tau=0.7),
    Case("t1", 1, 24, 100),
    Case("long_t", 300, 32, 200, tau=1.3),
    Case("odd_bf16", 37, 40, 300, torch.bfloat16, tau=0.7),
]
TORCH_CASES = [*TRITON_CASES, Case("long_bf16", 300, 32, 200, torch.bfloat16)]


def make_inputs(case: Case, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random, never-zero inputs; logits ~ N(0, 2^2) so softmaxes are peaked but not one-hot.
    ~30% of tokens get no logprob gradient (masked tokens in the loss)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(case.t, case.h, generator=g).to(case.dtype)
    weight = (2.0 / case.h**0.5 * torch.randn(case.v, case.h, generator=g)).to(case.dtype)
    targets = torch.randint(0, case.v, (case.t,), generator=g)
    targets[0] = case.v - 1  # the last column sits in the partial vocabulary tile
    g_lp = torch.randn(case.t, generator=g) * (torch.rand(case.t, generator=g) > 0.3)
    g_ent = torch.randn(case.t, generator=g)
    return dict(hidden=hidden, weight=weight, targets=targets, g_lp=g_lp, g_ent=g_ent)


def forward_backward(inp: dict, tau: float, fn) -> dict[str, torch.Tensor]:
    """fn(hidden, weight, targets, tau) -> (lp, ent); returns outputs and both gradients."""
    h = inp["hidden"].detach().clone().requires_grad_()
    w = inp["weight"].detach().clone().requires_grad_()
    lp, ent = fn(h, w, inp["targets"], tau)
    (lp * inp["g_lp"].to(lp.dtype) + ent * inp["g_ent"].to(ent.dtype)).sum().backward()
    return dict(lp=lp.detach(), ent=ent.detach(), dh=h.grad, dw=w.grad)


def reference(inp: dict, tau: float) -> dict[str, torch.Tensor]:
    f64 = {**inp, "hidden": inp["hidden"].double(), "weight": inp["weight"].double()}
    return forward_backward(f64, tau, logprob_entropy_ref)


def check(got: dict, want: dict, dtype: torch.dtype, label: str) -> None:
    for key in ("lp", "ent"):
        assert got[key].dtype == torch.float32, f"{label} {key}: outputs are float32"
        assert_close(got[key], want[key], TOL_OUT[dtype], f"{label} {key}")
    for key in ("dh", "dw"):
        assert got[key].dtype == dtype, f"{label} {key}: gradient in the input dtype"
        assert_close(got[key], want[key], TOL_GRAD[dtype], f"{label} {key}")


# --------------------------------------------------------------------------- Triton


@pytest.fixture(scope="module")
def triton_run(tmp_path_factory) -> dict:
    return run_child(__file__, tmp_path_factory.mktemp("logprob") / "out.pt", "interpret")


def test_triton_kernels_ran_interpreted(triton_run) -> None:
    n = len(TRITON_CASES) + 1 + 4  # + the autocast case + 2 x 2 grad_into calls
    assert triton_run["launches"] == {"_logprob_fwd_kernel": n, "_logprob_bwd_kernel": n}


@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: c.name)
def test_triton_matches_reference(triton_run, case: Case) -> None:
    got = triton_run["results"][case.name]
    check(got, reference(make_inputs(case), case.tau), case.dtype, f"triton {case.name}")


def test_triton_under_bf16_autocast_takes_bf16_operands(triton_run) -> None:
    # fp32 inputs under bf16 autocast reach the kernel as bf16 (tensor cores on a GPU): the
    # outputs are the float64 reference's on bf16-rounded h and W, gradients come back fp32
    # (the kernel's bf16 dz and bf16 gradients: 1e-2, as the bf16 case)
    got = triton_run["results"]["autocast"]
    inp = make_inputs(TRITON_AUTOCAST, seed=2)
    want = reference(_bf16_operands(inp), TRITON_AUTOCAST.tau)
    for key in ("lp", "ent"):
        assert_close(got[key], want[key], TOL_OUT[torch.float32], f"triton autocast {key}")
    for key in ("dh", "dw"):
        assert got[key].dtype == torch.float32
        assert_close(got[key], want[key], TOL_GRAD[torch.bfloat16], f"triton autocast {key}")


TRITON_AUTOCAST = Case("autocast", 37, 40, 300, tau=0.7)
GRAD_INTO = (Case("grad_into_a", 37, 40, 300, tau=0.7), Case("grad_into_b", 5, 40, 300, tau=0.7))


def _grad_into_calls(fn) -> dict[str, torch.Tensor]:
    """Two micro-batches through one fp32 weight with grad_into: its .grad after both (were
    the gradient also handed to autograd, it would be counted twice)."""
    w = make_inputs(GRAD_INTO[0])["weight"].clone().requires_grad_()
    for seed, case in enumerate(GRAD_INTO):
        inp = make_inputs(case, seed=seed)
        lp, ent = fn(inp["hidden"].requires_grad_(), w, inp["targets"], case.tau)
        (lp * inp["g_lp"] + ent * inp["g_ent"]).sum().backward()
    return {"dw": w.grad}


def _grad_into_expected(rounded: bool) -> torch.Tensor:
    """The sum of the two calls' float64 reference weight gradients."""
    total = 0
    for seed, case in enumerate(GRAD_INTO):
        inp = make_inputs(case, seed=seed)
        inp = {**inp, "weight": make_inputs(GRAD_INTO[0])["weight"]}
        total = total + reference(_bf16_operands(inp) if rounded else inp, case.tau)["dw"]
    return total


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
def test_triton_grad_into_adds_the_weight_gradient_into_grad(triton_run, autocast) -> None:
    # fp32: the fp32 tolerance; under bf16 autocast the kernel's operands are bf16 and dW is
    # accumulated in fp32 straight into .grad (no bf16 round trip): the bf16 tolerance
    got = triton_run["results"]["grad_into_autocast" if autocast else "grad_into"]["dw"]
    tol = TOL_GRAD[torch.bfloat16 if autocast else torch.float32]
    assert got.dtype == torch.float32
    assert_close(got, _grad_into_expected(autocast), tol, "triton grad_into dw")


# --------------------------------------------------------------------------- hybrid

HYBRID_ROWS = 16  # tokens per forward chunk in the interpreted run (budget 16 x V x 4 bytes)
HYBRID_COL_ALIGN = 32  # backward chunks: multiples of 32 columns with T x cols x 4 <= budget
# Backward column chunks per call in that run: odd_fp32 (T=37, V=300): 128 + 128 + 44;
# t1: all 100 columns; long_t (T=300, V=200): 6 x 32 + 8; odd_bf16 and autocast as odd_fp32;
# grad_into (T=37, then T=5: 1 chunk), in fp32 and under autocast.
HYBRID_COL_CHUNKS = 3 + 1 + 7 + 3 + 3 + 2 * (3 + 1)


def test_hybrid_kernels_ran_interpreted_once_per_chunk(triton_run) -> None:
    cases = [*TRITON_CASES, TRITON_AUTOCAST, *GRAD_INTO, *GRAD_INTO]
    assert triton_run["hybrid_launches"] == {
        "_row_stats_kernel": sum(-(-c.t // HYBRID_ROWS) for c in cases),
        "_row_grad_kernel": HYBRID_COL_CHUNKS,
    }


@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: c.name)
def test_hybrid_matches_reference(triton_run, case: Case) -> None:
    got = triton_run["results"][f"hybrid/{case.name}"]
    check(got, reference(make_inputs(case), case.tau), case.dtype, f"hybrid {case.name}")


def test_hybrid_under_bf16_autocast_takes_bf16_operands(triton_run) -> None:
    got = triton_run["results"]["hybrid/autocast"]
    want = reference(_bf16_operands(make_inputs(TRITON_AUTOCAST, seed=2)), TRITON_AUTOCAST.tau)
    for key in ("lp", "ent"):
        assert_close(got[key], want[key], TOL_OUT[torch.float32], f"hybrid autocast {key}")
    for key in ("dh", "dw"):
        assert got[key].dtype == torch.float32
        assert_close(got[key], want[key], TOL_GRAD[torch.bfloat16], f"hybrid autocast {key}")


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
def test_hybrid_grad_into_adds_the_weight_gradient_into_grad(triton_run, autocast) -> None:
    got = triton_run["results"]["hybrid/grad_into_autocast" if autocast else "hybrid/grad_into"]
    tol = TOL_GRAD[torch.bfloat16 if autocast else torch.float32]
    assert got["dw"].dtype == torch.float32
    assert_close(got["dw"], _grad_into_expected(autocast), tol, "hybrid grad_into dw")


def test_hybrid_chunk_rows() -> None:
    from rlsys.kernels.logprob_hybrid import chunk_rows

    assert chunk_rows(8192, 49152) == 4096  # 1 GiB of fp32 logits
    assert chunk_rows(8192, 151936) == 1024
    assert chunk_rows(100, 49152) == 100  # capped at T
    assert chunk_rows(8192, 10**9) == 16  # at least 16


def test_hybrid_chunk_cols() -> None:
    from rlsys.kernels.logprob_hybrid import chunk_cols

    assert chunk_cols(8192, 151936) == 32768  # 1 GiB of fp32 logits: 5 chunks, the last partial
    assert chunk_cols(3000, 151936) == 89472  # 89478 rounded down to a multiple of 128
    assert chunk_cols(100, 49152) == 49152  # capped at V
    assert chunk_cols(10**7, 49152) == 128  # at least COL_ALIGN


def _interpreted_main(out: str) -> None:
    """Child process (TRITON_INTERPRET=1): run the public entry with backend="triton", then
    with backend="hybrid"."""
    from rlsys.kernels import logprob, logprob_hybrid, logprob_triton
    from rlsys.kernels.testing import count_launches

    launches = count_launches(logprob_triton, ["_logprob_fwd_kernel", "_logprob_bwd_kernel"])
    hybrid_launches = count_launches(logprob_hybrid, ["_row_stats_kernel", "_row_grad_kernel"])
    small = logprob_triton.Tiles(16, 64, 16)
    logprob_triton.OVERRIDE = (small, small)
    # 3 vocabulary splits of the forward: V=300 -> 128 + 128 + 44, V=200 -> 128 + 72 + empty
    logprob_triton.SPLITS = 3

    def no_fallback(*args, **kwargs):
        raise AssertionError("the chunked torch path ran instead of Triton")

    logprob.chunked_logprob_entropy = no_fallback
    results = {
        case.name: forward_backward(
            make_inputs(case),
            case.tau,
            lambda h, w, y, tau: fused_logprob_entropy(h, w, y, tau, backend="triton"),
        )
        for case in TRITON_CASES
    }
    with torch.autocast("cpu", dtype=torch.bfloat16):
        results["autocast"] = forward_backward(
            make_inputs(TRITON_AUTOCAST, seed=2),
            TRITON_AUTOCAST.tau,
            lambda h, w, y, tau: fused_logprob_entropy(h, w, y, tau, backend="triton"),
        )

    def triton_into(h, w, y, tau):
        return fused_logprob_entropy(h, w, y, tau, backend="triton", grad_into=True)

    results["grad_into"] = _grad_into_calls(triton_into)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        results["grad_into_autocast"] = _grad_into_calls(triton_into)

    logprob_hybrid.CHUNK_BYTES = HYBRID_ROWS * 4 * 300  # 16 rows at V=300, more at V=100, 200
    logprob_hybrid.ROW_BLOCK = logprob_hybrid.GRAD_BLOCK = 64
    logprob_hybrid.COL_ALIGN = HYBRID_COL_ALIGN

    def hybrid(h, w, y, tau, **kw):
        return fused_logprob_entropy(h, w, y, tau, backend="hybrid", **kw)

    for case in TRITON_CASES:
        chunk_bytes = HYBRID_ROWS * 4 * case.v
        results[f"hybrid/{case.name}"] = forward_backward(
            make_inputs(case),
            case.tau,
            lambda h, w, y, tau, cb=chunk_bytes: logprob_hybrid.hybrid_logprob_entropy(
                h, w, y, tau, chunk_bytes=cb
            ),
        )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        results["hybrid/autocast"] = forward_backward(
            make_inputs(TRITON_AUTOCAST, seed=2), TRITON_AUTOCAST.tau, hybrid
        )
    results["hybrid/grad_into"] = _grad_into_calls(lambda *a: hybrid(*a, grad_into=True))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        results["hybrid/grad_into_autocast"] = _grad_into_calls(
            lambda *a: hybrid(*a, grad_into=True)
        )
    torch.save(
        {"results": results, "launches": dict(launches), "hybrid_launches": dict(hybrid_launches)},
        out,
    )


# --------------------------------------------------------------------------- chunked torch


@pytest.mark.parametrize("case", TORCH_CASES, ids=lambda c: c.name)
def test_chunked_matches_reference_small_chunks(case: Case) -> None:
    # chunks of 16 tokens x 64 vocabulary entries: partial chunks on both axes
    inp = make_inputs(case)
    got = forward_backward(
        inp, case.tau, lambda h, w, y, tau: chunked_logprob_entropy(h, w, y, tau, 16, 64)
    )
    check(got, reference(inp, case.tau), case.dtype, f"chunked {case.name}")


def test_chunked_full_size_against_float64() -> None:
    # SmolLM2-135M's head (H=576, V=49152) on 1024 tokens, default chunks, ~5 s
    case = Case("full", 1024, 576, 49152, tau=0.9)
    inp = make_inputs(case, seed=1)
    got = forward_backward(inp, case.tau, fused_logprob_entropy)
    check(got, reference(inp, case.tau), case.dtype, "chunked full size")


def _bf16_operands(inp: dict) -> dict:
    """The inputs with hidden and weight rounded to bf16 (what autocast does to a GEMM's
    operands), back in fp32."""
    return {**inp, **{k: inp[k].bfloat16().float() for k in ("hidden", "weight")}}


def _bf16_math_mode_rounds() -> bool:
    """Whether an fp32 GEMM in oneDNN's bf16 math mode rounds its operands on this CPU: its
    result then differs from the fp32 GEMM's by ~1e-3 relative (bf16's unit roundoff 2^-9);
    unrounded, by fp32 summation order only (~1e-7)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 576, generator=g), torch.randn(576, 1024, generator=g)
    saved = torch.backends.mkldnn.matmul.fp32_precision
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    try:
        fast = a @ b
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = saved
    exact = a.double() @ b.double()
    return ((fast - exact).abs().max() / exact.abs().max()).item() > 1e-4


@pytest.mark.parametrize("bf16_cpu", [True, False], ids=["bf16_matmul_cpu", "older_cpu"])
@pytest.mark.parametrize(
    "case",
    [Case("autocast", 37, 40, 300, tau=0.7), Case("autocast_full", 256, 576, 49152, tau=0.9)],
    ids=lambda c: c.name,
)
def test_chunked_under_bf16_autocast_rounds_gemm_operands(monkeypatch, case, bf16_cpu) -> None:
    # The trainer runs the model under bf16 autocast: the tile GEMMs take bf16-rounded h and W
    # (as autocast's lm_head linear would) but accumulate, and keep the logits, in fp32, via
    # oneDNN's bf16 math mode. At the trainer's sizes (full: SmolLM2's head, default chunks)
    # every GEMM goes to oneDNN, so the outputs equal the float64 reference *on the rounded
    # inputs* to fp32 accuracy and not the raw one (rounding moves them ~1e-3 relative); torch
    # may keep tiny GEMMs (the small case's 16 x 64 chunks) in fp32, so there they lie within
    # the rounding (2e-3) of the rounded reference. On a CPU without bf16 matmuls the GEMMs
    # stay fp32: the raw reference to 2e-5. Gradients: dz is rounded too where oneDNN runs the
    # gradient GEMMs (unit roundoff 2^-9; measured 2e-3 relative at H=40, 3e-3 at H=576) ->
    # 1e-2 against the rounded reference.
    if not bf16_cpu:
        monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    elif not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.fail("this CPU has no oneDNN bf16 matmul; the fast path is untested here")
    elif not _bf16_math_mode_rounds():
        # oneDNN reports bf16 support (AVX512-BF16) but runs the fp32 GEMMs of its bf16 math
        # mode in fp32 (measured on an AMD EPYC without AMX): the GEMMs are fp32, as on an
        # older CPU, and the outputs must equal the raw reference to fp32 accuracy.
        bf16_cpu = False
    inp = make_inputs(case, seed=2)
    full = case.v > 1000

    def small_chunks(h, w, y, tau):  # partial chunks on both axes
        return chunked_logprob_entropy(h, w, y, tau, 16, 64, lowp=operand_dtype(h, w))

    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = forward_backward(inp, case.tau, fused_logprob_entropy if full else small_chunks)
    rounded = reference(_bf16_operands(inp), case.tau)
    raw = reference(inp, case.tau)
    for key in ("lp", "ent"):
        assert got[key].dtype == torch.float32
        if not bf16_cpu:
            assert_close(got[key], raw[key], TOL_OUT[torch.float32], f"fp32 gemm {key}")
        elif full:
            assert_close(got[key], rounded[key], TOL_OUT[torch.float32], f"bf16 gemm {key}")
            gap = (raw[key] - rounded[key]).abs().max() / rounded[key].abs().max()
            assert gap > 20 * TOL_OUT[torch.float32], f"{key}: rounding had no effect ({gap:.1e})"
        else:
            assert_close(got[key], rounded[key], 2e-3, f"bf16 gemm {key}")
    for key in ("dh", "dw"):
        assert got[key].dtype == torch.float32, "gradients in the inputs' dtype"
        assert_close(got[key], rounded[key], 1e-2, f"autocast {key}")


def test_autocast_leaves_fp32_math_mode_as_it_was() -> None:
    inp = make_inputs(Case("mode", 5, 16, 50))
    before = torch.backends.mkldnn.matmul.fp32_precision
    with torch.autocast("cpu", dtype=torch.bfloat16):
        forward_backward(inp, 1.0, fused_logprob_entropy)
    assert torch.backends.mkldnn.matmul.fp32_precision == before


def test_chunked_saves_no_logits() -> None:
    # the backward recomputes logits: saved state is hidden, weight, targets and two [T]
    # vectors, not the 1024 x 4096 logits (a 4M-element tensor would show here)
    case = Case("saved", 1024, 32, 4096)
    inp = make_inputs(case)
    h = inp["hidden"].requires_grad_()
    w = inp["weight"].requires_grad_()
    lp, _ = fused_logprob_entropy(h, w, inp["targets"])
    saved = sum(t.numel() for t in lp.grad_fn.saved_tensors)
    assert saved == h.numel() + w.numel() + 3 * case.t


@pytest.mark.parametrize("backend", ["auto", "hybrid", "triton"])
def test_backend_on_a_gpu_picks_the_hybrid_path_for_auto(monkeypatch, backend) -> None:
    # what each backend name runs where `resolve` says the tensors could take Triton (a GPU)
    from rlsys.kernels import logprob, logprob_hybrid, logprob_triton

    ran = []
    monkeypatch.setattr(logprob, "resolve", lambda backend, device: "triton")
    for mod, name, label in (
        (logprob_hybrid, "hybrid_logprob_entropy", "hybrid"),
        (logprob_triton, "triton_logprob_entropy", "triton"),
    ):
        monkeypatch.setattr(mod, name, lambda *a, _l=label, **k: ran.append(_l) or (1, 2))
    inp = make_inputs(Case("gpu", 5, 16, 50))
    fused_logprob_entropy(inp["hidden"], inp["weight"], inp["targets"], backend=backend)
    assert ran == [logprob.AUTO_ON_GPU if backend == "auto" else backend]
    assert logprob.AUTO_ON_GPU == "hybrid"


def test_auto_backend_on_cpu_is_chunked_torch() -> None:
    inp = make_inputs(Case("auto", 5, 16, 50))
    h = inp["hidden"].requires_grad_()
    lp, _ = fused_logprob_entropy(h, inp["weight"], inp["targets"], backend="auto")
    assert type(lp.grad_fn).__name__ == "_ChunkedLogprobEntropyBackward"


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    inp = make_inputs(Case("cpu", 5, 16, 50))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        fused_logprob_entropy(inp["hidden"], inp["weight"], inp["targets"], backend="triton")


def test_rejects_bad_arguments() -> None:
    inp = make_inputs(Case("bad", 5, 16, 50))
    h, w, y = inp["hidden"], inp["weight"], inp["targets"]
    with pytest.raises(ValueError, match="hidden"):
        fused_logprob_entropy(h, w[:, :8], y)
    with pytest.raises(ValueError, match="targets"):
        fused_logprob_entropy(h, w, y[:3])
    with pytest.raises(ValueError, match="temperature"):
        fused_logprob_entropy(h, w, y, temperature=0.0)
    with pytest.raises(ValueError, match="backend"):
        fused_logprob_entropy(h, w, y, backend="cuda")


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_cuda_matches_reference(dtype: torch.dtype, backend: str, monkeypatch) -> None:
    # auto = the hybrid path on a GPU, here in 3 token chunks (1024 + 1024 + 5) forward and 3
    # vocabulary chunks (24448 + 24448 + 256) backward; triton = the all-Triton kernels
    from rlsys.kernels import logprob_hybrid

    case = Case("cuda", 2053, 576, 49152, dtype, tau=0.9)  # T not a multiple of BLOCK_T
    monkeypatch.setattr(logprob_hybrid, "CHUNK_BYTES", 1024 * 4 * case.v)
    inp = {k: v.cuda() for k, v in make_inputs(case).items()}

    def fn(h, w, y, tau, **kw):
        return fused_logprob_entropy(h, w, y, tau, backend=backend, **kw)

    got = forward_backward(inp, case.tau, fn)
    assert type(got["lp"]) is torch.Tensor and got["lp"].is_cuda
    check(got, reference(inp, case.tau), dtype, f"{backend} cuda")
    if dtype == torch.float32:  # grad_into: the same dW, added into .grad
        into = forward_backward(inp, case.tau, lambda *a: fn(*a, grad_into=True))
        assert_close(into["dw"], got["dw"], TOL_GRAD[dtype], f"{backend} cuda grad_into dw")


if __name__ == "__main__":
    _interpreted_main(sys.argv[1])
