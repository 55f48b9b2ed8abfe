"""Native rollout engine on the tiny Llama (fp32): exactness against transformers, continuous
batching, abort/continue, weight updates, seeds, stops, and bad input."""

from __future__ import annotations

import pytest
import torch

from rlsys.rollout.engine import GenerationRequest, RolloutEngine, SamplingParams
from rlsys.rollout.native import NativeEngine
from rlsys.rollout.sampling import RowParams, sample
from rlsys.rollout.testing import reference_greedy

TEXTS = [
    "What is 3 + 4?",
    "What is 12 * 7? The answer is",
    "You are a helpful assistant. Answer with a number. What is 99 - 1?",
    "user",
    "What is 5 - 5? The answer is 0. What is 8 + 1?",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small ops, one at a time: with 2 OpenMP threads on a shared 2-core machine (load ~5)
    every small op waits for a descheduled thread (the SmolLM file: 7.7 min with 2 threads,
    83 s with 1). HF and native run in the same process, so comparisons stay like for like."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def hf(tiny_model_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer) -> list[list[int]]:
    return [tiny_tokenizer(t)["input_ids"] for t in TEXTS]


def make_engine(hf, tok=None, **cfg) -> NativeEngine:
    cfg.setdefault("max_batch", 16)
    cfg.setdefault("max_seq_len", 128)
    return NativeEngine.from_hf_model(hf, tok, NativeEngine.Config(**cfg))


@pytest.fixture()
def engine(hf, tiny_tokenizer) -> NativeEngine:
    return make_engine(hf, tiny_tokenizer)


def greedy(max_new: int, **kw) -> SamplingParams:
    return SamplingParams(greedy=True, max_new_tokens=max_new, **kw)


@torch.no_grad()
def hf_logprobs(hf, prompt: list[int], tokens: list[int], temperature: float) -> torch.Tensor:
    logits = hf(torch.tensor([prompt + tokens])).logits[0].float()
    lp = torch.log_softmax(logits[len(prompt) - 1 : -1] / temperature, dim=-1)
    return lp.gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)


def test_is_a_rollout_engine(engine):
    assert isinstance(engine, RolloutEngine)


def test_greedy_matches_hf_generate(hf, engine, prompts):
    eos = sorted(engine.eos_token_ids)
    reqs = [GenerationRequest(f"r{i}", p, greedy(12 + 4 * i)) for i, p in enumerate(prompts)]
    for req, res in zip(reqs, engine.generate(reqs), strict=True):
        want = reference_greedy(hf, req.prompt_ids, req.params.max_new_tokens, eos)
        assert res.error is None and res.completions[0].token_ids == want
        assert res.completions[0].finish_reason == ("stop" if want[-1] in eos else "length")


def test_logprobs_match_hf_forward(hf, engine, prompts):
    params = SamplingParams(temperature=0.7, top_p=0.9, top_k=50, seed=1, max_new_tokens=24)
    reqs = [GenerationRequest(f"r{i}", p, params, n=2) for i, p in enumerate(prompts)]
    worst = 0.0
    for req, res in zip(reqs, engine.generate(reqs), strict=True):
        for c in res.completions:
            ref = hf_logprobs(hf, req.prompt_ids, c.token_ids, 0.7)
            worst = max(worst, (ref - torch.tensor(c.logprobs)).abs().max().item())
            assert len(c.logprobs) == len(c.versions) == len(c.token_ids)
    assert worst < 1e-4


def test_group_shares_prefill_and_samples_differ(hf, engine, prompts):
    res = engine.generate([GenerationRequest("g", prompts[2], greedy(10), n=4)])[0]
    want = reference_greedy(hf, prompts[2], 10, sorted(engine.eos_token_ids))
    assert [c.token_ids for c in res.completions] == [want] * 4
    sampled = SamplingParams(temperature=1.0, seed=5, max_new_tokens=10)
    res = engine.generate([GenerationRequest("s", prompts[2], sampled, n=4)])[0]
    assert len({tuple(c.token_ids) for c in res.completions}) > 1
    assert engine.stats["prefill_tokens"] == 2 * len(prompts[2])  # once per group
    # separate requests for one prompt, admitted together, are prefilled once too
    engine.generate([GenerationRequest(f"d{i}", prompts[2], sampled) for i in range(3)])
    assert engine.stats["prefill_tokens"] == 3 * len(prompts[2])


