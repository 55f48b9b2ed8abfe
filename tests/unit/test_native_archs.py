"""Native engine on the other Llama-family architectures (tiny random models, fp32 unless
noted): Qwen2 (q/k/v biases, tied head) and Qwen3 (q/k RMSNorm, head_dim != hidden / heads,
untied head) against transformers' own `Qwen2ForCausalLM` / `Qwen3ForCausalLM`; weight
updates that touch biases and norms; bf16 packed weights with biases; and the clear errors
for what the engine does not implement (before any actor starts, in `rlsys train`)."""

from __future__ import annotations

import pytest
import torch

from rlsys import models
from rlsys.rollout.engine import GenerationRequest, SamplingParams
from rlsys.rollout.native import NativeEngine
from rlsys.rollout.testing import reference_greedy, worst_logprob_gap

TEXTS = [
    "What is 3 + 4?",
    "What is 12 * 7? The answer is",
    "You are a helpful assistant. Answer with a number. What is 99 - 1?",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=["tiny-qwen2", "tiny-qwen3"])
def arch_path(request) -> str:
    return models.resolve(request.param)


@pytest.fixture(scope="module")
def hf(arch_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(arch_path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tok(arch_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(arch_path)


@pytest.fixture(scope="module")
def prompts(tok) -> list[list[int]]:
    return [tok(t)["input_ids"] for t in TEXTS]


def engine_for(hf, tok, **cfg) -> NativeEngine:
    return NativeEngine.from_hf_model(hf, tok, NativeEngine.Config(max_batch=8, **cfg))


def test_the_models_have_what_the_engine_must_implement(hf, arch_path):
    """The fixtures are what they claim (random, non-trivial biases and norms), so the
    exactness tests below would fail for a forward that ignored them."""
    state = hf.state_dict()
    if "qwen2" in arch_path:
        bias = state["model.layers.0.self_attn.q_proj.bias"]
        assert bias.abs().mean() > 0.2 and hf.config.tie_word_embeddings
    else:
        assert hf.config.head_dim * hf.config.num_attention_heads != hf.config.hidden_size
        norm = state["model.layers.1.self_attn.k_norm.weight"]
        assert (norm - 1).abs().mean() > 0.1 and not hf.config.tie_word_embeddings


def test_greedy_and_logprobs_match_transformers(hf, tok, prompts):
    engine = engine_for(hf, tok)
    eos = sorted(engine.eos_token_ids)
    for i, p in enumerate(prompts):
        req = GenerationRequest(f"g{i}", p, SamplingParams(greedy=True, max_new_tokens=16))
        (res,) = engine.generate([req])
        assert res.completions[0].token_ids == reference_greedy(hf, p, 16, eos)
    assert worst_logprob_gap(engine, hf, prompts) < 1e-4


def test_weight_update_of_biases_and_norms(hf, tok, prompts, arch_path):
    """A trainer-style update (every tensor, biases and q/k norms included) gives the new
    model's logprobs; an update of only the biases/norms (a bucket) changes the outputs."""
    from transformers import AutoModelForCausalLM

    engine = engine_for(hf, tok)
    g = torch.Generator().manual_seed(1)
    new = {
        k: v + 0.5 * v.std() * torch.randn(v.shape, generator=g) for k, v in hf.state_dict().items()
    }
    if hf.config.tie_word_embeddings:
        new["lm_head.weight"] = new["model.embed_tokens.weight"]
    new_hf = AutoModelForCausalLM.from_pretrained(arch_path, dtype=torch.float32).eval()
    new_hf.load_state_dict(new)
    engine.update_weights(new, version=2)
    assert worst_logprob_gap(engine, new_hf, prompts) < 1e-4
    small = {k: v for k, v in new.items() if k.endswith(".bias") or "_norm." in k}
    per_layer = 3 if hf.config.model_type == "qwen2" else 2  # q/k/v biases | q/k norms
    assert len(small) == per_layer * hf.config.num_hidden_layers
    greedy = SamplingParams(greedy=True, max_new_tokens=8)
    before = engine.generate([GenerationRequest("b", prompts[1], greedy)])
    # (x3, not a sign flip: flipping both q and k norms would leave q.k unchanged)
    engine.update_weights({k: 3 * v for k, v in small.items()}, version=3, partial=True)
    after = engine.generate([GenerationRequest("a", prompts[1], greedy)])
    assert after[0].completions[0].logprobs != before[0].completions[0].logprobs
    assert torch.equal(engine.named_weights()[next(iter(small))], 3 * next(iter(small.values())))
    # the partial update landed in every layer's right tensor: the engine is now the model
    # with those tensors x3
    new_hf.load_state_dict(new | {k: 3 * v for k, v in small.items()})
    assert worst_logprob_gap(engine, new_hf, prompts) < 1e-4


def test_bf16_packed_with_biases_matches_plain_bf16(hf, tok, prompts, monkeypatch):
    """bf16 on x86: oneDNN's packed linear with the bias operand gives what `F.linear` with
    the bias gives (same greedy tokens; logprobs within bf16 rounding, 2e-2)."""
    import rlsys.rollout.llama as llama

    packed = engine_for(hf, tok, dtype="bfloat16")
    monkeypatch.setattr(llama, "_can_pack", lambda: False)
    plain = engine_for(hf, tok, dtype="bfloat16")
    assert packed.model._packed is not None and plain.model._packed is None
    greedy = SamplingParams(greedy=True, max_new_tokens=12)
    reqs = [GenerationRequest(str(i), p, greedy) for i, p in enumerate(prompts)]
    for a, b in zip(packed.generate(reqs), plain.generate(reqs), strict=True):
        assert a.completions[0].token_ids == b.completions[0].token_ids
        torch.testing.assert_close(
            torch.tensor(a.completions[0].logprobs),
            torch.tensor(b.completions[0].logprobs),
            atol=2e-2,
            rtol=0,
        )


def test_unsupported_architectures_name_the_problem():
    from transformers import GPT2Config, Qwen2Config

    from rlsys.rollout.llama import LlamaSpec

    with pytest.raises(NotImplementedError, match="not 'gpt2'"):
        LlamaSpec.from_hf_config(GPT2Config())
    windowed = Qwen2Config(
        num_hidden_layers=4, use_sliding_window=True, sliding_window=64, max_window_layers=2
    )
    with pytest.raises(NotImplementedError, match="sliding-window"):
        LlamaSpec.from_hf_config(windowed)
    assert LlamaSpec.from_hf_config(Qwen2Config(num_hidden_layers=2)).qkv_bias


def test_train_with_an_architecture_the_engine_lacks_exits_2(tmp_path):
    """`rlsys train` on a GPT-2 folder with the default engine: exit code 2 and one line that
    names the architecture and the engines that run it, before Ray or any actor starts."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from transformers import GPT2Config, GPT2LMHeadModel

    root = Path(__file__).resolve().parents[2]
    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=600)).save_pretrained(
        folder
    )
    models._tiny_tokenizer(512).save_pretrained(folder)
    r = subprocess.run(
        [sys.executable, "-m", "rlsys.cli", "train", str(root / "recipes" / "quickstart.yaml")]
        + [f"model.path={folder}", f"logging.run_dir={tmp_path}/run"],
        capture_output=True,
        text=True,
        env=dict(os.environ, RAY_ADDRESS=""),
        timeout=300,
    )
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert "rollout.engine=native cannot run model" in r.stderr and "'gpt2'" in r.stderr
    assert "rollout.engine=hf" in r.stderr
    assert not (tmp_path / "run").exists()  # stopped before the run folder was made


def test_llama_attention_and_mlp_biases_match_transformers():
    """Llama's `attention_bias` (q/k/v/o) and `mlp_bias` (gate/up/down), random biases."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(2)
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_bias=True,
        mlp_bias=True,
    )
    hf = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.5)
    biases = [k for k in hf.state_dict() if k.endswith(".bias")]
    assert len(biases) == 7 * 2  # q, k, v, o, gate, up, down in each layer
    engine = NativeEngine.from_hf_model(
        hf, config=NativeEngine.Config(max_batch=8), eos_token_ids=[]
    )
    assert engine.spec.num_params == sum(p.numel() for p in hf.parameters())
    prompts = [[5, 17, 42, 99, 7], [250, 3], list(range(20, 60))]
    assert worst_logprob_gap(engine, hf, prompts) < 1e-4
