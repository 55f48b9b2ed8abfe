"""LoRA (`trainer.lora`): the layer's math against float64, what trains and what stays frozen,
the merged weights the engines and the export get, the reference as the base model, the
fused head with a frozen LM head, ZeRO-3 gathers of the factors, and checkpoints."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rlsys.config import ConfigError, load_recipe, to_dict
from rlsys.trainer.lora import LoRALinear, adapters_off, apply_lora, check_targets
from rlsys.trainer.worker import TrainerWorker

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _layer(bias: bool = True) -> LoRALinear:
    torch.manual_seed(0)
    m = LoRALinear(nn.Linear(24, 40, bias=bias), rank=4, alpha=8.0)
    with torch.no_grad():
        m.lora_B.normal_()  # B = 0 at init: make the update visible
    return m


@pytest.mark.parametrize("bias", [True, False])
def test_layer_equals_float64_reference(bias: bool) -> None:
    """fp32 forward and gradients within 1e-5 of float64: y = x W^T + b + (alpha/r) x A^T B^T,
    dA and dB by autograd on the float64 formula; W and b get no gradient."""
    m = _layer(bias)
    x = torch.randn(7, 24, requires_grad=True)
    y = m(x)
    g = torch.randn_like(y)
    y.backward(g)
    x64 = x.detach().double().requires_grad_()
    a64 = m.lora_A.detach().double().requires_grad_()
    b64 = m.lora_B.detach().double().requires_grad_()
    ref = x64 @ m.weight.double().T + 2.0 * (x64 @ a64.T) @ b64.T
    if bias:
        ref = ref + m.bias.double()
    ref.backward(g.double())
    assert torch.allclose(y.double(), ref, atol=1e-5, rtol=1e-5)
    assert torch.allclose(m.lora_A.grad.double(), a64.grad, atol=1e-5, rtol=1e-5)
    assert torch.allclose(m.lora_B.grad.double(), b64.grad, atol=1e-5, rtol=1e-5)
    assert torch.allclose(x.grad.double(), x64.grad, atol=1e-5, rtol=1e-5)
    assert m.weight.grad is None and not m.weight.requires_grad
    assert m.lora_A.grad.abs().sum() > 0  # a real gradient, not zeros


def test_merged_weight_and_adapters_off() -> None:
    """The merged weight gives the adapted layer's outputs as a plain Linear; with the adapters
    off the layer is its base exactly; at init (B = 0) it is the base too."""
    m = _layer()
    x = torch.randn(5, 24)
    merged = m.merged_weight()
    assert torch.allclose(nn.functional.linear(x, merged, m.bias), m(x), atol=1e-5)
    assert not torch.allclose(merged, m.weight, atol=1e-3)
    base = nn.functional.linear(x, m.weight, m.bias)
    with adapters_off(m):
        assert torch.equal(m(x), base)
    assert not torch.allclose(m(x), base, atol=1e-3)  # back on after the block
    fresh = LoRALinear(nn.Linear(24, 40), rank=4, alpha=8.0)
    assert torch.equal(fresh(x), nn.functional.linear(x, fresh.weight, fresh.bias))


def test_apply_lora_freezes_the_model_and_keeps_the_names(tiny_model_path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    names = [n for n, _ in model.named_parameters()]
    n = apply_lora(model, 4, 8.0, ["q_proj", "v_proj"])
    assert n == 2 * model.config.num_hidden_layers
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    assert len(trainable) == 2 * n
    assert {n for n, _ in model.named_parameters() if "lora" not in n} == set(names)
    assert isinstance(model.model.layers[0].self_attn.q_proj, LoRALinear)
    assert type(model.model.layers[0].self_attn.k_proj) is nn.Linear
    with pytest.raises(ConfigError, match="match no linear layer.*q_proj"):
        apply_lora(AutoModelForCausalLM.from_pretrained(tiny_model_path), 4, 8.0, ["qkv"])


def test_check_targets_names_the_layers_there_are(tiny_model_path) -> None:
    check_targets(tiny_model_path, TARGETS)
    with pytest.raises(ConfigError, match="q_prj is not a linear layer.*it has.*q_proj"):
        check_targets(tiny_model_path, ["q_prj"])
    with pytest.raises(ConfigError, match="lm_head cannot take an adapter"):
        check_targets(tiny_model_path, ["lm_head"])


def test_config_checks() -> None:
    with pytest.raises(ConfigError, match="trainer.lora.rank must be >= 0"):
        load_recipe(None, ["trainer.lora.rank=-1"])
    with pytest.raises(ConfigError, match="trainer.lora.targets is empty"):
        load_recipe(None, ["trainer.lora.rank=4", "trainer.lora.targets=[]"])
    with pytest.raises(ConfigError, match="trainer.lora.alpha must be > 0"):
        load_recipe(None, ["trainer.lora.rank=4", "trainer.lora.alpha=0"])


def _worker(tiny_model_path, *overrides: str) -> TrainerWorker:
    cfg = load_recipe(
        None,
        [
            "model.path=tiny-llama",
            "trainer.autocast_bf16=false",
            "trainer.lr=1e-2",
            "trainer.lora.rank=4",
            "trainer.lora.alpha=8",
            *overrides,
        ],
    )
    return TrainerWorker(to_dict(cfg), tiny_model_path)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_step_trains_the_adapters_only_and_pushes_merged_weights(
    tiny_model_path, synthetic_groups
) -> None:
    """Two steps: every base weight is bit-for-bit unchanged, every adapter moved (A needs B
    non-zero, so only from the second step); the weights the engines get carry the base
    names only, and a plain HF model built from them computes the adapted policy's logits."""
    from transformers import AutoModelForCausalLM

    w = _worker(tiny_model_path)
    init = {n: p.detach().clone() for n, p in w.model.named_parameters()}
    for _ in range(2):
        assert w.train_step(synthetic_groups())["train/grad_norm"] > 0
    after = dict(w.model.named_parameters())
    moved = {n for n in init if not torch.equal(init[n], after[n])}
    assert moved == {n for n in init if "lora" in n}
    # the optimizer holds the adapters only
    opt = w.policy.engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    held = {id(p) for g in inner.param_groups for p in g["params"]}
    assert held == {id(p) for n, p in after.items() if "lora" in n}

    state = w.get_weights()
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    tied = {"lm_head.weight"} if plain.config.tie_word_embeddings else set()
    assert set(state) == set(plain.state_dict()) - tied  # base names, no factors
    q = "model.layers.0.self_attn.q_proj"
    layer = w.model.get_submodule(q)
    expect = init[f"{q}.weight"] + 2.0 * layer.lora_B.detach() @ layer.lora_A.detach()
    assert torch.allclose(state[f"{q}.weight"], expect, atol=1e-6)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    ids = torch.randint(5, 300, (2, 11))
    adapted = _logits(w.model, ids)
    assert torch.allclose(_logits(plain, ids), adapted, atol=1e-4)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    assert (_logits(base, ids) - adapted).abs().max() > 1e-3  # the adapters changed the model