def test_continuous_batching_long_and_short(hf, tiny_tokenizer, prompts):
    # 3 slots for 9 requests: the short ones queue and join as slots free up mid-way.
    engine = make_engine(hf, tiny_tokenizer, max_batch=3)
    kv_ptr = engine.kv.data_ptr()
    long = GenerationRequest("long", prompts[2], greedy(60, ignore_eos=True))
    short = [
        GenerationRequest(f"s{i}", prompts[i % 5], greedy(2 + i, ignore_eos=True)) for i in range(8)
    ]
    together = engine.generate([long, *short])
    alone = [make_engine(hf, max_batch=1).generate([r])[0] for r in [long, *short]]
    for a, b in zip(together, alone, strict=True):
        assert a.completions[0].token_ids == b.completions[0].token_ids
        assert a.completions[0].logprobs == pytest.approx(b.completions[0].logprobs, abs=1e-5)
    assert [len(r.completions[0].token_ids) for r in together] == [60] + [2 + i for i in range(8)]
    assert engine.kv.data_ptr() == kv_ptr  # the pool is reused, never reallocated


def test_abort_returns_partial_and_continue_matches(engine, prompts):
    full = engine.generate([GenerationRequest("full", prompts[1], greedy(30, ignore_eos=True))])
    full_c = full[0].completions[0]
    engine.add_request(GenerationRequest("a", prompts[1], greedy(30, ignore_eos=True)))
    engine.add_request(GenerationRequest("other", prompts[0], greedy(30, ignore_eos=True)))
    for _ in range(7):
        assert engine.step() == []
    (part,) = engine.abort(["a"])
    pc = part.completions[0]
    assert pc.finish_reason == "abort" and part.finish_reason == "abort"
    assert pc.token_ids == full_c.token_ids[:7]
    assert pc.logprobs == pytest.approx(full_c.logprobs[:7], abs=1e-6)
    cont = GenerationRequest(
        "a2", prompts[1], greedy(30 - 7, ignore_eos=True), response_ids=pc.token_ids
    )
    (rest,) = engine.generate([cont])
    assert pc.token_ids + rest.completions[0].token_ids == full_c.token_ids
    assert rest.completions[0].logprobs == pytest.approx(full_c.logprobs[7:], abs=1e-4)
    # the other request kept running through the abort and is delivered by step()
    done = []
    while engine.has_unfinished():
        done += engine.step()
    assert [r.request_id for r in done] == ["other"]
    assert len(done[0].completions[0].token_ids) == 30


def test_abort_waiting_unknown_and_finished_are_safe(engine, prompts):
    engine.add_request(GenerationRequest("w", prompts[0], greedy(5)))
    (res,) = engine.abort(["w"])  # never started: empty partial output
    assert res.completions[0].token_ids == [] and res.completions[0].finish_reason == "abort"
    assert engine.abort(["nope", "w"]) == []  # unknown / already aborted: no-op
    (done,) = engine.generate([GenerationRequest("f", prompts[0], greedy(5))])
    assert engine.abort(["f"]) == []  # finished: no-op
    assert not engine.has_unfinished()
    (again,) = engine.generate([GenerationRequest("f2", prompts[0], greedy(5))])
    assert again.completions[0].token_ids == done.completions[0].token_ids


def perturbed(hf, scale: float = 0.5) -> dict[str, torch.Tensor]:
    """New weights; the tied LM head stays equal to the embedding, as a trainer's would."""
    g = torch.Generator().manual_seed(0)
    new = {
        k: v + scale * v.std() * torch.randn(v.shape, generator=g)
        for k, v in hf.state_dict().items()
        if k != "lm_head.weight"
    }
    new["lm_head.weight"] = new["model.embed_tokens.weight"]
    return new


