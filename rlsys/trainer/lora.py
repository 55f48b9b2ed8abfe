"""LoRA: low-rank adapters on the policy's linear layers (`trainer.lora`).

A target `nn.Linear` with frozen weight W [out, in] becomes

    y = x W^T + b + (alpha / r) * (x A^T) B^T,      A [r, in], B [out, r],

with A drawn as nn.Linear draws its weights (Kaiming-uniform) and B = 0, so the adapted model
starts as the base model (Hu et al., 2021). Only A and B train: no gradient, fp32 master or
Adam moment is kept for W, and the reference model of a KL term is the same model with its
adapters switched off (`adapters_off`), not a second copy.

The rest of the system sees merged weights only: `merged_weight` = W + (alpha / r) B A, under
W's name, is what the trainer pushes to the rollout engines and exports as a Hugging Face
folder (`TrainEngine.buckets`). W itself never changes, so merging adds no rounding drift.
The factors alone are also written in PEFT's adapter format (`save_adapter`), which PEFT's
`PeftModel.from_pretrained` loads on top of the base model.
There is no dropout: the ratio's old and new logprobs must come from the same deterministic
forward.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rlsys.config import ConfigError

# Modules a LoRA target may not name: the fused LM head reads `lm_head.weight` directly
# (`trainer/logprobs.py`), and the embedding is not an `nn.Linear`.
_NOT_TARGETS = ("lm_head", "embed_tokens")


class LoRALinear(nn.Linear):
    """An `nn.Linear` whose weight (and bias) are frozen, plus a trainable rank-`rank` update.

    It is a subclass so that the base weight keeps its name (`...q_proj.weight`) and every
    `isinstance(m, nn.Linear)` in the model code still holds. `base_dtype` stores the frozen
    W in another dtype (bf16 under bf16 autocast, which rounds W to bf16 at every
    matmul anyway: the same products, half the bytes, no cast per call); A and B keep W's
    original dtype, and so does `merged_weight`."""

    def __init__(
        self, base: nn.Linear, rank: int, alpha: float, base_dtype: torch.dtype | None = None
    ) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        w = base.weight
        self.weight, self.bias = base.weight, base.bias  # the bias is small: kept as it is
        if base_dtype is not None and base_dtype != w.dtype:
            self.weight = nn.Parameter(w.detach().to(base_dtype))
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.lora_A = nn.Parameter(
            torch.empty(rank, self.in_features, dtype=w.dtype, device=w.device)
        )
        self.lora_B = nn.Parameter(
            torch.zeros(self.out_features, rank, dtype=w.dtype, device=w.device)
        )
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = alpha / rank
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if w.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            w = w.to(x.dtype)  # a bf16 base outside autocast (e.g. a plain fp32 forward)
        y = F.linear(x, w, self.bias)
        if not self.enabled:
            return y
        return y + self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W + (alpha / r) B A, computed in fp32 and returned in the adapters' dtype, the
        model's (a new tensor; a bf16-stored W enters as stored)."""
        delta = self.lora_B.float() @ self.lora_A.float()
        return (self.weight.float() + self.scale * delta).to(self.lora_A.dtype)

    def extra_repr(self) -> str:
        r = self.lora_A.shape[0]
        return f"{super().extra_repr()}, lora_rank={r}, lora_scale={self.scale:g}"


def apply_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    targets: Sequence[str],
    base_dtype: torch.dtype | None = None,
) -> int:
    """Freeze every parameter of `model` and replace each `nn.Linear` whose attribute name is
    in `targets` by a `LoRALinear` (its frozen weight stored in `base_dtype`, if given);
    returns how many were replaced. Raises ConfigError when none matches (the message lists
    the linear layers there are)."""
    model.requires_grad_(False)
    wanted = set(targets)
    found = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if name in wanted and type(child) is nn.Linear
    ]
    if not found:
        raise ConfigError(
            f"trainer.lora.targets {sorted(wanted)} match no linear layer of the model; it "
            f"has {', '.join(linear_names(model))}"
        )
    for parent, name, child in found:
        setattr(parent, name, LoRALinear(child, rank, alpha, base_dtype))
    return len(found)


def linear_names(model: nn.Module) -> list[str]:
    """The attribute names of the model's `nn.Linear` layers that may be LoRA targets."""
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    return sorted(names - set(_NOT_TARGETS))


def check_targets(model_path: str | Path, targets: Sequence[str]) -> None:
    """ConfigError unless every name in `targets` is a linear layer of the model at
    `model_path` (built on the meta device: no weights are read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    bad = [t for t in targets if t in _NOT_TARGETS]
    if bad:
        raise ConfigError(
            f"trainer.lora.targets: {bad[0]} cannot take an adapter (the fused LM head and the "
            "embedding are trained in full or not at all); list the decoder's linear layers"
        )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    have = linear_names(model)
    unknown = [t for t in targets if t not in have]
    if unknown:
        raise ConfigError(
            f"trainer.lora.targets: {', '.join(unknown)} is not a linear layer of "
            f"{model_path}; it has {', '.join(have)}"
        )


def lora_layers(module: nn.Module) -> dict[str, LoRALinear]:
    """{name of the base weight (as in `named_parameters`): its LoRALinear}."""
    return {
        f"{n}.weight" if n else "weight": m
        for n, m in module.named_modules()
        if isinstance(m, LoRALinear)
    }


def is_adapter(name: str) -> bool:
    """Whether a parameter name is a LoRA factor (not part of the exported model)."""
    return name.endswith((".lora_A", ".lora_B")) or name in ("lora_A", "lora_B")


@contextlib.contextmanager
def adapters_off(module: nn.Module) -> Iterator[None]:
    """Run `module` as its base model: every LoRALinear computes x W^T + b only."""
    layers = list(lora_layers(module).values())
    for m in layers:
        m.enabled = False
    try:
        yield
    finally:
        for m in layers:
            m.enabled = True


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def peft_name(name: str) -> str:
    """PEFT's saved name of a factor: `model.layers.0.self_attn.q_proj.lora_A` (a name in
    the Hugging Face model) -> `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`
    (PeftModel -> LoraModel -> the model; PEFT drops the adapter's name when saving)."""
    return f"base_model.model.{name}.weight"


def save_adapter(
    out_dir: str | Path,
    factors: Mapping[str, torch.Tensor],
    rank: int,
    alpha: float,
    base_model: str,
) -> Path:
    """Write the LoRA factors `factors` ({name in the HF model: tensor}) as a PEFT adapter
    folder: `adapter_config.json` (r, lora_alpha, target_modules; no dropout, no bias) and
    `adapter_model.safetensors`. PEFT scales B A by lora_alpha / r, as `LoRALinear` does."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    targets = sorted({n.rsplit(".", 2)[-2] for n in factors})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": targets,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    tensors = {peft_name(n): t.detach().to("cpu").contiguous() for n, t in factors.items()}
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return out
