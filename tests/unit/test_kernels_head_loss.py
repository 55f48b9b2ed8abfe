"""fused_head_loss (LM head + logprob + entropy + a per-token loss, gradient in the forward)
against the float64 reference: the loss of `logprob_entropy_ref`'s outputs, by autograd.

The torch rows run here at odd sizes in several token chunks; the Triton rows (the hybrid
path's kernels) run in a child process under TRITON_INTERPRET=1 (this file is its script),
with launches counted. Tolerances: the logprob kernels' (`rlsys.kernels.testing`: fp32 accumulation
everywhere, 2e-5 of scale; bf16 gradients, returned in bf16 and, with Triton rows, built from
a bf16 dz: 2e-2).
"""

from __future__ import annotations

import sys

import pytest
import torch

from rlsys.kernels.head_loss import fused_head_loss
from rlsys.kernels.reference import logprob_entropy_ref
from rlsys.kernels.testing import (
    LOGPROB_TOL_GRAD,
    LOGPROB_TOL_OUT,
    LogprobCase,
    assert_close,
    run_child,
)

TOL_OUT = LOGPROB_TOL_OUT[torch.float32]  # fp32 outputs whatever the inputs
TOL_GRAD = LOGPROB_TOL_GRAD
Case = LogprobCase  # rows: tokens per chunk (chunk_bytes = rows x V x 4)


CASES = [
    Case("odd_fp32", 37, 40, 300, tau=0.7),  # chunks of 16 + 16 + 5
    Case("t1", 1, 24, 100),
    Case("one_chunk", 20, 32, 200, tau=1.3, rows=64),
    Case("odd_bf16", 37, 40, 300, torch.bfloat16, tau=0.7),
]


def make_inputs(case: Case, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random, never-zero inputs and the per-token constants of a PPO-style loss; ~30% of
    tokens masked out."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(case.t, case.h, generator=g).to(case.dtype)
    weight = (2.0 / case.h**0.5 * torch.randn(case.v, case.h, generator=g)).to(case.dtype)
    targets = torch.randint(0, case.v, (case.t,), generator=g)
    targets[0] = case.v - 1
    return dict(
        hidden=hidden,
        weight=weight,
        targets=targets,
        old=-3 * torch.rand(case.t, generator=g) - 0.5,
        ref=-3 * torch.rand(case.t, generator=g) - 0.5,
        adv=torch.randn(case.t, generator=g),
        mask=(torch.rand(case.t, generator=g) > 0.3).float(),
        weights=torch.rand(case.t, generator=g) + 0.5,
    )


def ppo_token_loss(inp: dict):
    """Clipped ratio loss (0.8 / 1.28) + 0.1 x k3 KL - 0.01 x entropy, masked and weighted:
    a sum of per-token terms, as the trainer's."""

    def token_loss(rows: slice, lp: torch.Tensor, ent: torch.Tensor) -> torch.Tensor:
        old, ref, adv = inp["old"][rows], inp["ref"][rows], inp["adv"][rows]
        ratio = torch.exp(lp - old.to(lp.dtype))
        pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.28))
        log_rho = ref - lp
        kl = torch.exp(log_rho) - 1 - log_rho
        tok = pg + 0.1 * kl - 0.01 * ent
        return (tok * inp["mask"][rows] * inp["weights"][rows]).sum()

    return token_loss


def run(inp: dict, case: Case, backend: str = "torch", token_loss=None, scale: float = 1.0):
    h = inp["hidden"].detach().clone().requires_grad_()
    w = inp["weight"].detach().clone().requires_grad_()
    loss, lp, ent = fused_head_loss(
        h, w, inp["targets"], token_loss or ppo_token_loss(inp), case.tau, backend,
        chunk_bytes=case.rows * case.v * 4,
    )  # fmt: skip
    (loss * scale).backward()
    return dict(loss=loss.detach(), lp=lp, ent=ent, dh=h.grad, dw=w.grad)


def reference(inp: dict, case: Case, token_loss=None) -> dict[str, torch.Tensor]:
    h = inp["hidden"].double().requires_grad_()
    w = inp["weight"].double().requires_grad_()
    lp, ent = logprob_entropy_ref(h, w, inp["targets"], case.tau)
    f64 = {k: v.double() if v.is_floating_point() else v for k, v in inp.items()}
    loss = (token_loss or ppo_token_loss(f64))(slice(None), lp, ent)
    loss.backward()
    return dict(loss=loss.detach(), lp=lp.detach(), ent=ent.detach(), dh=h.grad, dw=w.grad)


def check(got: dict, want: dict, dtype: torch.dtype, label: str) -> None:
    for key in ("loss", "lp", "ent"):
        assert got[key].dtype == torch.float32, f"{label} {key}"
        assert_close(got[key], want[key], TOL_OUT, f"{label} {key}")
    for key in ("dh", "dw"):
        assert got[key].dtype == dtype, f"{label} {key}: gradient in the input dtype"
        assert_close(got[key], want[key], TOL_GRAD[dtype], f"{label} {key}")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_torch_rows_match_reference(case: Case) -> None:
    inp = make_inputs(case)
    check(run(inp, case), reference(inp, case), case.dtype, f"torch {case.name}")


