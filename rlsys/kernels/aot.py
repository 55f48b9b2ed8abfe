"""Compile every Triton kernel for a CUDA GPU on a machine without one (ahead of time).

The interpreter (`TRITON_INTERPRET=1`, what the CPU tests use) runs the kernels' Python; it
does not type-check them the way the compiler does, lay them out, or allocate registers and
shared memory. This module runs the real launchers (`triton_logprob_entropy`,
`TritonPolicyLoss`, `triton_packed_attention`, forward and backward) on CPU tensors with each
`@triton.jit` kernel replaced by a recorder, so every launch's real arguments, constexprs
and `num_warps` are captured without running anything, then compiles each distinct launch
with `triton.compile` for `GPUTarget("cuda", arch, 32)` through ptxas (shipped in the
triton wheel) and reads the cubin's resource usage with `cuobjdump`:

- `regs` per thread (ptxas caps at 255), `shared` bytes per block (the launch fails above
  the device's opt-in limit: 227 KiB on sm_90, 163 KiB on sm_80), `local` bytes per thread
  (register spills and stack arrays: slow, never wrong).

Pointer arguments are compiled as 16-byte aligned (what torch's allocator gives and what
Triton specialises on at run time), so the code is the code a GPU launch would build.

    python -m rlsys.kernels.aot [--arch 90] [--json] [--candidates]

`--candidates` compiles the tiles `rlsys.kernels.tune` times on a GPU (each module's
FWD_CANDIDATES / BWD_CANDIDATES, bf16, head_dim 64 / hidden 576) instead of the trainer's.

Must run without TRITON_INTERPRET (the kernels must be `JITFunction`s, not interpreted).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

# Per-block shared memory a kernel may opt into, by compute capability (CUDA guide, table
# "Technical Specifications per Compute Capability").
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
_TORCH_TO_TRITON = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float64: "fp64",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "i1",
}


@dataclass
class Launch:
    """One recorded launch: the kernel, its arguments by name, and the launch options."""

    kernel: Any  # triton.runtime.jit.JITFunction
    args: dict[str, Any]
    options: dict[str, Any]

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    def key(self) -> tuple:
        """What the compiled binary depends on: the signature, constexprs and options."""
        sig, consts = self.signature()
        return (self.name, tuple(sorted(sig.items())), tuple(sorted(consts.items())),
                tuple(sorted(self.options.items())))  # fmt: skip

    def signature(self) -> tuple[dict[str, str], dict[str, Any]]:
        """Triton's type string for every argument ("constexpr" for compile-time ones) and
        the constexpr values, as the JIT would specialise this launch."""
        sig: dict[str, str] = {}
        consts: dict[str, Any] = {}
        for p in self.kernel.params:
            v = self.args[p.name]
            if p.is_constexpr:
                sig[p.name], consts[p.name] = "constexpr", v
            elif isinstance(v, torch.Tensor):
                sig[p.name] = "*" + _TORCH_TO_TRITON[v.dtype]
            elif isinstance(v, bool):
                sig[p.name] = "i1"
            elif isinstance(v, int):
                sig[p.name] = "i32" if -(2**31) <= v < 2**31 else "i64"
            elif isinstance(v, float):
                sig[p.name] = "fp32"
            else:
                raise TypeError(f"{self.name}: argument {p.name}={v!r} has no Triton type")
        return sig, consts


@contextmanager
def recording() -> Iterator[list[Launch]]:
    """Replace every rlsys Triton kernel by a recorder for the duration; yields the list of
    launches made meanwhile. The launchers' device checks are lifted so CPU tensors pass."""
    from rlsys.kernels import attention_triton, logprob_hybrid, logprob_triton, loss_triton

    modules = (logprob_triton, logprob_hybrid, loss_triton, attention_triton)
    launches: list[Launch] = []
    saved: list[tuple[object, str, object]] = []

    def recorder(kernel):
        class _Grid:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    names = [p.name for p in kernel.params]
                    by_name = dict(zip(names, args, strict=False)) | {
                        k: v for k, v in kwargs.items() if k in names
                    }
                    opts = {k: v for k, v in kwargs.items() if k not in names}
                    launches.append(Launch(kernel, by_name, opts))

                return launch

        return _Grid()

    from triton.runtime.jit import JITFunction

    for mod in modules:
        for attr, val in list(vars(mod).items()):
            if isinstance(val, JITFunction) and attr.endswith("_kernel"):
                saved.append((mod, attr, val))
                setattr(mod, attr, recorder(val))
        if hasattr(mod, "check_launchable"):
            saved.append((mod, "check_launchable", mod.check_launchable))
            mod.check_launchable = lambda *a, **k: None
    try:
        yield launches
    finally:
        for mod, attr, val in saved:
            setattr(mod, attr, val)


