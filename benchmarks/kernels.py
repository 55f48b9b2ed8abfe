"""Fused kernels vs the torch reference (`rlsys/kernels/reference.py`): time and peak memory.

    .venv/bin/python benchmarks/kernels.py            # CPU rows (2 shared cores: ~7 min)
    .venv/bin/python benchmarks/kernels.py --gpu      # CUDA rows: Triton vs reference/Liger/SDPA

Rows (forward + backward each):
- logprob: fused LM head + logprob + entropy (chunked torch on CPU, Triton on GPU) vs the
  naive [T, V]-logits reference, at SmolLM2-135M's head (T=8192, H=576, V=49152, fp32 on
  CPU) and a Qwen-7B-sized head (H=4096, V=151936, bf16; T reduced on CPU, printed).
  On GPU also Liger-Kernel's LigerFusedLinearCrossEntropyLoss (logprob only) if importable,
  the all-Triton kernels, and the same loss with its gradient made in the head's forward
  (`rlsys.kernels.head_loss`, what the trainer runs with `trainer.fused_loss`).
- loss: fused policy loss vs the autograd reference, [64, 4096] tokens.
- attention: packed varlen attention, 8192 tokens in 8 sequences, 9 q / 3 kv heads, D=64
  (SmolLM2-135M): length-grouped SDPA (the CPU fallback and baseline); on GPU the Triton
  kernel and FlexAttention (if it compiles) against it.

CPU peak memory. Each variant runs in a fresh child process (`--child`), so allocator caches
and earlier variants cannot hide or inflate anything. The child builds its inputs, runs
gc and glibc `malloc_trim(0)` (freed heap pages go back to the OS), reads VmRSS as the
baseline, resets the kernel's RSS high-water mark (`echo 5 > /proc/self/clear_refs`), runs
forward + backward once and reads VmHWM: peak = VmHWM - baseline, i.e. every byte the step
touched beyond its inputs, including the returned gradients (the same for both variants).
Where clear_refs is not writable it samples RSS with psutil every 1 ms instead (can miss
spikes shorter than that). Time is the best of `--reps` runs (first run included), wall
clock, with whatever else shares the machine (its load average is recorded).

GPU: torch.cuda.max_memory_allocated above the post-input baseline, time from CUDA events,
median of 10 runs after 3 warm-ups. Before its rows, each Triton kernel sweeps its candidate
tiles for `--tune-s` seconds in all (`rlsys.kernels.tune`: forward tiles, then backward
tiles; a candidate must agree with the defaults' outputs and gradients) and its rows run with
the fastest; every candidate's time, the tiles chosen and the defaults' time are figures.

Results: a table on stdout, figures merged into benchmarks/results/kernels.json (a CPU run
keeps the GPU keys and vice versa), and benchmarks/results/kernels_section.md for
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DATE = "2026-11-22"
CPU_DEVICE = "2-core Xeon CPU (AVX-512/AMX), no GPU"
MIB = 2**20

# (name, T, H, V, dtype): the CPU naive path at H=4096 keeps ~5 fp32 [T, V] buffers plus an
# fp32 copy of W and its gradient (2.5 GB each), so T=1024 (~10 GB) is what fits next to other
# jobs in 24 GB; the GPU runs the full T=8192.
LOGPROB_CPU = [("h576", 8192, 576, 49152, "float32"), ("h4096", 1024, 4096, 151936, "bfloat16")]
LOGPROB_GPU = [("h576", 8192, 576, 49152, "bfloat16"), ("h4096", 8192, 4096, 151936, "bfloat16")]
LOSS_SHAPE = (64, 4096)
ATTN = dict(lens=[1536, 512, 1024, 768, 1280, 1024, 1536, 512], hq=9, hkv=3, d=64)


# --------------------------------------------------------------------------- inputs + steps


def logprob_inputs(t: int, h: int, v: int, dtype: str, device: str = "cpu") -> dict:
    g = torch.Generator(device).manual_seed(0)
    dt = getattr(torch, dtype)
    hidden = torch.randn(t, h, generator=g, device=device, dtype=dt).requires_grad_()
    weight = torch.empty(v, h, device=device, dtype=dt)
    weight.normal_(0, 2.0 / h**0.5, generator=g).requires_grad_()
    targets = torch.randint(0, v, (t,), generator=g, device=device)
    return dict(hidden=hidden, weight=weight, targets=targets)


def logprob_step(variant: str, inp: dict) -> None:
    from rlsys.kernels import fused_logprob_entropy
    from rlsys.kernels.reference import logprob_entropy_ref

    h, w, y = inp["hidden"], inp["weight"], inp["targets"]
    if variant == "naive":
        lp, ent = logprob_entropy_ref(h, w, y)
    elif variant == "fused":
        lp, ent = fused_logprob_entropy(h, w, y)
    elif variant == "triton":  # the all-Triton kernels (GPU; "fused" = auto = hybrid there)
        lp, ent = fused_logprob_entropy(h, w, y, backend="triton")
    elif variant == "fused_loss":  # the same loss, its gradient made in the forward
        from rlsys.kernels.head_loss import fused_head_loss

        loss, _, _ = fused_head_loss(h, w, y, lambda rows, lp, ent: lp.sum() + 0.01 * ent.sum())
        loss.backward()
        return
    elif variant == "liger":  # logprob only: Liger's fused CE has no entropy output
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss = LigerFusedLinearCrossEntropyLoss(reduction="sum")(w, h, y)
        loss.backward()
        return
    else:
        raise ValueError(variant)
    (lp.sum() + 0.01 * ent.sum()).backward()


def loss_inputs(shape: tuple[int, int], device: str = "cpu") -> dict:
    g = torch.Generator(device).manual_seed(0)
    logp = (-3 * torch.rand(shape, generator=g, device=device)).requires_grad_()
    noise = torch.randn(shape, generator=g, device=device)
    return dict(
        logp=logp,
        old_logp=logp.detach() + 0.3 * noise,
        ref_logp=logp.detach() - 0.2 * noise,
        entropy=torch.rand(shape, generator=g, device=device).requires_grad_(),
        advantages=torch.randn(shape[0], generator=g, device=device),
        mask=(torch.rand(shape, generator=g, device=device) > 0.2).float(),
    )


def loss_step(variant: str, inp: dict) -> None:
    from rlsys.kernels import fused_policy_loss
    from rlsys.kernels.reference import policy_loss_ref

    fn = policy_loss_ref if variant == "naive" else fused_policy_loss
    kw = dict(dual_clip=3.0, kl_coef=0.01, entropy_coef=0.001, loss_agg="seq-mean-token-mean")
    fn(**inp, **kw).loss.backward()


def attention_inputs(attn: dict, dtype: str, device: str = "cpu") -> dict:
    g = torch.Generator(device).manual_seed(0)
    n, dt = sum(attn["lens"]), getattr(torch, dtype)
    q = torch.randn(n, attn["hq"], attn["d"], generator=g, device=device, dtype=dt)
    k = torch.randn(n, attn["hkv"], attn["d"], generator=g, device=device, dtype=dt)
    v = torch.randn(n, attn["hkv"], attn["d"], generator=g, device=device, dtype=dt)
    cu = torch.tensor([0, *torch.tensor(attn["lens"]).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    return dict(q=q, k=k, v=v, cu=cu.to(device), lens=attn["lens"])


def attention_step(variant: str, inp: dict) -> None:
    from rlsys.kernels import packed_attention

    q, k, v, cu, lens = inp["q"], inp["k"], inp["v"], inp["cu"], inp["lens"]
    if variant == "sdpa":
        out = packed_attention(q, k, v, cu, backend="torch")
    elif variant == "triton":
        out = packed_attention(q, k, v, cu, backend="triton", max_seqlen=max(lens))
    elif variant == "flex":
        out = _flex_attention(q, k, v, lens)
    else:
        raise ValueError(variant)
    out.float().square().mean().backward()


_FLEX: dict = {}


def _flex_attention(q, k, v, lens):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    n = q.shape[0]
    if "fn" not in _FLEX:
        seq = torch.repeat_interleave(
            torch.arange(len(lens), device=q.device),
            torch.tensor(lens, device=q.device),
        )

        def doc_causal(b, h, qi, ki):
            return (seq[qi] == seq[ki]) & (ki <= qi)

        _FLEX["mask"] = create_block_mask(doc_causal, None, None, n, n, device=q.device)
        _FLEX["fn"] = torch.compile(flex_attention)
    qh, kh, vh = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    out = _FLEX["fn"](qh, kh, vh, block_mask=_FLEX["mask"], enable_gqa=True)
    return out.squeeze(0).transpose(0, 1)


KERNELS = {
    "logprob": (lambda cfg, dev: logprob_inputs(*cfg[1:], device=dev), logprob_step),
    "loss": (lambda cfg, dev: loss_inputs(tuple(cfg), dev), loss_step),
    "attention": (lambda cfg, dev: attention_inputs(cfg[0], cfg[1], dev), attention_step),
}


# --------------------------------------------------------------------------- CPU measurement


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _Sampler(threading.Thread):
    """Fallback peak-RSS probe: sample every 1 ms."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self.stop = 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.001)