def test_update_weights_in_place(hf, engine, prompts, tiny_model_path):
    from transformers import AutoModelForCausalLM

    eos = sorted(engine.eos_token_ids)
    before = engine.generate([GenerationRequest("b", prompts[3], greedy(16))])[0]
    new_state = perturbed(hf)
    new_hf = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    new_hf.load_state_dict(new_state)
    ptrs = (engine.kv.data_ptr(), engine.model.qkv.data_ptr(), engine.model.embed.data_ptr())
    engine.update_weights(new_state, version=3)
    assert engine.version == 3
    assert ptrs == (
        engine.kv.data_ptr(),
        engine.model.qkv.data_ptr(),
        engine.model.embed.data_ptr(),
    )
    after = engine.generate([GenerationRequest("a", prompts[3], greedy(16))])[0]
    assert after.version == 3 and set(after.completions[0].versions) == {3}
    assert after.completions[0].token_ids == reference_greedy(new_hf, prompts[3], 16, eos)
    assert after.completions[0].token_ids != before.completions[0].token_ids


def test_update_weights_mid_generation_tags_versions(hf, engine, prompts):
    engine.add_request(GenerationRequest("m", prompts[0], greedy(10, ignore_eos=True)))
    for _ in range(4):
        engine.step()
    engine.update_weights(hf.state_dict(), version=1)
    res = []
    while engine.has_unfinished():
        res += engine.step()
    assert res[0].completions[0].versions == [0] * 4 + [1] * 6 and res[0].version == 1