def trainer_launches() -> list[Launch]:
    """The launches of one forward + backward of each kernel at the shapes and dtypes the
    trainer uses: logprob/entropy with fp32, bf16 and mixed (bf16 hidden, fp32 head) inputs
    (SmolLM2-135M's H=576 and a 7B-class H=4096), and the hybrid backend's row kernels (bf16,
    fp32); the policy loss with and without reference/entropy/dual clip;
    packed attention, causal, bf16 and fp16, head_dim 64 and 128, GQA."""
    from rlsys.kernels.attention_triton import triton_packed_attention
    from rlsys.kernels.logprob_hybrid import hybrid_logprob_entropy
    from rlsys.kernels.logprob_triton import triton_logprob_entropy
    from rlsys.kernels.loss_triton import TritonPolicyLoss

    def backward(*outs: torch.Tensor) -> None:
        torch.autograd.backward([o for o in outs if o.requires_grad],
                                [torch.ones_like(o) for o in outs if o.requires_grad])  # fmt: skip

    with recording() as launches:
        bf16, fp32 = torch.bfloat16, torch.float32
        for hid, hdt, wdt in (
            (576, fp32, fp32),
            (576, bf16, bf16),
            (4096, bf16, bf16),
            (576, bf16, fp32),
        ):
            h = torch.randn(40, hid, dtype=hdt, requires_grad=True)
            w = torch.randn(300, hid, dtype=wdt, requires_grad=True)
            backward(*triton_logprob_entropy(h, w, torch.randint(0, 300, (40,))))
        for dt in (bf16, fp32):  # the hybrid backend's row kernels
            h = torch.randn(40, 576, dtype=dt, requires_grad=True)
            w = torch.randn(300, 576, dtype=dt, requires_grad=True)
            backward(*hybrid_logprob_entropy(h, w, torch.randint(0, 300, (40,))))
        for ref, ent, dual in ((True, True, 3.0), (False, False, None)):
            lp = torch.randn(4, 16, requires_grad=True)
            e = torch.rand(4, 16, requires_grad=True) if ent else None
            consts = (0.2, 0.28, dual, 0.01, 0.001)
            r = torch.randn(4, 16) if ref else None
            mask, wt = torch.ones(4, 16), torch.full((4, 16), 1 / 64)
            loss, _, _ = TritonPolicyLoss.apply(lp, e, torch.randn(4, 16), torch.randn(4), r,
                                                mask, wt, consts)  # fmt: skip
            backward(loss)
        for d, hq, hkv, dt in ((64, 9, 3, torch.bfloat16), (128, 8, 2, torch.float16)):
            q = torch.randn(30, hq, d, dtype=dt, requires_grad=True)
            k = torch.randn(30, hkv, d, dtype=dt, requires_grad=True)
            v = torch.randn(30, hkv, d, dtype=dt, requires_grad=True)
            cu = torch.tensor([0, 12, 30], dtype=torch.int32)
            backward(triton_packed_attention(q, k, v, cu, causal=True))
    return launches


