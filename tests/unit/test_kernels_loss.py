"""fused_policy_loss (Triton in the interpreter, fused torch) against reference.py and by hand.

The Triton path runs in a child process with TRITON_INTERPRET=1 (this file is its script, see
`__main__`) with BLOCK = 64 tokens, the torch path patched to raise, and launches counted.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import pytest
import torch

from rlsys.kernels import fused_policy_loss
from rlsys.kernels.reference import LOSS_AGG_MODES, policy_loss_ref
from rlsys.kernels.testing import assert_close, run_child

# Tolerances relative to the largest |expected| entry, against float64 on the same inputs.
# The loss is elementwise fp32 math plus one sum: measured <= 2e-7 relative for fp32 and bf16
# inputs (bf16 values are exact in fp32) -> 2e-5. The logp/entropy gradients come back in the
# input dtype: fp32 measured <= 1.3e-7 -> 2e-5; bf16 rounds to 2^-9: measured 2.8e-3 -> 1e-2.
TOL_LOSS = {torch.float32: 2e-5, torch.bfloat16: 2e-5}
TOL_GRAD = {torch.float32: 2e-5, torch.bfloat16: 1e-2}
DUAL_C = 2.0  # small enough that ~10% of negative-advantage tokens hit the cap below


@dataclass(frozen=True)
class Case:
    name: str
    b: int
    length: int
    loss_agg: str = "token-mean"
    dtype: torch.dtype = torch.float32
    dual_clip: float | None = DUAL_C
    terms: bool = True  # k3 KL and entropy bonus on
    per_token_adv: bool = False
    extra: dict = field(default_factory=dict, hash=False)


TRITON_CASES = [
    *(Case(f"triton_{m}", 5, 37, m) for m in LOSS_AGG_MODES),
    Case("triton_bf16", 5, 37, "seq-mean-token-mean", torch.bfloat16),
    Case("triton_plain", 4, 50, dual_clip=None, terms=False, per_token_adv=True),
    Case("triton_t1", 1, 1),
    Case("triton_long", 6, 700, "seq-mean-token-sum-norm", extra={"norm_len": 1024}),
]
TORCH_CASES = [
    *(
        Case(f"{m}_{d}_{'dual' if c else 'nodual'}", 5, 37, m, d, c)
        for m in LOSS_AGG_MODES
        for d in (torch.float32, torch.bfloat16)
        for c in (DUAL_C, None)
    ),
    Case("plain_per_token_adv", 4, 50, dual_clip=None, terms=False, per_token_adv=True),
    Case("t1", 1, 1),
    Case("long", 8, 1000, "seq-mean-token-mean"),
    Case("denominator", 5, 37, "token-mean", extra={"denominator": 512.0}),
    Case("seq_denominator", 5, 37, "seq-mean-token-sum", extra={"denominator": 16.0}),
]


def make_inputs(case: Case, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs with |log ratio| ~ 0.5 (so clips and dual caps both fire), a fully
    masked row, ~25% masked tokens, and -inf logprobs at masked positions (padding)."""
    g = torch.Generator().manual_seed(seed)
    shape = (case.b, case.length)
    logp = -3.0 * torch.rand(shape, generator=g) - 0.01
    mask = (torch.rand(shape, generator=g) > 0.25).float()
    mask.view(-1)[0] = 1.0
    if case.b > 2:
        mask[1] = 0.0
    adv_shape = shape if case.per_token_adv else (case.b,)
    inp = dict(
        logp=torch.where(mask > 0, logp, -math.inf).to(case.dtype),
        old_logp=(logp + 0.5 * torch.randn(shape, generator=g)).to(case.dtype),
        advantages=torch.randn(adv_shape, generator=g),
        mask=mask,
        ref_logp=(logp + 0.3 * torch.randn(shape, generator=g)).to(case.dtype),
        entropy=(3.0 * torch.rand(shape, generator=g) + 0.01).to(case.dtype),
    )
    return inp


def kwargs(case: Case, inp: dict) -> dict:
    kw = dict(clip_low=0.2, clip_high=0.28, dual_clip=case.dual_clip, loss_agg=case.loss_agg)
    if case.terms:
        kw.update(kl_coef=0.1, entropy_coef=0.01)
    return {**kw, **case.extra}