def test_bad_weight_updates_change_nothing(hf, engine, prompts):
    state = hf.state_dict()
    (ref,) = engine.generate([GenerationRequest("r", prompts[0], greedy(8))])
    missing = {k: v for k, v in state.items() if "layers.1.mlp.up_proj" not in k}
    bad_shape = dict(perturbed(hf))
    bad_shape["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 3)
    unknown = dict(perturbed(hf), **{"model.layers.9.mlp.up_proj.weight": torch.zeros(1)})
    nan = dict(
        state, **{"model.norm.weight": torch.full_like(state["model.norm.weight"], float("nan"))}
    )
    cases = [
        (missing, "missing"),
        (bad_shape, "mis-shaped"),
        (unknown, "unknown"),
        (nan, "non-finite"),
    ]
    for named, word in cases:
        with pytest.raises(ValueError, match=word):
            engine.update_weights(named, version=7)
    with pytest.raises(ValueError, match="version"):
        engine.update_weights(state, version="v2")  # type: ignore[arg-type]
    assert engine.version == 0
    (out,) = engine.generate([GenerationRequest("r2", prompts[0], greedy(8))])
    assert out.completions[0].token_ids == ref.completions[0].token_ids
    # a bucket of a weight update (partial=True) is fine
    engine.update_weights({"model.norm.weight": state["model.norm.weight"]}, 8, partial=True)
    assert engine.version == 8


def test_seeds_make_sampling_reproducible(engine, prompts):
    def run(seed: int, extra: bool) -> list[list[int]]:
        p = SamplingParams(temperature=1.0, top_p=0.95, seed=seed, max_new_tokens=12)
        reqs = [GenerationRequest("x", prompts[4], p, n=3)]
        if extra:  # different batch composition must not change this request's samples
            q = SamplingParams(temperature=1.0, seed=99, max_new_tokens=20)
            reqs += [GenerationRequest(f"o{i}", prompts[i], q, n=2) for i in range(3)]
        return [c.token_ids for c in engine.generate(reqs)[0].completions]

    a = run(11, extra=False)
    assert a == run(11, extra=True) == run(11, extra=False)
    assert a != run(12, extra=False)


def test_top_k_1_and_tiny_top_p_are_greedy(engine, prompts):
    want = engine.generate([GenerationRequest("g", prompts[1], greedy(10))])[0]
    for kw in ({"top_k": 1}, {"top_p": 1e-6}):
        p = SamplingParams(temperature=1.3, seed=4, max_new_tokens=10, **kw)
        got = engine.generate([GenerationRequest("t", prompts[1], p)])[0]
        assert got.completions[0].token_ids == want.completions[0].token_ids


def test_sampler_filters_and_nucleus_fallback():
    torch.manual_seed(0)
    vocab = 5000  # > NUCLEUS_CANDIDATES: near-flat rows need the full-sort fallback
    logits = torch.randn(4, vocab) * torch.tensor([[0.01], [0.01], [4.0], [4.0]])
    rp = RowParams.build([1.0] * 4, [False] * 4, [0, 3, 0, 3], [0.99, 1.0, 0.5, 0.5], "cpu")
    probs = torch.softmax(logits, -1)
    order = probs.argsort(dim=-1, descending=True)
    allowed = []
    for row, (k, p) in enumerate([(0, 0.99), (3, 1.0), (0, 0.5), (3, 0.5)]):
        sp = probs[row, order[row]]
        n_keep = int(((sp.cumsum(0) - sp) < p).sum())
        allowed.append(set(order[row, : min(n_keep, k or vocab)].tolist()))
    for i in range(40):
        u = torch.rand(4, generator=torch.Generator().manual_seed(i))
        tokens, lps = sample(logits, rp, u)
        for row in range(4):
            assert tokens[row].item() in allowed[row]
        ref = torch.log_softmax(logits, -1).gather(1, tokens[:, None]).squeeze(1)
        assert torch.allclose(lps, ref, atol=1e-5)


def test_stop_tokens_and_strings(hf, engine, prompts, tiny_tokenizer):
    base = engine.generate([GenerationRequest("b", prompts[0], greedy(20, ignore_eos=True))])
    toks = base[0].completions[0].token_ids
    stop_tok = toks[5]
    first = toks.index(stop_tok)
    (r,) = engine.generate(
        [GenerationRequest("t", prompts[0], greedy(20, stop_token_ids=[stop_tok]))]
    )
    c = r.completions[0]
    assert c.token_ids == toks[: first + 1]
    assert c.finish_reason == "stop" and c.stop_reason == stop_tok
    text = tiny_tokenizer.decode(toks[:8], skip_special_tokens=False)
    stop_str = text[-3:]
    (r,) = engine.generate(
        [GenerationRequest("s", prompts[0], greedy(20, stop_strings=[stop_str], ignore_eos=True))]
    )
    c = r.completions[0]
    got = tiny_tokenizer.decode(c.token_ids, skip_special_tokens=False)
    assert c.finish_reason == "stop" and c.stop_reason == stop_str
    assert stop_str in got and stop_str not in tiny_tokenizer.decode(c.token_ids[:-1])
    assert c.token_ids == toks[: len(c.token_ids)]


def test_context_window_truncates_with_length(hf, prompts):
    engine = make_engine(hf, max_seq_len=len(prompts[2]) + 5)
    (r,) = engine.generate([GenerationRequest("c", prompts[2], greedy(50, ignore_eos=True))])
    assert len(r.completions[0].token_ids) == 5 and r.finish_reason == "length"


def test_bad_requests_get_errors_and_others_are_served(hf, engine, prompts):
    no_tok = make_engine(hf)
    good = GenerationRequest("good", prompts[1], greedy(12))
    bad = {
        "too_long": GenerationRequest("too_long", list(range(3, 131)), greedy(4)),
        "empty": GenerationRequest("empty", [], greedy(4)),
        "vocab": GenerationRequest("vocab", [1, 2, 10**6], greedy(4)),
        "temp": GenerationRequest("temp", prompts[0], SamplingParams(temperature=-1.0)),
        "top_p0": GenerationRequest("top_p0", prompts[0], SamplingParams(top_p=0.0)),
        "top_p2": GenerationRequest("top_p2", prompts[0], SamplingParams(top_p=1.5)),
        "top_k": GenerationRequest("top_k", prompts[0], SamplingParams(top_k=-5)),
        "max_new": GenerationRequest("max_new", prompts[0], SamplingParams(max_new_tokens=0)),
        "nan": GenerationRequest("nan", prompts[0], SamplingParams(temperature=float("nan"))),
        "n0": GenerationRequest("n0", prompts[0], greedy(4), n=0),
        "n_big": GenerationRequest("n_big", prompts[0], greedy(4), n=999),
        "cont_n": GenerationRequest("cont_n", prompts[0], greedy(4), n=2, response_ids=[5]),
        "stop_str": GenerationRequest("stop_str", prompts[0], greedy(4, stop_strings=["x"])),
        "params": GenerationRequest("params", prompts[0], None),  # type: ignore[arg-type]
        "float_ids": GenerationRequest("float_ids", [1.5, 2.0], greedy(4)),  # type: ignore[list-item]
        "good": GenerationRequest("good", prompts[0], greedy(4)),  # duplicate id
    }
    want = no_tok.generate([good])[0].completions[0].token_ids
    results = no_tok.generate([good, *bad.values()])
    assert results[0].error is None and results[0].completions[0].token_ids == want
    for (name, _), res in zip(bad.items(), results[1:], strict=True):
        assert res.finish_reason == "error" and res.error, name
        assert res.completions == []
    assert "context window" in results[1].error
    assert "temperature" in results[4].error and "top_p" in results[5].error
    assert not no_tok.has_unfinished()


def test_forward_failure_fails_only_its_requests(engine, prompts, monkeypatch):
    engine.add_request(GenerationRequest("running", prompts[0], greedy(6, ignore_eos=True)))
    engine.step()  # admitted and prefilled
    real = engine.model.prefill

    def broken(*a, **k):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(engine.model, "prefill", broken)
    engine.add_request(GenerationRequest("new", prompts[1], greedy(6)))
    out = engine.step()  # "running" decodes fine, "new" fails in its prefill
    assert [(r.request_id, r.finish_reason) for r in out] == [("new", "error")]
    assert "out of memory" in out[0].error
    monkeypatch.setattr(engine.model, "prefill", real)
    rest = []
    while engine.has_unfinished():
        rest += engine.step()
    assert rest[0].request_id == "running" and len(rest[0].completions[0].token_ids) == 6
    (again,) = engine.generate([GenerationRequest("new", prompts[1], greedy(6))])
    assert again.error is None


def test_bf16_packed_weights_load_from_one_buffer_and_in_parts(
    hf, tiny_tokenizer, prompts, monkeypatch
):
    """bf16 on x86 keeps the matmul weights only in oneDNN's packed layout. Against an engine
    on plain bf16 weights (`F.linear`): the same greedy tokens and logprobs (bf16 rounding
    only); a full update from one flat buffer (the shared-memory push: q/k/v and gate/up back
    to back, packed straight from it) and partial updates (some parts of a fused weight) give
    the same weights and outputs on both; the packed copy does not alias the buffer."""
    import rlsys.rollout.llama as llama

    packed = make_engine(hf, tiny_tokenizer, dtype="bfloat16")
    assert packed.model._packed is not None and packed.model.qkv is None  # no plain copy
    monkeypatch.setattr(llama, "_can_pack", lambda: False)
    plain = make_engine(hf, tiny_tokenizer, dtype="bfloat16")
    assert plain.model._packed is None

    def outputs(e: NativeEngine) -> tuple[list, list]:
        res = e.generate([GenerationRequest(str(i), p, greedy(12)) for i, p in enumerate(prompts)])
        return [r.completions[0].token_ids for r in res], [r.completions[0].logprobs for r in res]

    def same(tol: float = 2e-2) -> None:
        (tp, lp), (tq, lq) = outputs(packed), outputs(plain)
        assert tp == tq
        for a, b in zip(lp, lq, strict=True):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=tol, rtol=0)
        wp, wq = packed.named_weights(), plain.named_weights()
        assert wp.keys() == wq.keys()
        for k in wq:
            assert torch.equal(wp[k], wq[k]), k

    same()
    # one flat bf16 buffer holding the tensors in state-dict order, as `SharedWeights` lays them
    new = {k: v for k, v in perturbed(hf).items() if k != "lm_head.weight"}
    flat = torch.cat([v.to(torch.bfloat16).reshape(-1) for v in new.values()])
    views, off = {}, 0
    for k, v in new.items():
        views[k] = flat[off : off + v.numel()].view(v.shape)
        off += v.numel()
    q = views["model.layers.0.self_attn.q_proj.weight"]
    assert llama._back_to_back([q, views["model.layers.0.self_attn.k_proj.weight"]])
    assert not llama._back_to_back([views["model.layers.0.self_attn.k_proj.weight"], q])
    packed.update_weights(views, 1, finite_checked=True)
    plain.update_weights(views, 1, finite_checked=True)
    assert torch.equal(
        packed.named_weights()["model.layers.0.self_attn.k_proj.weight"],
        views["model.layers.0.self_attn.k_proj.weight"],
    )
    same()
    before = outputs(packed)
    flat.mul_(-3.0)  # the next push overwrites the buffer: the engine must not see it
    assert outputs(packed)[0] == before[0]
    # parts of fused weights: k of layer 0, up of layer 1 (q, v, gate read back from the pack)
    g = torch.Generator().manual_seed(5)
    part = {
        k: torch.randn(new[k].shape, generator=g) * new[k].std()
        for k in ("model.layers.0.self_attn.k_proj.weight", "model.layers.1.mlp.up_proj.weight")
    }
    packed.update_weights(part, 2, partial=True)
    plain.update_weights(part, 2, partial=True)
    w = packed.named_weights()
    assert torch.equal(
        w["model.layers.0.self_attn.k_proj.weight"],
        part["model.layers.0.self_attn.k_proj.weight"].to(torch.bfloat16),
    )
    assert torch.equal(
        w["model.layers.0.self_attn.q_proj.weight"],
        new["model.layers.0.self_attn.q_proj.weight"].to(torch.bfloat16),
    )
    same()