def candidate_launches() -> list[Launch]:
    """The launches of one forward + backward per candidate tile of the logprob (bf16, H=576)
    and attention (bf16, D=64, GQA 9/3) kernels, under `rlsys.kernels.tune.override`: each
    forward candidate with the default backward tiles and each backward candidate with the
    default forward tiles."""
    from rlsys.kernels import attention_triton as at
    from rlsys.kernels import logprob_triton as lt
    from rlsys.kernels.tune import override

    bf16 = torch.bfloat16
    with recording() as launches:
        fwd0, bwd0 = lt.default_tiles(bf16, bf16)
        for tiles in [(c, bwd0) for c in lt.FWD_CANDIDATES] + [
            (fwd0, c) for c in lt.BWD_CANDIDATES
        ]:
            h = torch.randn(40, 576, dtype=bf16, requires_grad=True)
            w = torch.randn(300, 576, dtype=bf16, requires_grad=True)
            with override(lt, tiles):
                lp, ent = lt.triton_logprob_entropy(h, w, torch.randint(0, 300, (40,)))
                (lp.sum() + ent.sum()).backward()
        fwd0, bwd0 = at.default_tiles(64)
        for tiles in [(c, bwd0) for c in at.FWD_CANDIDATES] + [
            (fwd0, c) for c in at.BWD_CANDIDATES
        ]:
            q = torch.randn(30, 9, 64, dtype=bf16, requires_grad=True)
            k = torch.randn(30, 3, 64, dtype=bf16, requires_grad=True)
            v = torch.randn(30, 3, 64, dtype=bf16, requires_grad=True)
            with override(at, tiles):
                cu = torch.tensor([0, 12, 30], dtype=torch.int32)
                at.triton_packed_attention(q, k, v, cu, causal=True).sum().backward()
    return launches


def compile_launch(launch: Launch, arch: int) -> dict[str, Any]:
    """Compile one launch for sm_`arch`; its resource usage (raises on a compile error)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, consts = launch.signature()
    ptrs = [i for i, t in enumerate(sig.values()) if t.startswith("*")]
    attrs = {(i,): [["tt.divisibility", 16]] for i in ptrs}
    src = ASTSource(fn=launch.kernel, signature=sig, constexprs=consts, attrs=attrs)
    opts = {k: v for k, v in launch.options.items() if k in ("num_warps", "num_stages")}
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
    usage = cubin_usage(compiled.asm["cubin"])
    usage["shared"] = max(usage["shared"], int(compiled.metadata.shared))  # + dynamic
    return usage


def cubin_usage(cubin: bytes) -> dict[str, int]:
    """REG / SHARED / LOCAL of the (one) function in a cubin, via the wheel's cuobjdump."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout  # fmt: skip
    fields = dict(re.findall(r"\b(REG|SHARED|LOCAL|STACK):(\d+)", out))
    return {
        "regs": int(fields["REG"]),
        "shared": int(fields["SHARED"]),
        "local": int(fields["LOCAL"]) + int(fields.get("STACK", 0)),
    }


def describe(launch: Launch) -> str:
    """A short label: kernel name, the dtypes of its first two pointer arguments, the
    constexprs and the warps."""
    sig, consts = launch.signature()
    ptrs = [f"{n}={t[1:]}" for n, t in sig.items() if t.startswith("*")][:2]
    cs = ",".join(f"{k}={v}" for k, v in consts.items() if k != "UPCAST")
    return f"{launch.name}[{','.join(ptrs)}; {cs}; warps={launch.options.get('num_warps', 4)}]"


def report(arch: int, launches: list[Launch] | None = None) -> list[dict[str, Any]]:
    """Compile every distinct launch (default: the trainer's) for sm_`arch`: one row per
    binary."""
    rows, seen = [], set()
    for launch in trainer_launches() if launches is None else launches:
        if launch.key() in seen:
            continue
        seen.add(launch.key())
        label = describe(launch)
        try:
            row = {"kernel": label, "ok": True, **compile_launch(launch, arch)}
        except Exception as e:  # noqa: BLE001 - a compile error is the finding
            row = {"kernel": label, "ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90, 80")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    ap.add_argument("--candidates", action="store_true", help="the tuner's candidate tiles")
    args = ap.parse_args(argv)
    from rlsys.kernels.backend import interpreting

    if interpreting():
        print("error: unset TRITON_INTERPRET (the kernels must compile, not interpret)",
              file=sys.stderr)  # fmt: skip
        return 2
    rows = report(args.arch, candidate_launches() if args.candidates else None)
    if args.json:
        print(json.dumps(rows))
    else:
        limit = SHARED_LIMIT.get(args.arch)
        print(f"| kernel (sm_{args.arch}) | regs | shared B (limit {limit}) | local B |")
        print("| --- | ---: | ---: | ---: |")
        for r in rows:
            if r["ok"]:
                print(f"| {r['kernel']} | {r['regs']} | {r['shared']} | {r['local']} |")
            else:
                print(f"| {r['kernel']} | FAILED: {r['error'][:300]} | | |")
    return 0 if all(r["ok"] for r in rows) else 1  # spills are reported, not failures


if __name__ == "__main__":
    sys.exit(main())