def test_the_output_gradient_scales_the_stored_gradients() -> None:
    # the engine's loss scale (1 / accumulation steps) and a padded micro-batch's 0 x loss
    case, inp = CASES[0], make_inputs(CASES[0])
    full, half, zero = (run(inp, case, scale=s) for s in (1.0, 0.5, 0.0))
    for key in ("dh", "dw"):
        assert_close(half[key], 0.5 * full[key], 1e-6, f"half {key}")
        assert torch.equal(zero[key], torch.zeros_like(full[key])), key


def test_a_loss_without_entropy_and_logprob_outputs_without_gradient() -> None:
    case, inp = CASES[0], make_inputs(CASES[0])

    def lp_only(rows, lp, ent):
        return (inp["adv"][rows] * lp * inp["mask"][rows]).sum()

    got = run(inp, case, token_loss=lp_only)
    check(got, reference(inp, case, token_loss=lp_only), case.dtype, "lp only")
    assert not got["lp"].requires_grad and not got["ent"].requires_grad


def test_grad_into_adds_the_weight_gradient_into_grad() -> None:
    case, inp = CASES[0], make_inputs(CASES[0])
    want = reference(inp, case)["dw"]
    w = inp["weight"].clone().requires_grad_()
    for _ in range(2):  # two micro-batches accumulate
        h = inp["hidden"].clone().requires_grad_()
        loss, _, _ = fused_head_loss(
            h, w, inp["targets"], ppo_token_loss(inp), case.tau, grad_into=True,
            chunk_bytes=case.rows * case.v * 4,
        )  # fmt: skip
        loss.backward()
    assert_close(w.grad, 2 * want, TOL_GRAD[torch.float32], "grad_into dw")


def test_equals_the_unfused_logprob_then_loss() -> None:
    from rlsys.kernels import fused_logprob_entropy

    case, inp = CASES[0], make_inputs(CASES[0])
    h = inp["hidden"].clone().requires_grad_()
    w = inp["weight"].clone().requires_grad_()
    lp, ent = fused_logprob_entropy(h, w, inp["targets"], case.tau, backend="torch")
    ppo_token_loss(inp)(slice(None), lp, ent).backward()
    got = run(inp, case)
    assert_close(got["dh"], h.grad, 1e-5, "dh")
    assert_close(got["dw"], w.grad, 1e-5, "dw")


def test_rejects_bad_arguments() -> None:
    case, inp = CASES[0], make_inputs(CASES[0])
    with pytest.raises(ValueError, match="scalar"):
        run(inp, case, token_loss=lambda rows, lp, ent: lp * 2)
    with pytest.raises(ValueError, match="unknown backend 'triton'"):
        fused_head_loss(inp["hidden"], inp["weight"], inp["targets"], ppo_token_loss(inp),
                        backend="triton")  # fmt: skip
    with pytest.raises(ValueError, match="grad_into"):
        fused_head_loss(inp["hidden"], inp["weight"].bfloat16(), inp["targets"],
                        ppo_token_loss(inp), grad_into=True)  # fmt: skip


# --------------------------------------------------------------------------- Triton rows


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict:
    return run_child(__file__, tmp_path_factory.mktemp("head_loss") / "out.pt", "interpret")


def test_triton_rows_ran_interpreted_once_per_chunk(interpreted) -> None:
    chunks = sum(-(-c.t // c.rows) for c in CASES)
    assert interpreted["launches"] == {"_row_stats_kernel": chunks, "_row_grad_kernel": chunks}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_triton_rows_match_reference(interpreted, case: Case) -> None:
    inp = make_inputs(case)
    check(interpreted[case.name], reference(inp, case), case.dtype, f"triton {case.name}")


def _interpreted_main(out: str) -> None:
    from rlsys.kernels import logprob_hybrid
    from rlsys.kernels.testing import count_launches

    launches = count_launches(logprob_hybrid, ["_row_stats_kernel", "_row_grad_kernel"])
    logprob_hybrid.ROW_BLOCK = logprob_hybrid.GRAD_BLOCK = 64  # partial row blocks
    results = {case.name: run(make_inputs(case), case, "hybrid") for case in CASES}
    torch.save({**results, "launches": dict(launches)}, out)


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_matches_reference(dtype: torch.dtype) -> None:
    case = Case("cuda", 2053, 576, 49152, dtype, tau=0.9, rows=1024)  # 1024 + 1024 + 5
    inp = {k: v.cuda() for k, v in make_inputs(case).items()}
    check(run(inp, case, "auto"), reference(inp, case), dtype, "cuda")


if __name__ == "__main__":
    _interpreted_main(sys.argv[1])