@pytest.mark.gpu
def test_cuda_engine_matches_cpu_and_takes_cpu_weights(hf, prompts, tiny_tokenizer):
    """rollout.device=cuda: the engine on the GPU (fp32) decodes what the CPU engine decodes
    (greedy tokens equal, logprobs to 1e-4: only summation order differs), loads a CPU
    state dict pushed by weight sync, and runs in bf16 (no CPU weight packing there)."""
    cpu = make_engine(hf, tiny_tokenizer)
    gpu = make_engine(hf, tiny_tokenizer, device="cuda")
    assert gpu.kv.device.type == "cuda"
    reqs = [GenerationRequest(f"r{i}", p, greedy(12 + 2 * i)) for i, p in enumerate(prompts)]
    sampled = SamplingParams(temperature=0.7, seed=3, max_new_tokens=10)
    for a, b in zip(cpu.generate(reqs), gpu.generate(reqs), strict=True):
        assert b.error is None and b.completions[0].token_ids == a.completions[0].token_ids
        diff = torch.tensor(a.completions[0].logprobs) - torch.tensor(b.completions[0].logprobs)
        assert diff.abs().max().item() < 1e-4
    res = gpu.generate([GenerationRequest("s", prompts[2], sampled, n=4)])[0]
    assert res.error is None and len({tuple(c.token_ids) for c in res.completions}) > 1
    new_state = perturbed(hf)  # CPU tensors, as weight sync delivers them
    cpu.update_weights(new_state, version=2)
    gpu.update_weights(new_state, version=2)
    a, b = (e.generate([GenerationRequest("u", prompts[3], greedy(16))])[0] for e in (cpu, gpu))
    assert b.version == 2 and b.completions[0].token_ids == a.completions[0].token_ids
    bf16 = make_engine(hf, tiny_tokenizer, device="cuda", dtype="bfloat16")
    out = bf16.generate(reqs)
    assert all(r.error is None and r.completions[0].token_ids for r in out)
