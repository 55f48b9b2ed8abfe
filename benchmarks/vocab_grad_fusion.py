"""Trainer peak memory with and without the vocabulary gradient fusion, at a large vocabulary.

`trainer.vocab_grad_fusion` (`rlsys/kernels/grad_into.py`) adds the [V, H] embedding and LM-head
gradients straight into `.grad`. Its saving grows with V x H: for SmolLM2-135M (49,152 x 576,
108 MiB) `remax_vs_ppo.py` measures it; here a model of Qwen2.5-0.5B's shape (Qwen2
architecture, 24 layers, H = 896, 151,936-entry tied vocabulary, 494M parameters; random
weights, SmolLM2's tokenizer: the memory of a step does not depend on the values) runs the
GRPO recipe's trainer step on the same batch as `remax_vs_ppo.py` (8 groups x 8 samples, KL
k1 in the reward, gradient checkpointing, fp32 weights + bf16 autocast), once with the fusion
and once without, each in a fresh process. Peak memory is `remax_vs_ppo.py`'s allocator-exact
count (tensors alive after the build + the allocator's peak over a warm-up and a steady step).

    .venv/bin/python benchmarks/vocab_grad_fusion.py    # ~5 min; results/vocab_grad_fusion.json
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402
from remax_vs_ppo import UNFUSED, child  # noqa: E402

QWEN05 = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151936,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
)


def build(out: Path) -> None:
    """A random Qwen2.5-0.5B-shaped model with SmolLM2's tokenizer in `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    from rlsys import models

    tok = AutoTokenizer.from_pretrained(models.resolve("smollm2-135m-instruct"))
    torch.manual_seed(0)
    cfg = Qwen2Config(
        **QWEN05,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    tok.save_pretrained(out)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp))
        path = [f"model.path={tmp}"]
        on = child("grpo", 1, path)
        off = child("grpo", 1, [*path, UNFUSED])
    v, h = QWEN05["vocab_size"], QWEN05["hidden_size"]
    fig = {
        "model": "Qwen2.5-0.5B shape (random weights), tied 151936 x 896 vocabulary",
        "params_m": round(on["engines"]["policy"]["params_m"], 1),
        "vocab_grad_gb": round(v * h * 4 / 2**30, 3),
        "peak_mem_gb_fused": round(on["peak_gb"], 3),
        "peak_mem_gb_unfused": round(off["peak_gb"], 3),
        "saving_gb": round(off["peak_gb"] - on["peak_gb"], 3),
        "state_max_grads_gb": round(on["hand"]["state_max_grads"], 3),
        "step_s_fused": round(on["step_s"], 1),
        "step_s_unfused": round(off["step_s"], 1),
    }
    print(f"{'':10}{'peak GB':>10}{'state+grads':>13}{'step s':>8}")
    for name, r in (("fused", on), ("unfused", off)):
        print(
            f"{name:10}{r['peak_gb']:10.3f}{r['hand']['state_max_grads']:13.3f}{r['step_s']:8.1f}"
        )
    print(
        f"saving {fig['saving_gb']:.3f} GB (one [V, H] fp32 gradient = {fig['vocab_grad_gb']:.3f} GB)"
    )
    print(f"wrote {write_results('vocab_grad_fusion', fig)}")


if __name__ == "__main__":
    main()
