"""packed_attention (Triton FlashAttention-2 in the interpreter, SDPA fallback) against
reference.py and against per-sequence SDPA.

The Triton path runs in a child process with TRITON_INTERPRET=1 (this file is its script, see
`__main__`) with 16 x 16 blocks, the SDPA fallback patched to raise, and launches counted;
then again with unequal tiles (query and key blocks of 16 and 32 both ways, forward and
backward), so each kernel's masked and unmasked ranges meet at every alignment.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from rlsys.kernels import packed_attention
from rlsys.kernels.reference import packed_attention_ref
from rlsys.kernels.testing import assert_close, run_child

# Tolerances relative to the largest |expected| entry, against float64 on the same inputs.
# fp32: measured <= 3.2e-7 relative -> 2e-5. bf16: outputs and grads are stored in bf16 (2^-9)
# and P / dS are cast to bf16 before their dots, as on the GPU; measured <= 8.6e-3 -> 3e-2.
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


@dataclass(frozen=True)
class Case:
    name: str
    lens: tuple[int, ...]
    hq: int
    hkv: int
    d: int
    dtype: torch.dtype = torch.float32
    causal: bool = True


# Lengths straddle the 16-token test blocks; an empty sequence and a 1-token one included.
TRITON_CASES = [
    Case("odd_gqa", (1, 17, 40, 0, 9), 4, 2, 24),
    Case("noncausal_gqa", (1, 17, 40, 0, 9), 4, 2, 24, causal=False),
    Case("bf16_mqa", (33, 5, 20), 4, 1, 32, torch.bfloat16),
    Case("t1", (1,), 2, 2, 16),
    Case("long", (150, 70), 2, 1, 16),
]


def cu_seqlens(lens: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


def make_inputs(case: Case, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = sum(case.lens)
    q = torch.randn(n, case.hq, case.d, generator=g).to(case.dtype)
    k = torch.randn(n, case.hkv, case.d, generator=g).to(case.dtype)
    v = torch.randn(n, case.hkv, case.d, generator=g).to(case.dtype)
    grad = torch.randn(n, case.hq, case.d, generator=g)
    return dict(q=q, k=k, v=v, grad=grad, cu=cu_seqlens(case.lens))


def forward_backward(inp: dict, causal: bool, fn) -> dict[str, torch.Tensor]:
    q, k, v = (inp[x].detach().clone().requires_grad_() for x in "qkv")
    out = fn(q, k, v, inp["cu"], causal)
    (out * inp["grad"].to(out.dtype)).sum().backward()
    return dict(out=out.detach(), dq=q.grad, dk=k.grad, dv=v.grad)


def reference(inp: dict, causal: bool) -> dict[str, torch.Tensor]:
    f64 = {key: (x.double() if x.is_floating_point() else x) for key, x in inp.items()}
    return forward_backward(f64, causal, packed_attention_ref)


def check(got: dict, want: dict, dtype: torch.dtype, label: str) -> None:
    for key in ("out", "dq", "dk", "dv"):
        assert got[key].dtype == dtype, f"{label} {key} dtype"
        assert_close(got[key], want[key], TOL[dtype], f"{label} {key}")


# --------------------------------------------------------------------------- Triton


@pytest.fixture(scope="module")
def triton_run(tmp_path_factory) -> dict:
    return run_child(__file__, tmp_path_factory.mktemp("attention") / "out.pt", "interpret")


# (forward (BLOCK_M, BLOCK_N), backward (own, stream)) for the second pass.
UNEQUAL_TILES = {"m32n16": ((32, 16), (16, 32)), "m16n32": ((16, 32), (32, 16))}


def test_triton_kernels_ran_interpreted(triton_run) -> None:
    n = len(TRITON_CASES) * (1 + len(UNEQUAL_TILES)) + 1  # + negative_scores
    names = ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel")
    assert triton_run["launches"] == dict.fromkeys(names, n)


@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: c.name)
def test_triton_matches_reference(triton_run, case: Case) -> None:
    want = reference(make_inputs(case), case.causal)
    check(triton_run["results"][case.name], want, case.dtype, f"triton {case.name}")


@pytest.mark.parametrize("tiles", UNEQUAL_TILES)
@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: c.name)
def test_triton_unequal_tiles_match_reference(triton_run, case: Case, tiles: str) -> None:
    want = reference(make_inputs(case), case.causal)
    got = triton_run["results"][f"{case.name}/{tiles}"]
    check(got, want, case.dtype, f"triton {case.name} tiles {tiles}")


# Every score very negative (q.k / sqrt(D) ~ -100, lse2 ~ -140): a key past the sequence end
# (loaded as 0) would get P = 2^-lse2 = inf, and inf x 0 = NaN in dQ unless it is masked.
NEGATIVE = Case("negative_scores", (20, 7), 2, 1, 16, causal=False)


def negative_inputs() -> dict[str, torch.Tensor]:
    inp = make_inputs(NEGATIVE, seed=3)
    return {**inp, "q": 5.0 + 0.1 * inp["q"], "k": -5.0 + 0.1 * inp["k"]}


def test_triton_masks_keys_past_the_end_when_scores_are_very_negative(triton_run) -> None:
    want = reference(negative_inputs(), False)
    check(triton_run["results"]["negative_scores"], want, torch.float32, "negative scores")


def _interpreted_main(out: str) -> None:
    """Child process (TRITON_INTERPRET=1): run the public entry with backend="triton"."""
    from rlsys.kernels import attention, attention_triton
    from rlsys.kernels.testing import count_launches

    names = ["_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"]
    launches = count_launches(attention_triton, names)
    attention_triton.OVERRIDE = (attention_triton.Tiles(16, 16), attention_triton.BwdTiles(16, 16))

    def no_fallback(*args, **kwargs):
        raise AssertionError("the SDPA fallback ran instead of Triton")

    attention.grouped_attention = no_fallback  # the torch path (CPU, backend="torch")
    results = {
        case.name: forward_backward(
            make_inputs(case),
            case.causal,
            lambda q, k, v, cu, causal: packed_attention(q, k, v, cu, causal, backend="triton"),
        )
        for case in TRITON_CASES
    }
    results["negative_scores"] = forward_backward(
        negative_inputs(),
        False,
        lambda q, k, v, cu, causal: packed_attention(q, k, v, cu, causal, backend="triton"),
    )
    for label, (fwd, bwd) in UNEQUAL_TILES.items():
        tiles = (attention_triton.Tiles(*fwd), attention_triton.BwdTiles(*bwd))
        for case in TRITON_CASES:
            results[f"{case.name}/{label}"] = forward_backward(
                make_inputs(case),
                case.causal,
                lambda q, k, v, cu, causal, t=tiles: attention_triton.triton_packed_attention(
                    q, k, v, cu, causal, tiles=t
                ),
            )
    torch.save({"results": results, "launches": dict(launches)}, out)


# --------------------------------------------------------------------------- SDPA fallback


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_fallback_equals_sdpa_per_sequence(causal: bool) -> None:
    # independent check of the block-diagonal mask and the GQA head mapping: each sequence
    # alone through SDPA (is_causal), kv heads repeated as in HF's repeat_kv
    case = Case("per_seq", (7, 1, 30, 12), 6, 2, 16)
    inp = make_inputs(case)
    got = packed_attention(inp["q"], inp["k"], inp["v"], inp["cu"], causal, backend="auto")
    cu = inp["cu"].tolist()
    for i in range(len(case.lens)):
        q, k, v = (inp[x][cu[i] : cu[i + 1]].transpose(0, 1) for x in "qkv")
        k, v = (x.repeat_interleave(case.hq // case.hkv, dim=0) for x in (k, v))
        want = F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(0, 1)
        assert_close(got[cu[i] : cu[i + 1]], want, TOL[torch.float32], f"sequence {i}")


def test_fallback_gradients_match_float64() -> None:
    case = Case("grads", (5, 23, 11), 4, 2, 32)
    inp = make_inputs(case)
    got = forward_backward(inp, True, lambda *a: packed_attention(*a, backend="torch"))
    check(got, reference(inp, True), torch.float32, "fallback")


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    inp = make_inputs(Case("cpu", (3, 4), 2, 1, 16))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        packed_attention(inp["q"], inp["k"], inp["v"], inp["cu"], backend="triton")


def test_rejects_bad_arguments() -> None:
    inp = make_inputs(Case("bad", (3, 4), 4, 2, 16))
    q, k, v, cu = inp["q"], inp["k"], inp["v"], inp["cu"]
    with pytest.raises(ValueError, match="divide"):
        packed_attention(q[:, :3], k, v, cu)
    with pytest.raises(ValueError, match="head_dim"):
        packed_attention(q[..., :8], k, v, cu)
    with pytest.raises(ValueError, match="cu_seqlens"):
        packed_attention(q, k, v, cu.float())


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_cuda_matches_reference(dtype: torch.dtype) -> None:
    case = Case("cuda", (1000, 1, 517, 2048, 300), 8, 2, 64, dtype)
    inp = {k: v.cuda() for k, v in make_inputs(case).items()}
    got = forward_backward(inp, True, packed_attention)
    assert got["out"].is_cuda
    check(got, reference(inp, True), dtype, "triton cuda")


if __name__ == "__main__":
    _interpreted_main(sys.argv[1])