def run(fn, case: Case, inp: dict) -> dict[str, torch.Tensor]:
    """fn = fused_policy_loss-like; returns the statistics and grads w.r.t. logp/entropy."""
    logp = inp["logp"].detach().clone().requires_grad_()
    ent = inp["entropy"].detach().clone().requires_grad_()
    terms = dict(ref_logp=inp["ref_logp"], entropy=ent) if case.terms else {}
    out = fn(logp, inp["old_logp"], inp["advantages"], inp["mask"], **terms, **kwargs(case, inp))
    out.loss.backward()
    result = {k: v.detach() for k, v in out._asdict().items()}
    result["dlogp"] = logp.grad
    result["dent"] = ent.grad if case.terms else torch.zeros_like(logp)
    return result


def reference(case: Case, inp: dict) -> dict[str, torch.Tensor]:
    f64 = {k: v.double() for k, v in inp.items()}
    got = run(policy_loss_ref, case, f64)
    return got


def check(got: dict, want: dict, case: Case, label: str) -> None:
    assert got["loss"].dtype == torch.float32, label
    assert_close(got["loss"], want["loss"], TOL_LOSS[case.dtype], f"{label} loss")
    assert_close(got["kl"], want["kl"], TOL_LOSS[case.dtype], f"{label} kl")
    assert got["clipped"].item() == want["clipped"].item(), f"{label} clipped count"
    assert got["tokens"].item() == want["tokens"].item(), f"{label} token count"
    for key in ("dlogp", "dent"):
        assert got[key].dtype == case.dtype, f"{label} {key} dtype"
        assert_close(got[key], want[key], TOL_GRAD[case.dtype], f"{label} {key}")
    masked = make_inputs(case)["mask"] == 0
    assert (got["dlogp"][masked] == 0).all(), f"{label}: masked tokens get exactly zero grad"


# --------------------------------------------------------------------------- by hand


def hand_inputs() -> dict[str, torch.Tensor]:
    # old = 0; token 0: r = e = 2.718, A = -1 -> max(2.718, 1.2) = 2.718, dual-capped at
    # c = 2 -> 2.0, grad 0. token 1: r = e^-0.5 = 0.6065, A = +1 -> max(-0.6065, -0.8) =
    # -0.6065 unclipped, grad -r. token 2: r = e^0.5 = 1.6487, A = +1 -> max(-1.6487, -1.28)
    # = -1.28 clipped, grad 0. token 3: masked, logp = -inf (padding).
    return dict(
        logp=torch.tensor([[1.0, -0.5, 0.5, -math.inf]]),
        old_logp=torch.zeros(1, 4),
        advantages=torch.tensor([[-1.0, 1.0, 1.0, 1.0]]),
        mask=torch.tensor([[1.0, 1.0, 1.0, 0.0]]),
    )


HAND_KW = dict(clip_low=0.2, clip_high=0.28, dual_clip=2.0)
HAND_LOSS = (2.0 - math.exp(-0.5) - 1.28) / 3
HAND_GRAD = [0.0, -math.exp(-0.5) / 3, 0.0, 0.0]


def run_hand(backend: str) -> dict[str, torch.Tensor]:
    inp = hand_inputs()
    logp = inp.pop("logp").requires_grad_()
    out = fused_policy_loss(logp, **inp, **HAND_KW, backend=backend)
    out.loss.backward()
    return dict(loss=out.loss.detach(), clipped=out.clipped, dlogp=logp.grad)


def check_hand(got: dict) -> None:
    assert got["loss"].item() == pytest.approx(HAND_LOSS, rel=1e-6)
    assert got["clipped"].item() == 2.0  # token 0 dual-capped, token 2 ratio-clipped
    assert torch.allclose(got["dlogp"], torch.tensor([HAND_GRAD]), atol=1e-7)


def test_dual_clip_by_hand_torch() -> None:
    check_hand(run_hand("torch"))


def test_dual_clip_by_hand_triton(triton_run) -> None:
    check_hand(triton_run["hand"])


# --------------------------------------------------------------------------- Triton


@pytest.fixture(scope="module")
def triton_run(tmp_path_factory) -> dict:
    return run_child(__file__, tmp_path_factory.mktemp("loss") / "out.pt", "interpret")