def cpu_child(kernel: str, variant: str, cfg: list, reps: int) -> dict:
    """Runs in a fresh process: peak RSS above the input baseline, best-of-reps time."""
    # the loss is elementwise work on 1 MiB tensors: a second thread gains nothing there, and
    # OpenMP barriers on the shared 2-core machine swung 2-thread times by 10x (1 thread:
    # +-30%); the GEMM-bound logprob and attention rows use both cores
    torch.set_num_threads(1 if kernel == "loss" else os.cpu_count() or 1)
    make, step = KERNELS[kernel]
    step(variant, make(_tiny(kernel, cfg), "cpu"))  # lazy inits (autograd threads, oneDNN)
    inp = make(cfg, "cpu")
    libc = ctypes.CDLL("libc.so.6")
    times, peak, method = [], 0, ""
    for rep in range(reps):
        for x in inp.values():
            if isinstance(x, torch.Tensor):
                x.grad = None
        gc.collect()
        libc.malloc_trim(0)
        base = _rss()
        sampler = None
        if rep == 0:
            if _reset_hwm():
                method = "clear_refs+VmHWM"
            else:
                method, sampler = "psutil-1ms", _Sampler()
                sampler.start()
        t0 = time.perf_counter()
        step(variant, inp)
        times.append(time.perf_counter() - t0)
        if rep == 0:
            if sampler is not None:
                sampler.stop.set()
                sampler.join()
                peak = max(sampler.peak, _rss()) - base
            else:
                peak = _hwm() - base
    return dict(time_s=min(times), peak_bytes=peak, method=method)