def test_adapter_export_loads_in_peft(tiny_model_path, synthetic_groups, tmp_path) -> None:
    """`save_pretrained` writes `adapter/` in PEFT's format beside the merged model: PEFT's
    `PeftModel.from_pretrained` on the base model computes the trained policy's logits (fp32,
    1e-5), and so does the merged folder; full fine-tuning writes no adapter."""
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    w = _worker(tiny_model_path)
    for _ in range(2):
        w.train_step(synthetic_groups())
    w.save_pretrained(str(tmp_path / "out"))
    cfg = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["base_model_name_or_path"]) == (
        4,
        8.0,
        tiny_model_path,
    )
    assert cfg["target_modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    peft = PeftModel.from_pretrained(base, str(tmp_path / "out" / "adapter")).eval()
    ids = torch.randint(5, 300, (2, 13))
    adapted = _logits(w.model, ids)
    fresh = _logits(AutoModelForCausalLM.from_pretrained(tiny_model_path), ids)
    assert (adapted - fresh).abs().max() > 1e-3  # the adapters moved the model
    assert torch.allclose(_logits(peft, ids), adapted, atol=1e-5)
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert torch.allclose(_logits(merged, ids), adapted, atol=1e-5)

    full = _worker(tiny_model_path, "trainer.lora.rank=0")
    full.save_pretrained(str(tmp_path / "full"))
    assert (tmp_path / "full" / "config.json").is_file()
    assert not (tmp_path / "full" / "adapter").exists()


def test_reference_is_the_base_model(tiny_model_path, synthetic_groups) -> None:
    """With a KL term the LoRA trainer loads no reference copy: its reference logprobs are the
    policy's with the adapters off, equal to a frozen copy's (a full-fine-tuning worker's
    reference) after the adapters moved; KL is 0 at the first step and not after."""
    from rlsys.types import collate

    kl = ["algorithm.kl.mode=loss", "algorithm.kl.coef=0.1"]
    w = _worker(tiny_model_path, *kl)
    full = _worker(tiny_model_path, "trainer.lora.rank=0", *kl)
    assert w.ref is None and full.ref is not None
    m1 = w.train_step(synthetic_groups())
    m2 = w.train_step(synthetic_groups())
    assert abs(m1["train/kl"]) < 1e-7 < m2["train/kl"]
    samples = [s for g in synthetic_groups() for s in g.samples]
    batch = collate(samples, [0.0] * len(samples), 0)
    rows = [list(range(len(samples)))]
    ref = w._full_pass(w._ref_logp, batch, rows)
    frozen = full._full_pass(full._ref_logp, batch, rows)
    policy = w._full_pass(lambda mb, r: w._logp(w.policy, mb, r)[0], batch, rows)
    mask = batch.response_mask.bool()
    assert ref[mask].abs().min() > 0  # real logprobs
    assert torch.allclose(ref, frozen, atol=1e-5)
    assert (ref - policy)[mask].abs().max() > 1e-4


def test_fused_head_with_frozen_lm_head_equals_unfused(tiny_model_path, synthetic_groups) -> None:
    """The fused LM head (and the fused loss) with a frozen head weight: the same loss,
    gradient norm and adapters after two steps as the plain head (fp32, 1e-6 / 1e-5)."""
    results = []
    for fused in ("true", "false"):
        w = _worker(tiny_model_path, f"trainer.fused_logprob={fused}")
        ms = [w.train_step(synthetic_groups()) for _ in range(2)]
        lora = torch.cat(
            [p.detach().flatten() for n, p in w.model.named_parameters() if "lora" in n]
        )
        results.append((ms, lora))
    (ma, la), (mb, lb) = results
    for a, b in zip(ma, mb, strict=True):
        assert a["train/loss"] == pytest.approx(b["train/loss"], abs=1e-6)
        assert a["train/grad_norm"] == pytest.approx(b["train/grad_norm"], rel=1e-5)
    assert torch.allclose(la, lb, atol=1e-5)


def test_zero3_gathers_the_factors(tiny_model_path, synthetic_groups) -> None:
    """Under ZeRO-3 (parameters sharded) the pushed merged weights and the exported adapter
    equal stage 0's after the same two steps: the factors are gathered (with their base
    weight for the push)."""
    states, adapters = [], []
    for stage in (0, 3):
        w = _worker(tiny_model_path, f"trainer.zero_stage={stage}")
        for _ in range(2):
            w.train_step(synthetic_groups())
        states.append(w.get_weights())
        adapters.append(w.policy.adapter_state_dict())
    s0, s3 = states
    assert set(s0) == set(s3)
    for k in s0:
        assert torch.allclose(s0[k], s3[k], atol=1e-6), k
    a0, a3 = adapters
    assert set(a0) == set(a3) and len(a0) == 2 * 7 * 2  # A and B, 7 targets, 2 layers
    assert all(a3[k].shape == a0[k].shape and torch.allclose(a0[k], a3[k], atol=1e-6) for k in a0)
    init = _worker(tiny_model_path).get_weights()
    q = "model.layers.1.mlp.down_proj.weight"
    assert (s3[q] - init[q]).abs().max() > 1e-5


def test_checkpoint_holds_the_adapters_and_round_trips(
    tiny_model_path, synthetic_groups, tmp_path
) -> None:
    """The DeepSpeed checkpoint leaves the frozen base out; a new worker that loads it pushes
    the same merged weights and takes the same next step; `hf/` is the merged model."""
    from safetensors.torch import load_file

    w = _worker(tiny_model_path)
    for _ in range(2):
        w.train_step(synthetic_groups())
    w.save_state(str(tmp_path))
    saved = torch.load(next((tmp_path / "policy").rglob("*model_states.pt")), weights_only=False)[
        "module"
    ]
    frozen = {k for k in saved if "lora" not in k}
    # the base weights are left out; a tied LM head is only an alias of the embedding
    assert frozen <= ({"lm.lm_head.weight"} if w.model.config.tie_word_embeddings else set())
    assert len(saved) - len(frozen) == 2 * 7 * w.model.config.num_hidden_layers
    hf = load_file(str(tmp_path / "hf" / "model.safetensors"))
    state = w.get_weights()
    assert all(torch.equal(hf[k], state[k]) for k in hf)

    back = _worker(tiny_model_path)
    back.load_state(str(tmp_path))
    assert all(torch.equal(back.get_weights()[k], v) for k, v in state.items())
    m_a = w.train_step(synthetic_groups(seed=1))
    m_b = back.train_step(synthetic_groups(seed=1))
    assert m_a["train/loss"] == pytest.approx(m_b["train/loss"], abs=1e-7)
    assert m_a["train/grad_norm"] == pytest.approx(m_b["train/grad_norm"], rel=1e-6)


def test_ppo_critic_trains_adapters_and_value_head(
    tiny_model_path, synthetic_groups, tmp_path
) -> None:
    """PPO with `trainer.lora`: the critic's backbone gets adapters too. After two steps its
    frozen weights are bit-for-bit unchanged, its adapters and value head moved (the value
    loss fell), its optimizer holds exactly those, and its checkpoint holds those only and
    round-trips to the same values."""
    from rlsys.types import collate

    ppo = ["algorithm.advantage=gae", "algorithm.critic.lr=1e-2"]
    w = _worker(tiny_model_path, *ppo)
    crit = w.critic.module
    init = {n: p.detach().clone() for n, p in crit.named_parameters()}
    ms = [w.train_step(synthetic_groups()) for _ in range(3)]
    assert ms[-1]["train/value_loss"] < ms[0]["train/value_loss"]
    after = dict(crit.named_parameters())
    trained = {n for n in init if "lora" in n or n.startswith("head.")}
    assert len(trained) == 2 * 7 * 2 + 2  # A, B of 7 targets x 2 layers; head weight, bias
    assert {n for n in init if not torch.equal(init[n], after[n])} == trained
    opt = w.critic.engine.optimizer
    held = {id(p) for g in getattr(opt, "optimizer", opt).param_groups for p in g["params"]}
    assert held == {id(after[n]) for n in trained}

    w.save_state(str(tmp_path))
    saved = torch.load(next((tmp_path / "critic").rglob("*model_states.pt")), weights_only=False)
    assert set(saved["module"]) == trained
    back = _worker(tiny_model_path, *ppo)
    back.load_state(str(tmp_path))
    samples = [s for g in synthetic_groups() for s in g.samples]
    batch = collate(samples, [0.0] * len(samples), 0)
    rows = [list(range(len(samples)))]
    v_a = w._full_pass(w._values, batch, rows)
    v_b = back._full_pass(back._values, batch, rows)
    assert v_a[batch.response_mask.bool()].abs().min() > 0
    assert torch.allclose(v_a, v_b, atol=1e-6)


def test_bf16_base_under_autocast_changes_nothing_but_bytes(
    tiny_model_path, synthetic_groups, monkeypatch
) -> None:
    """Under bf16 autocast the frozen base of each adapted layer is stored in bf16 (the rest
    of the model, the adapters and the pushed weights stay fp32). Autocast rounded W to bf16
    at every matmul anyway, so two steps give the same losses, gradient norms and adapters
    as a worker that keeps W in fp32 (1e-6), and the state shrinks by 2 bytes per frozen
    adapted weight. Outside autocast a bf16 base still computes in the input's dtype."""
    import rlsys.trainer.worker as worker_mod
    from rlsys.trainer import lora

    def run(w: TrainerWorker) -> tuple[list[dict], torch.Tensor]:
        ms = [w.train_step(synthetic_groups()) for _ in range(2)]
        flat = [p.detach().flatten() for n, p in w.model.named_parameters() if "lora" in n]
        return ms, torch.cat(flat)

    w16 = _worker(tiny_model_path, "trainer.autocast_bf16=true")
    adapted = lora.lora_layers(w16.model)
    assert all(m.weight.dtype == torch.bfloat16 for m in adapted.values())
    others = [p for n, p in w16.model.named_parameters() if n not in adapted]
    assert others and all(p.dtype == torch.float32 for p in others)
    ids = torch.randint(5, 300, (2, 7))
    assert _logits(w16.model, ids).dtype == torch.float32  # a plain fp32 forward still runs

    plain = lora.apply_lora
    monkeypatch.setattr(worker_mod, "apply_lora", lambda m, r, a, t, base=None: plain(m, r, a, t))
    w32 = _worker(tiny_model_path, "trainer.autocast_bf16=true")
    assert all(m.weight.dtype == torch.float32 for m in lora.lora_layers(w32.model).values())
    saved = sum(m.weight.numel() for m in adapted.values()) * 2
    assert w32.policy.state_bytes() - w16.policy.state_bytes() == saved

    (m16, a16), (m32, a32) = run(w16), run(w32)
    for a, b in zip(m16, m32, strict=True):
        assert a["train/loss"] == pytest.approx(b["train/loss"], abs=1e-6)
        assert a["train/grad_norm"] == pytest.approx(b["train/grad_norm"], rel=1e-6)
    assert torch.allclose(a16, a32, atol=1e-6) and (a16 - a32).abs().max() < 1e-6
    s16, s32 = w16.get_weights(), w32.get_weights()
    q = "model.layers.0.self_attn.q_proj.weight"
    assert s16[q].dtype == torch.float32
    # the pushed weight is the bf16-rounded base plus the same update
    from transformers import AutoModelForCausalLM

    w0 = AutoModelForCausalLM.from_pretrained(tiny_model_path).get_parameter(q).detach()
    rounding = w0.bfloat16().float() - w0
    assert rounding.abs().max() > 0
    assert torch.allclose(s16[q], s32[q] + rounding, atol=1e-6)


def test_bf16_weights_train_the_adapters_only(tiny_model_path, synthetic_groups) -> None:
    """`trainer.precision=bf16` (DeepSpeed's bf16 optimizer with fp32 masters) with LoRA: the
    frozen bf16 base stays bit-for-bit, the adapters move."""
    w = _worker(tiny_model_path, "trainer.precision=bf16")
    init = {n: p.detach().clone() for n, p in w.model.named_parameters()}
    assert all(p.dtype == torch.bfloat16 for p in init.values())
    for _ in range(2):
        assert w.train_step(synthetic_groups())["train/grad_norm"] > 0
    after = dict(w.model.named_parameters())
    moved = {n for n in init if not torch.equal(init[n], after[n])}
    assert moved == {n for n in init if "lora" in n}