def test_triton_kernel_ran_interpreted(triton_run) -> None:
    assert triton_run["launches"] == {"_policy_loss_kernel": len(TRITON_CASES) + 1}


@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: c.name)
def test_triton_matches_reference(triton_run, case: Case) -> None:
    inp = make_inputs(case)
    check(triton_run["results"][case.name], reference(case, inp), case, case.name)


def _interpreted_main(out: str) -> None:
    """Child process (TRITON_INTERPRET=1): run the public entry with backend="triton"."""
    from rlsys.kernels import loss, loss_triton
    from rlsys.kernels.testing import count_launches

    launches = count_launches(loss_triton, ["_policy_loss_kernel"])
    loss_triton.BLOCK = 64  # several programs per case, the last one partial

    class NoFallback:
        @staticmethod
        def apply(*args):
            raise AssertionError("the torch path ran instead of Triton")

    loss._TorchPolicyLoss = NoFallback

    def triton(*args, **kw):
        return fused_policy_loss(*args, **kw, backend="triton")

    results = {c.name: run(triton, c, make_inputs(c)) for c in TRITON_CASES}
    torch.save({"results": results, "hand": run_hand("triton"), "launches": dict(launches)}, out)


# --------------------------------------------------------------------------- fused torch


@pytest.mark.parametrize("case", TORCH_CASES, ids=lambda c: c.name)
def test_torch_matches_reference(case: Case) -> None:
    inp = make_inputs(case)
    check(run(fused_policy_loss, case, inp), reference(case, inp), case, case.name)


def test_inputs_exercise_every_branch() -> None:
    # the random cases above are only meaningful if clipping, dual caps and masking happen
    case = TORCH_CASES[0]
    inp = make_inputs(case)
    with_dual = run(fused_policy_loss, case, inp)
    without = run(fused_policy_loss, Case("x", case.b, case.length, dual_clip=None), inp)
    assert with_dual["clipped"] > without["clipped"] > 0.2 * with_dual["tokens"]
    assert with_dual["loss"] != without["loss"]
    assert (inp["mask"] == 0).sum() > 0.2 * inp["mask"].numel()


def test_micro_batches_sum_to_the_full_batch() -> None:
    # with the mini-batch's denominator, micro-batch losses and grads add up (trainer use)
    case = Case("split", 6, 40, "seq-mean-token-mean", terms=False)
    inp = make_inputs(case)
    den = float(((inp["mask"] > 0).sum(-1) > 0).sum())
    full = run(fused_policy_loss, Case("f", 6, 40, "seq-mean-token-mean", terms=False), inp)
    parts = [
        run(
            fused_policy_loss,
            Case("p", 3, 40, "seq-mean-token-mean", terms=False, extra={"denominator": den}),
            {k: v[rows] for k, v in inp.items()},
        )
        for rows in (slice(0, 3), slice(3, 6))
    ]
    assert_close(parts[0]["loss"] + parts[1]["loss"], full["loss"], 1e-6, "split loss")
    assert_close(torch.cat([p["dlogp"] for p in parts]), full["dlogp"], 1e-6, "split grad")


def test_rejects_bad_arguments() -> None:
    inp = hand_inputs()
    with pytest.raises(ValueError, match="dual_clip"):
        fused_policy_loss(**inp, dual_clip=0.5)
    with pytest.raises(ValueError, match="loss_agg"):
        fused_policy_loss(**inp, loss_agg="sum")
    with pytest.raises(ValueError, match="entropy"):
        fused_policy_loss(**inp, entropy_coef=0.1)
    with pytest.raises(ValueError, match="ref_logp"):
        fused_policy_loss(**inp, kl_coef=0.1)


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_triton_cuda_matches_reference() -> None:
    case = Case("cuda", 64, 4097, "seq-mean-token-mean")
    inp = {k: v.cuda() for k, v in make_inputs(case).items()}
    got = run(fused_policy_loss, case, inp)
    assert got["dlogp"].is_cuda
    want = reference(case, inp)
    check({k: v.cpu() for k, v in got.items()}, {k: v.cpu() for k, v in want.items()}, case, "cuda")


if __name__ == "__main__":
    _interpreted_main(sys.argv[1])