def _tiny(kernel: str, cfg: list) -> list:
    """A few-KiB config of the same kernel and dtype, for the warm-up call."""
    if kernel == "logprob":
        return [cfg[0], 8, 16, 64, cfg[-1]]
    if kernel == "loss":
        return [2, 8]
    return [dict(cfg[0], lens=[3, 5]), cfg[1]]


def run_child(kernel: str, variant: str, cfg: list, reps: int) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps([kernel, variant, cfg, reps])]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{kernel}/{variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cpu_rows(reps: int) -> tuple[list[list], dict]:
    rows, fig = [], {}
    for name, t, h, v, dt in LOGPROB_CPU:
        cfg = [name, t, h, v, dt]
        n = reps if name == "h576" else 1  # the H=4096 row takes minutes per run on 2 cores
        naive = run_child("logprob", "naive", cfg, n)
        fused = run_child("logprob", "fused", cfg, n)
        key = "logprob_cpu" if name == "h576" else f"logprob_cpu_{name}"
        grads = (t + v) * h * getattr(torch, dt).itemsize  # dh + dW, returned by both
        fig |= {
            f"{key}_shape": f"T={t} H={h} V={v} {dt}",
            f"{key}_naive_peak_mib": round(naive["peak_bytes"] / MIB),
            f"{key}_fused_peak_mib": round(fused["peak_bytes"] / MIB),
            f"{key}_grads_mib": round(grads / MIB),
            f"{key}_mem_ratio": round(fused["peak_bytes"] / naive["peak_bytes"], 4),
            f"{key}_naive_s": round(naive["time_s"], 2),
            f"{key}_fused_s": round(fused["time_s"], 2),
            f"{key}_speedup": round(naive["time_s"] / fused["time_s"], 3),
        }
        fig["memory_method"] = fused["method"]
        rows.append([f"logprob {name}", f"T={t} {dt}", naive, fused])
    # ~0.1 s per run, and the shared machine's load swings single runs by 10x: best of 10x
    naive = run_child("loss", "naive", list(LOSS_SHAPE), 10 * reps)
    fused = run_child("loss", "fused", list(LOSS_SHAPE), 10 * reps)
    fig |= {
        "loss_cpu_naive_ms": round(1e3 * naive["time_s"], 2),
        "loss_cpu_fused_ms": round(1e3 * fused["time_s"], 2),
        "loss_cpu_naive_peak_mib": round(naive["peak_bytes"] / MIB, 1),
        "loss_cpu_fused_peak_mib": round(fused["peak_bytes"] / MIB, 1),
    }
    rows.append(["loss", f"{LOSS_SHAPE} fp32", naive, fused])
    sdpa = run_child("attention", "sdpa", [ATTN, "float32"], reps)
    fig |= {
        "attention_cpu_sdpa_s": round(sdpa["time_s"], 2),
        "attention_cpu_sdpa_peak_mib": round(sdpa["peak_bytes"] / MIB),
    }
    rows.append(["attention (SDPA fallback)", f"N={sum(ATTN['lens'])} fp32", sdpa, None])
    return rows, fig


# --------------------------------------------------------------------------- GPU measurement


def gpu_measure(kernel: str, variant: str, cfg: list) -> dict:
    make, step = KERNELS[kernel]
    inp = make(cfg, "cuda")
    for _ in range(3):
        step(variant, inp)
    torch.cuda.synchronize()
    times = []
    for rep in range(10):
        for x in inp.values():
            if isinstance(x, torch.Tensor):
                x.grad = None
        torch.cuda.synchronize()
        if rep == 0:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(variant, inp)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
        if rep == 0:
            peak = torch.cuda.max_memory_allocated() - base
    del inp
    torch.cuda.empty_cache()
    return dict(time_s=sorted(times)[len(times) // 2], peak_bytes=peak, method="cuda")


def _optional(kernel: str, variant: str, cfg: list) -> dict | None:
    try:
        return gpu_measure(kernel, variant, cfg)
    except Exception as exc:  # missing package or compile failure: the row stays open
        print(f"  {kernel}/{variant} skipped: {type(exc).__name__}: {str(exc)[:200]}")
        return None


def sweep_figures(prefix: str, fwd, bwd) -> dict:
    """Flat figures of a (forward, backward) tile sweep: ms per candidate, why one was not
    timed, and the tiles chosen."""
    from rlsys.kernels.tune import tiles_name

    fig = {f"{prefix}_tiles": f"{tiles_name(fwd.best)} / {tiles_name(bwd.best)}"}
    for part, sw in (("fwd", fwd), ("step", bwd)):
        fig |= {f"{prefix}_{part}_{n}_ms": round(ms, 3) for n, ms in sw.ms.items()}
        fig |= {f"{prefix}_{part}_{n}_rejected": why for n, why in sw.rejected.items()}
    return fig


def backends_agree(cfg: list, tiles: tuple) -> bool | str:
    """True when the Triton kernels' (with `tiles`) logprob, entropy and gradients agree with
    the hybrid backend's to 2e-2 of their scale, else why not."""
    from rlsys.kernels import fused_logprob_entropy, logprob_triton
    from rlsys.kernels.tune import disagreement, override

    inp = logprob_inputs(*cfg[1:], device="cuda")
    outs = []
    for backend in ("hybrid", "triton"):
        h, w = (inp[k].detach().clone().requires_grad_() for k in ("hidden", "weight"))
        with override(logprob_triton, tiles):
            lp, ent = fused_logprob_entropy(h, w, inp["targets"], backend=backend)
        (lp.sum() + 0.01 * ent.sum()).backward()
        outs.append([lp.detach(), ent.detach(), h.grad, w.grad])
    why = disagreement(outs[1], outs[0], 2e-2)
    return True if why is None else why


def _partial(fig: dict) -> None:
    """The GPU figures so far (a run cut short by its time limit keeps them)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "kernels_gpu_partial.json").write_text(json.dumps(fig, indent=2) + "\n")


def gpu_rows(tune_s: float) -> tuple[list[list], dict]:
    """The CUDA rows. With tune_s > 0 each Triton kernel first sweeps its candidate tiles
    (`rlsys.kernels.tune`; 35% of tune_s per logprob shape, 30% for attention) and its
    timed row runs with the fastest; the default tiles' time is kept beside it."""
    import triton

    from rlsys.kernels import attention_triton, logprob_triton
    from rlsys.kernels.tune import override, tune_attention, tune_logprob

    rows, fig = [], {"gpu_device": torch.cuda.get_device_name()}
    fig |= {"gpu_torch": torch.__version__, "gpu_triton": triton.__version__}

    def tuned_measure(kernel, variant, cfg, module, tiles, default, key) -> dict:
        """The row's time with `tiles`, and the default tiles' time beside it."""
        base = gpu_measure(kernel, variant, cfg)
        fig[f"{key}_default_tiles_ms"] = round(1e3 * base["time_s"], 3)
        if tiles == default:
            return base
        with override(module, tiles):
            return gpu_measure(kernel, variant, cfg)

    for name, t, h, v, dt in LOGPROB_GPU:
        cfg = [name, t, h, v, dt]
        key = "logprob_gpu" if name == "h576" else f"logprob_gpu_{name}"
        inp = logprob_inputs(t, h, v, dt, "cuda")
        tiles = default = logprob_triton.default_tiles(inp["hidden"].dtype, inp["weight"].dtype)
        if tune_s > 0:
            deadline = time.monotonic() + 0.35 * tune_s
            sweeps = tune_logprob(inp["hidden"], inp["weight"], inp["targets"], deadline)
            fig |= sweep_figures(f"{key}_tune", *sweeps)
            tiles = tuple(sw.best for sw in sweeps)
        del inp
        torch.cuda.empty_cache()
        naive = gpu_measure("logprob", "naive", cfg)
        fused = gpu_measure("logprob", "fused", cfg)  # auto: the hybrid path on a GPU
        floss = _optional("logprob", "fused_loss", cfg)  # rlsys.kernels.head_loss
        liger = _optional("logprob", "liger", cfg)
        try:
            tri = tuned_measure(
                "logprob", "triton", cfg, logprob_triton, tiles, default, f"{key}_triton"
            )
        except Exception as exc:  # a compile failure leaves the Triton row open, not the rest
            print(f"  logprob/triton failed: {type(exc).__name__}: {str(exc)[:200]}")
            tri = None
        from rlsys.kernels.logprob import AUTO_ON_GPU
        from rlsys.kernels.logprob_hybrid import OUT_DTYPE_GEMMS

        fig |= {
            f"{key}_backend": AUTO_ON_GPU,
            f"{key}_speedup": round(naive["time_s"] / fused["time_s"], 3),
            f"{key}_mem_ratio": round(fused["peak_bytes"] / naive["peak_bytes"], 4),
            f"{key}_fused_ms": round(1e3 * fused["time_s"], 2),
            f"{key}_out_dtype_gemms": str(OUT_DTYPE_GEMMS),
        }
        rows.append([f"logprob {name} ({AUTO_ON_GPU})", f"T={t} {dt}", naive, fused])
        if liger is not None:
            lkey = "logprob_over_liger" if name == "h576" else f"logprob_over_liger_{name}"
            fig[lkey] = round(liger["time_s"] / fused["time_s"], 3)
            rows.append([f"  liger {name} (lp only)", f"T={t} {dt}", naive, liger])
        if floss is not None:
            fig |= {
                f"{key}_fused_loss_ms": round(1e3 * floss["time_s"], 2),
                f"{key}_fused_loss_speedup": round(naive["time_s"] / floss["time_s"], 3),
                f"{key}_fused_loss_mem_ratio": round(floss["peak_bytes"] / naive["peak_bytes"], 4),
            }
            if liger is not None:
                lkey = "logprob_loss_over_liger" + ("" if name == "h576" else f"_{name}")
                fig[lkey] = round(liger["time_s"] / floss["time_s"], 3)
            rows.append([f"  fused loss {name}", f"T={t} {dt}", naive, floss])
        if tri is not None:
            fig |= {
                f"{key}_triton_speedup": round(naive["time_s"] / tri["time_s"], 3),
                f"{key}_triton_ms": round(1e3 * tri["time_s"], 2),
                f"{key}_triton_mem_ratio": round(tri["peak_bytes"] / naive["peak_bytes"], 4),
                f"{key}_triton_agrees": backends_agree(cfg, tiles),
            }
            if liger is not None:
                fig[f"{key}_triton_over_liger"] = round(liger["time_s"] / tri["time_s"], 3)
            rows.append([f"  triton {name}", f"T={t} {dt}", naive, tri])
        _partial(fig)
    naive = gpu_measure("loss", "naive", list(LOSS_SHAPE))
    fused = gpu_measure("loss", "fused", list(LOSS_SHAPE))
    fig["loss_gpu_speedup"] = round(naive["time_s"] / fused["time_s"], 3)
    rows.append(["loss", f"{LOSS_SHAPE} fp32", naive, fused])
    cfg = [ATTN, "bfloat16"]
    tiles = default = attention_triton.default_tiles(ATTN["d"])
    if tune_s > 0:
        inp = attention_inputs(ATTN, "bfloat16", "cuda")
        deadline = time.monotonic() + 0.3 * tune_s
        sweeps = tune_attention(
            inp["q"], inp["k"], inp["v"], inp["cu"], max(ATTN["lens"]), deadline
        )
        fig |= sweep_figures("attention_gpu_tune", *sweeps)
        tiles = tuple(sw.best for sw in sweeps)
        del inp
    sdpa = gpu_measure("attention", "sdpa", cfg)
    tri = tuned_measure(
        "attention", "triton", cfg, attention_triton, tiles, default, "attention_gpu"
    )
    fig["attention_over_sdpa"] = round(sdpa["time_s"] / tri["time_s"], 3)
    fig["attention_gpu_triton_ms"] = round(1e3 * tri["time_s"], 3)
    _partial(fig)
    rows.append(["attention triton", f"N={sum(ATTN['lens'])} bf16", sdpa, tri])
    flex = _optional("attention", "flex", cfg)
    if flex is not None:
        fig["attention_over_flex"] = round(flex["time_s"] / tri["time_s"], 3)
        rows.append(["  attention flex", f"N={sum(ATTN['lens'])} bf16", sdpa, flex])
    return rows, fig


# --------------------------------------------------------------------------- report


def _time(seconds: float) -> str:
    return f"{seconds:.3f} s" if seconds >= 1 else f"{1e3 * seconds:.3g} ms"


def table(rows: list[list], base_name: str) -> str:
    head = f"| kernel | shape | {base_name} time | {base_name} peak | fused time | fused peak | time x | mem x |"
    lines = [head, "|" + " --- |" * 8]
    for name, shape, base, new in rows:
        cells = [name, shape, _time(base["time_s"]), f"{base['peak_bytes'] / MIB:.0f} MiB"]
        if new is None:
            cells += ["-", "-", "-", "-"]
        else:
            cells += [
                _time(new["time_s"]),
                f"{new['peak_bytes'] / MIB:.0f} MiB",
                f"{base['time_s'] / new['time_s']:.2f}",
                f"{new['peak_bytes'] / max(base['peak_bytes'], 1):.3f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def section(fig: dict, cpu_table: str | None, gpu_table: str | None) -> str:
    keys = ("logprob_gpu_speedup", "logprob_over_liger", "attention_over_sdpa")
    measured = [f"{k} = {fig[k]}" for k in keys if fig.get(k) is not None]
    missing = [k for k in keys if fig.get(k) is None]
    parts = [
        "## Fused kernels (issue 9)",
        "",
        f"Date {DATE}. Device: {CPU_DEVICE}. Command: `.venv/bin/python benchmarks/kernels.py`",
        f"(figures in `benchmarks/results/kernels.json`; load average during the run "
        f"{fig.get('load_avg', '?')}, so times are shared-machine times).",
        "Forward + backward per row; peak = RSS high-water mark above the inputs in a fresh",
        "process (method in the script docstring). Time x = reference / fused (>1: fused faster);",
        "mem x = fused / reference peak. Three runs on 2026-11-22 gave the same peaks to 3% but",
        "times up to 4x apart (logprob h576 reference 11.7 / 32.5 / 49.3 s, fused 23.2 / 23.4 /",
        "32.9 s): other jobs share the 2 cores, so read the times as rough.",
        "",
    ]
    if cpu_table:
        parts += [cpu_table, ""]
    parts += [
        f"- **logprob_cpu_mem_ratio = {fig.get('logprob_cpu_mem_ratio')}** "
        f"({fig.get('logprob_cpu_shape')}; target <= 0.15): fused "
        f"{fig.get('logprob_cpu_fused_peak_mib')} MiB vs naive "
        f"{fig.get('logprob_cpu_naive_peak_mib')} MiB.",
        f"- H=4096, V=151936 on CPU ran at {fig.get('logprob_cpu_h4096_shape')}, not T=8192: "
        "one fp32 [T, V] logits copy is 4.6 GiB at T=8192 and the reference holds several plus "
        "an fp32 copy of W, more than the 24 GiB machine has free. Mem ratio "
        f"{fig.get('logprob_cpu_h4096_mem_ratio')}; both peaks include the "
        f"{fig.get('logprob_cpu_h4096_grads_mib')} MiB of returned bf16 gradients, which "
        "dominate the fused peak at this small T.",
        "- loss: fused torch path (analytic gradient stored in forward) vs autograd; at [64, "
        "4096] both are milliseconds and MiB, noise next to the model.",
        "- attention on CPU: only the SDPA fallback runs (the Triton kernel runs on CPU only in "
        "the interpreter, in tests); the row is its cost, the GPU run compares against it.",
        "- GPU: "
        + "; ".join(measured or ["not measured"])
        + "."
        + (f" Open: {', '.join(missing)} (need `--gpu` on a CUDA machine)." if missing else ""),
    ]
    alt = [
        f"{k[: -len('_triton_speedup')]} {v}x the reference"
        + (f", {fig[o]}x Liger" if (o := k.replace("_speedup", "_over_liger")) in fig else "")
        + f", agrees with the default: {fig.get(k.replace('_speedup', '_agrees'))}"
        for k, v in fig.items()
        if k.endswith("_triton_speedup")
    ]
    if alt:
        parts.append(
            f"- The rows above run `auto` ({fig.get('logprob_gpu_backend')} on a GPU); the "
            'all-Triton logprob kernels (`backend="triton"`, tiles from the sweep): '
            + "; ".join(alt)
            + "."
        )
    tiles = [f"{k[: -len('_tune_tiles')]} {v}" for k, v in fig.items() if k.endswith("_tune_tiles")]
    if tiles:
        parts.append(
            "- GPU tiles (forward / backward) picked by the sweep (`rlsys.kernels.tune`, every "
            "candidate's time in the JSON): " + "; ".join(tiles) + ". The timed rows use them; "
            "`*_default_tiles_ms` is the shipped defaults' time."
        )
    if gpu_table:
        parts += [
            "",
            f"GPU rows: {fig.get('gpu_device')}, {fig.get('gpu_date')}, command "
            "`python benchmarks/kernels.py --gpu` (CUDA events, median of 10; peak = "
            "max_memory_allocated above the inputs).",
            "",
            gpu_table,
        ]
    return "\n".join(parts) + "\n"


def _is_gpu_key(key: str) -> bool:
    return "gpu" in key or "_over_" in key


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpu", action="store_true", help="measure the CUDA rows instead")
    ap.add_argument("--reps", type=int, default=2, help="CPU timing repetitions per variant")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, print only (CI check)")
    ap.add_argument("--tune-s", type=float, default=150.0,
                    help="GPU: seconds for the tile sweeps before the timed rows (0: defaults)")  # fmt: skip
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(cpu_child(*json.loads(args.child))))
        return
    if args.smoke:
        global LOGPROB_CPU, LOGPROB_GPU, LOSS_SHAPE, ATTN
        LOGPROB_CPU = LOGPROB_GPU = [("h576", 256, 64, 1000, "float32")]
        LOSS_SHAPE, ATTN = (4, 64), dict(lens=[30, 50], hq=4, hkv=2, d=16)
        rows, _ = gpu_rows(min(args.tune_s, 20.0)) if args.gpu else cpu_rows(1)
        print(table(rows, "reference"))
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "kernels.json"
    old = json.loads(out.read_text()) if out.exists() else {}
    # a run replaces its own side's figures and keeps the other side's
    fig = {k: v for k, v in old.items() if _is_gpu_key(k) != args.gpu}
    fig.setdefault("logprob_gpu_speedup", None)
    fig.setdefault("logprob_over_liger", None)
    fig.setdefault("attention_over_sdpa", None)
    tables = {"cpu": RESULTS / "kernels_cpu_table.md", "gpu": RESULTS / "kernels_gpu_table.md"}
    kind = "gpu" if args.gpu else "cpu"
    rows, new = gpu_rows(args.tune_s) if args.gpu else cpu_rows(args.reps)
    text = table(rows, "reference")
    print(text)
    tables[kind].write_text(text + "\n")
    fig |= new
    if args.gpu:
        fig["gpu_date"] = time.strftime("%Y-%m-%d")
    else:
        fig["load_avg"] = " / ".join(f"{x:.1f}" for x in os.getloadavg())
        fig["machine"] = f"{CPU_DEVICE}; torch {torch.__version__}"
        fig["date"] = DATE
        fig["command"] = ".venv/bin/python benchmarks/kernels.py"
    out.write_text(json.dumps(fig, indent=2) + "\n")
    if args.gpu:  # the GPU figures alone, as the issue names them
        gpu = {k: v for k, v in fig.items() if _is_gpu_key(k)}
        gpu["device"] = fig["gpu_device"]
        gpu["command"] = "python benchmarks/kernels.py --gpu"
        (RESULTS / "kernels_gpu.json").write_text(json.dumps(gpu, indent=2) + "\n")
    cpu_table, gpu_table = (p.read_text().strip() if p.exists() else None for p in tables.values())
    (RESULTS / "kernels_section.md").write_text(section(fig, cpu_table, gpu_table))
    print(f"wrote {out} and {RESULTS / 'kernels_section.md'}")


if __name__ == "__main__":
    main()
